"""`thaw snapshot verify` and `inspect`: every corruption gives one line naming the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.snapshot_fixtures import VENV_BIN, rewrite_manifest_checksums
from thaw.cli import main as thaw

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def verify(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = thaw(["snapshot", "verify", str(directory)])
    return code, capsys.readouterr().err.splitlines()


def truncate(d: Path) -> None:
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(d: Path) -> None:
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Rewrite one tensor and fix up the checksums: only the tensor check can catch it."""

    def apply(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        tensors[Q_PROJ] = change(tensors[Q_PROJ]).contiguous()
        save_file(tensors, d / "model.safetensors")
        rewrite_manifest_checksums(d)

    return apply


def drop_tensor(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    del tensors[Q_PROJ]
    save_file(tensors, d / "model.safetensors")
    rewrite_manifest_checksums(d)


def unlist(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["files"] = [f for f in manifest["files"] if f["name"] != name]
        (d / "manifest.json").write_text(json.dumps(manifest))

    return apply


def set_format_version(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))


def broken_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    rewrite_manifest_checksums(d)


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated", truncate, "model.safetensors: .* bytes, manifest says .* \\(truncated"),
    ("flipped byte", flip_byte, "model.safetensors: sha256 differs from the manifest"),
    ("missing tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    ("tokenizer does not load", broken_tokenizer, "tokenizer.json: does not load"),
    ("missing file", lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (
        "wrong shape",
        edit_tensor(lambda t: t[:-1]),
        f"model.safetensors: tensor {Q_PROJ} has shape \\[63, 64\\], expected \\[64, 64\\]",
    ),
    (
        "wrong dtype",
        edit_tensor(lambda t: t.float()),
        f"model.safetensors: tensor {Q_PROJ} is float32, the snapshot dtype is bfloat16",
    ),
    ("missing tensor", drop_tensor, f"model.safetensors: tensor {Q_PROJ} is missing"),
    (
        "weights not checksummed",
        unlist("model.safetensors"),
        "manifest.json: tensor file 'model.safetensors' is not listed in 'files'",
    ),
    (
        "required file not checksummed",
        unlist("config.json"),
        "config.json: missing from manifest.json",
    ),
    ("unknown manifest version", set_format_version, "manifest.json: unknown format_version 99"),
    (
        "garbage manifest",
        lambda d: (d / "manifest.json").write_text("{not json"),
        "manifest.json: not valid JSON",
    ),
    (
        "manifest escapes the directory",
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"config.json"', '"../config.json"', 1)
        ),
        "manifest.json: file name '../config.json' is not allowed",
    ),
]


@pytest.mark.parametrize(("damage", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_corruption_fails_with_one_line_naming_the_file(
    tiny_llama_copy: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    expected: str,
) -> None:
    damage(tiny_llama_copy)
    code, lines = verify(tiny_llama_copy, capsys)
    assert code != 0
    assert lines, "no error printed"
    assert all(line.startswith("error: ") for line in lines), lines
    assert any(re.search(expected, line) for line in lines), lines


def test_sound_snapshot_verifies(
    tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(tiny_llama_snapshot, capsys) == (0, [])


def test_verify_through_the_installed_command(tiny_llama_copy: Path) -> None:
    ok = subprocess.run(
        [VENV_BIN / "thaw", "snapshot", "verify", tiny_llama_copy], capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    flip_byte(tiny_llama_copy)
    bad = subprocess.run(
        [VENV_BIN / "thaw", "snapshot", "verify", tiny_llama_copy], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip()
        == "error: model.safetensors: sha256 differs from the manifest (corrupted)"
    )


def test_verify_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = verify(tmp_path / "nothing", capsys)
    assert code == 1 and lines == [f"error: {tmp_path / 'nothing'}: not a directory"]


def test_inspect_text_and_json(
    tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert thaw(["snapshot", "inspect", str(tiny_llama_snapshot)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "model.safetensors" in text and "sha256:" in text
    assert thaw(["snapshot", "inspect", str(tiny_llama_snapshot), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((tiny_llama_snapshot / "manifest.json").read_text())
    assert summary["files"] == manifest["files"]
    assert summary["parameter_count"] == manifest["parameter_count"] > 0
    assert "tensors" not in summary


def test_inspect_of_garbage_is_a_clear_error(
    tiny_llama_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_llama_copy / "manifest.json").write_text("[1, 2]")
    assert thaw(["snapshot", "inspect", str(tiny_llama_copy)]) == 1
    assert capsys.readouterr().err.strip() == "error: manifest.json: not a JSON object"


def test_the_command_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, snapshot.cli;"
        "heavy = ('torch', 'transformers', 'boto3', 'tokenizers');"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
