"""Quantized snapshots end to end: `--quantize int8|int4` builds, verify/inspect read them,
the loader rebuilds each QuantizedTensor, and the engine's output equals transformers running
the same de-quantized weights (float32), or stays close to it (bfloat16 kernels)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from snapshot import manifest as mf
from snapshot.errors import SnapshotError
from snapshot.loader import load_snapshot
from snapshot.quant.format import QuantizedTensor
from snapshot.summary import quantization_counts, render, summary
from snapshot.verify import verify_snapshot
from tests.support.engine_fixtures import kl_divergence, teacher_forced_logits
from tests.support.snapshot_fixtures import build, rewrite_manifest_checksums, save_tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_NEW = 32


def _prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    """Token ids inside the tiny model's 128-token vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(4, 128) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _linear_names(layers: int) -> set[str]:
    return {
        f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}"
        f".{p}.weight"
        for i in range(layers)
        for p in LINEARS
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Wider than the shared tiny model so int4 groups of 32 span several groups per row.
    root = tmp_path_factory.mktemp("quant-source")
    return save_tiny_model(root / "source", "llama", tie=True, hidden_size=128)


@pytest.fixture(scope="module")
def snapshots(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-snapshots")
    out = {}
    for scheme in ("int8", "int4"):
        for dtype in ("float32", "bfloat16"):
            out[f"{scheme}-{dtype}"] = root / f"{scheme}-{dtype}"
            build(source, out[f"{scheme}-{dtype}"], quantize=scheme, dtype=dtype)
    return out


def test_manifest_names_every_quantized_weight(snapshots: dict[str, Path]) -> None:
    for key, directory in snapshots.items():
        scheme = key.split("-")[0]
        manifest = mf.load_manifest(directory)
        assert manifest["format_version"] == mf.QUANTIZED_FORMAT_VERSION
        quantization = manifest["quantization"]
        expected = _linear_names(layers=2)
        assert expected | {"model.embed_tokens.weight"} == set(quantization)
        for name in expected:
            assert quantization[name]["scheme"] == scheme, name
        # The output layer (tied to the embeddings here) stays 8-bit even in an int4 snapshot.
        assert quantization["model.embed_tokens.weight"]["scheme"] == "int8"
        assert verify_snapshot(directory) == [], key
        counts = quantization_counts(manifest)
        assert sum(counts.values()) == len(quantization)
        text = render(manifest)
        assert f"quantized by  round to nearest: {scheme} g" in text, text
        assert "quantization" in summary(manifest) and "tensors" not in summary(manifest)


def test_quantized_bytes_are_smaller(
    source: Path, snapshots: dict[str, Path], tmp_path: Path
) -> None:
    dense = build(source, tmp_path / "dense", dtype="bfloat16")
    int8 = mf.load_manifest(snapshots["int8-bfloat16"])
    int4 = mf.load_manifest(snapshots["int4-bfloat16"])
    assert dense["parameter_count"] == int8["parameter_count"] == int4["parameter_count"]
    assert int4["weight_bytes"] < int8["weight_bytes"] < 0.6 * dense["weight_bytes"]


def test_loader_rebuilds_quantized_tensors(snapshots: dict[str, Path]) -> None:
    snap = load_snapshot(snapshots["int4-bfloat16"])
    weight = snap.weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(weight, QuantizedTensor)
    assert weight.scheme == "int4" and weight.shape == (128, 128)
    assert not any(name.endswith((".qweight", ".scales", ".offsets")) for name in snap.weights)
    assert isinstance(snap.weights["model.norm.weight"], torch.Tensor)


def _reference(source: Path, snapshot: Path):
    """transformers' model of `source` with the snapshot's weights, de-quantized in float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    snap = load_snapshot(snapshot)
    state = {
        name: (w.dequantize(torch.float32) if isinstance(w, QuantizedTensor) else w.float())
        for name, w in snap.weights.items()
    }
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def _greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_float32_engine_equals_transformers_on_the_dequantized_weights(
    source: Path, snapshots: dict[str, Path], scheme: str
) -> None:
    snapshot = snapshots[f"{scheme}-float32"]
    model = _reference(source, snapshot)
    config = EngineConfig(dtype=torch.float32, max_num_batched_tokens=128, num_kv_blocks=64)
    engine = LLMEngine.from_snapshot(snapshot, config)
    prompts = _prompts(4, 3, 12, seed=5)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == _greedy(model, prompt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_kernels_stay_close_to_the_dequantized_float32_model(
    source: Path, snapshots: dict[str, Path], scheme: str
) -> None:
    model = _reference(source, snapshots[f"{scheme}-float32"])
    engine = LLMEngine.from_snapshot(
        snapshots[f"{scheme}-bfloat16"], EngineConfig(max_num_batched_tokens=128, num_kv_blocks=64)
    )
    tokens = _prompts(1, 48, 48, seed=9)[0]
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].float()
    ours = teacher_forced_logits(engine, [tokens], decodes=16)
    assert kl_divergence(reference, ours) < 0.02
    agreement = (reference.argmax(-1) == ours.argmax(-1)).float().mean()
    assert agreement >= 0.9


def test_quantize_source_refuses_a_dense_model(source: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not quantized"):
        build(source, tmp_path / "out", quantize="source")
    assert not (tmp_path / "out").exists()


def test_unknown_quantize_choice_is_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="--quantize int3"):
        build(source, tmp_path / "out", quantize="int3")


def _copy(snapshots: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(snapshots["int4-bfloat16"], copy)
    return copy


def _edit_tensor(directory: Path, name: str, value: float) -> None:
    """Overwrite the first element of a float16 tensor in its file (checksums then rewritten)."""
    from snapshot.tensorfile import read_header

    manifest = mf.load_manifest(directory)
    file = manifest["tensors"][name]["file"]
    header = read_header(directory / file)
    entry = header.tensors[name]
    raw = torch.tensor([value], dtype=getattr(torch, entry.dtype)).view(torch.uint8).numpy()
    with open(directory / file, "r+b") as f:
        f.seek(header.data_start + entry.begin)
        f.write(raw.tobytes())


def test_verify_catches_a_corrupted_scale(snapshots: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(snapshots, tmp_path)
    scales = "model.layers.1.mlp.down_proj.weight.scales"
    _edit_tensor(copy, scales, 1234.5)
    problems = verify_snapshot(copy)
    assert len(problems) == 1 and "sha256 differs" in problems[0], problems
    # Even when the checksums are made to agree, a scale that is not a number is caught.
    _edit_tensor(copy, scales, float("inf"))
    rewrite_manifest_checksums(copy)
    problems = verify_snapshot(copy)
    assert problems == [f"model.safetensors: {scales}: 1 non-finite values (corrupted?)"]


def test_verify_and_loader_refuse_an_unknown_scheme(
    snapshots: dict[str, Path], tmp_path: Path
) -> None:
    copy = _copy(snapshots, tmp_path)
    manifest = json.loads((copy / mf.MANIFEST).read_text())
    manifest["quantization"]["model.layers.0.mlp.up_proj.weight"]["scheme"] = "nf4"
    (copy / mf.MANIFEST).write_text(json.dumps(manifest))
    problems = verify_snapshot(copy)
    assert any("'nf4'" in p and "up_proj" in p for p in problems), problems
    with pytest.raises(SnapshotError, match="nf4"):
        load_snapshot(copy)


def test_verify_catches_a_part_of_the_wrong_shape(
    snapshots: dict[str, Path], tmp_path: Path
) -> None:
    copy = _copy(snapshots, tmp_path)
    manifest = json.loads((copy / mf.MANIFEST).read_text())
    entry = manifest["quantization"]["model.layers.0.mlp.up_proj.weight"]
    entry["block"] = [1, 64]  # the stored scales have a column per 32 values
    (copy / mf.MANIFEST).write_text(json.dumps(manifest))
    problems = verify_snapshot(copy)
    assert any("up_proj.weight.scales: shape" in p for p in problems), problems


def test_manifest_quantization_must_name_listed_tensors(
    snapshots: dict[str, Path], tmp_path: Path
) -> None:
    copy = _copy(snapshots, tmp_path)
    manifest = json.loads((copy / mf.MANIFEST).read_text())
    manifest["quantization"]["model.layers.0.mlp.up_proj.weight"]["scales"] = "nope"
    with pytest.raises(SnapshotError, match="'nope' is not a listed tensor"):
        mf.parse_manifest(manifest)
    del manifest["quantization"]
    with pytest.raises(SnapshotError, match="format_version 2 without 'quantization'"):
        mf.parse_manifest(manifest)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh)")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_triton_path_tracks_the_dequantized_float32_model(
    source: Path, snapshots: dict[str, Path], scheme: str
) -> None:
    """The same check as the CPU kernels', on CUDA: int weights through the Triton matmul."""
    model = _reference(source, snapshots[f"{scheme}-float32"])
    config = EngineConfig(device="cuda", max_num_batched_tokens=128, num_kv_blocks=64)
    engine = LLMEngine.from_snapshot(snapshots[f"{scheme}-bfloat16"], config)
    layouts = {layer.qkv.layout for layer in engine.runner.model.weights.layers}
    assert layouts == {"triton_int"}, layouts
    tokens = _prompts(1, 48, 48, seed=9)[0]
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].float()
    ours = teacher_forced_logits(engine, [tokens], decodes=16).cpu()
    assert kl_divergence(reference, ours) < 0.02
    assert (reference.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
