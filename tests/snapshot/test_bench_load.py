"""`thaw bench load`: one JSON object with every loader's figure, measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thaw.cli import main as thaw


def test_bench_load_json(tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = thaw(
        ["bench", "load", str(tiny_llama_snapshot), "--json", "--repeat", "1", "--device", "cpu"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu"
    assert result["weight_bytes"] == (tiny_llama_snapshot / "model.safetensors").stat().st_size - (
        8 + int.from_bytes((tiny_llama_snapshot / "model.safetensors").read_bytes()[:8], "little")
    )
    for key in (
        "ours_gbps",
        "ours_lazy_gbps",
        "ours_copy_gbps",
        "safetensors_gbps",
        "safetensors_lazy_gbps",
        "transformers_gbps",
    ):
        assert result[key] > 0, key
        assert result["measures"][key], key


def test_bench_load_text(tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "load", str(tiny_llama_snapshot), "--repeat", "1", "--skip-transformers"]
    assert thaw([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "thaw loader, then every byte read" in out and "GB/s" in out


def test_bench_load_of_a_missing_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert thaw(["bench", "load", str(tmp_path), "--json"]) == 1
    assert capsys.readouterr().err.strip() == "error: manifest.json: missing"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_bench_load_asks_for_missing_cuda(
    tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert thaw(["bench", "load", str(tiny_llama_snapshot), "--device", "cuda"]) == 1
    assert capsys.readouterr().err.strip() == "error: device 'cuda': CUDA is not available"
