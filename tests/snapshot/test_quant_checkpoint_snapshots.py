"""Quantized Hugging Face checkpoints through `thaw snapshot build` to the engine: AWQ, GPTQ,
transformers' FP8 and compressed-tensors (made by the real package) are stored quantized by
default, verify clean, and serve the same greedy ids as transformers running the weights they
stand for (float32). A method thaw does not serve is refused at build, by name."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from snapshot import manifest as mf
from snapshot.loader import load_snapshot
from snapshot.quant.format import QuantizedTensor
from snapshot.verify import verify_snapshot
from tests.snapshot import quant_fixtures as fx
from tests.support.snapshot_fixtures import REPO, build, save_tiny_tokenizer

MAX_NEW = 32
CT_INT4 = {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}
CT_FP8 = {"num_bits": 8, "type": "float", "strategy": "channel"}
CASES: dict[str, tuple[Callable[[Path], fx.Fixture], str]] = {
    "awq": (fx.awq_checkpoint, "int4"),
    "gptq-int8": (lambda d: fx.gptq_checkpoint(d, bits=8), "int8"),
    "fp8-block": (fx.fp8_checkpoint, "fp8"),
    "compressed-int4": (lambda d: fx.compressed_checkpoint(d, CT_INT4, "pack-quantized"), "int4"),
    "compressed-fp8": (lambda d: fx.compressed_checkpoint(d, CT_FP8, "float-quantized"), "fp8"),
}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 256) for _ in range(n)] for n in (4, 9, 15)]


def _reference_model(fixture: fx.Fixture, snapshot: Path) -> Any:
    """transformers' Llama with the fixture's dense tensors and, for each quantized weight, the
    fixture's own float32 reference (computed from the integer values before packing), or
    for compressed-tensors (no independent reference) the snapshot's de-quantized weight."""
    model = fx.tiny_llama(torch.float32)
    state = {name: t.float() for name, t in fixture.dense.items()}
    for name, weight in load_snapshot(snapshot).weights.items():
        if isinstance(weight, QuantizedTensor):
            state[name] = fixture.reference.get(name, weight.dequantize(torch.float32))
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_checkpoint_serves_like_transformers(case: str, tmp_path: Path) -> None:
    make, scheme = CASES[case]
    fixture = make(tmp_path / "source")
    save_tiny_tokenizer(fixture.directory)
    out = tmp_path / "snapshot"
    manifest = build(fixture.directory, out, dtype="float32")  # --quantize auto keeps it
    assert verify_snapshot(out) == []
    assert manifest["format_version"] == mf.QUANTIZED_FORMAT_VERSION
    expected = {f"{name}.weight" for name in fixture.linears}
    assert set(manifest["quantization"]) == expected
    assert {e["scheme"] for e in manifest["quantization"].values()} == {scheme}
    assert manifest["quantization_source"]
    model = _reference_model(fixture, out)
    engine = LLMEngine.from_snapshot(
        out, EngineConfig(dtype=torch.float32, max_num_batched_tokens=128, num_kv_blocks=64)
    )
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    prompts = _prompts(seed=len(case))
    for prompt, ours in zip(prompts, engine.generate(prompts, params), strict=True):
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
            )
        assert ours == want[0, len(prompt) :].tolist()


def test_quantize_none_and_int8_from_a_quantized_checkpoint(tmp_path: Path) -> None:
    fixture = fx.awq_checkpoint(tmp_path / "source")
    save_tiny_tokenizer(fixture.directory)
    dense = build(fixture.directory, tmp_path / "dense", dtype="float32", quantize="none")
    assert "quantization" not in dense and dense["format_version"] == mf.FORMAT_VERSION
    weights = load_snapshot(tmp_path / "dense").weights
    for name, want in fixture.reference.items():
        assert torch.equal(weights[name], want), name
    requantized = build(fixture.directory, tmp_path / "int8", quantize="int8")
    assert {e["scheme"] for e in requantized["quantization"].values()} == {"int8"}
    assert requantized["quantization_source"].startswith("round to nearest")
    assert verify_snapshot(tmp_path / "int8") == []


def _unsupported(directory: Path, quantization_config: dict[str, Any]) -> Path:
    model = fx.tiny_llama()
    fx.write_checkpoint(directory, model, quantization_config, model.state_dict())
    save_tiny_tokenizer(directory)
    return directory


@pytest.mark.parametrize(
    ("quantization_config", "named"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "hqq", "nbits": 4}, "'hqq'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
    ],
)
def test_an_unserved_scheme_is_refused_at_build_by_name(
    quantization_config: dict[str, Any], named: str, tmp_path: Path
) -> None:
    source = _unsupported(tmp_path / "source", quantization_config)
    out = tmp_path / "snapshot"
    cmd = [sys.executable, "-m", "thaw.cli", "snapshot", "build", "--from", str(source)]
    done = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and named in error, error
    assert not out.exists()


def test_a_quantization_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    source = _unsupported(tmp_path / "source", {"quant_method": "awq"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = "awq"
    (source / "config.json").write_text(json.dumps(config))
    from snapshot.errors import SnapshotError

    with pytest.raises(SnapshotError, match="quantization_config is not an object"):
        build(source, tmp_path / "out")
