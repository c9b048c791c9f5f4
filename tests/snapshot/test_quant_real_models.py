"""The packaged GGUFs kept quantized (`--quantize source`): SmolLM2's Q4_1/Q8_0 and Gemma 3
270M's Q4_K/Q5_0/Q6_K/Q8_0 blocks re-packed without a detour through bf16.

The reference is exact here: transformers de-quantizes the same GGUF in float32, and so does
thaw's float32 path, so greedy ids must be equal token for token. The bfloat16 path (the CPU
int8/int4 kernels) is compared with it by KL and top-1 agreement, and against the same
model served dense in bfloat16, which is what quantized serving has to match."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from handler.model.config import ModelConfig
from snapshot import manifest as mf
from snapshot.loader import load_snapshot
from snapshot.quant.accuracy import logit_agreement
from snapshot.quant.format import QuantizedTensor
from snapshot.verify import verify_snapshot
from tests.support.engine_fixtures import teacher_forced_logits
from tests.support.snapshot_fixtures import GGUF_CACHE, ensure_snapshot

MAX_NEW = 32
MODELS = {
    "smollm2": ("default", {"Q4_1": 210, "Q8_0": 1}),
    "gemma3": ("gemma3-270m", {"Q4_K": 18 + 9, "Q5_0": 18 * 4 + 9, "Q6_K": 9, "Q8_0": 9 + 1}),
}


def _gguf(source: str) -> Path:
    from snapshot.sources import resolve

    resolved = resolve(source, GGUF_CACHE)
    assert resolved.gguf_file is not None
    return resolved.directory / resolved.gguf_file


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 30000)) for _ in range(n)] for n in (5, 11, 17)]


def _dense_engine(directory: Path, config: EngineConfig) -> LLMEngine:
    """The snapshot's weights de-quantized once to bfloat16: the dense model they stand for."""
    snap = load_snapshot(directory)
    weights = {
        name: w.dequantize(torch.float32).to(torch.bfloat16)
        if isinstance(w, QuantizedTensor)
        else w
        for name, w in snap.weights.items()
    }
    return LLMEngine(ModelConfig.from_hf_config(snap.config), weights, [], config)


def _dense(weight: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    if isinstance(weight, QuantizedTensor):
        return weight.dequantize(torch.float32).to(torch.bfloat16)
    return weight


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[str, Path, Path]:
    name = request.param
    source = MODELS[name][0]
    float32 = ensure_snapshot(
        f"{name}-gguf-blocks-f32", source, "--quantize", "source", "--dtype", "float32"
    )
    bf16 = ensure_snapshot(f"{name}-gguf-blocks", source, "--quantize", "source")
    return name, float32, bf16


def test_every_block_is_kept_quantized(model: tuple[str, Path, Path]) -> None:
    name, float32, bf16 = model
    for directory in (float32, bf16):
        manifest = mf.load_manifest(directory)
        assert verify_snapshot(directory) == []
        counted = manifest["quantization_source"]
        for kind, count in MODELS[name][1].items():
            assert f"{count} {kind}" in counted, counted
        assert len(manifest["quantization"]) == sum(MODELS[name][1].values())
        stored = manifest["weight_bytes"]
        assert stored < manifest["parameter_count"] * 1.2  # about a byte a weight or less


def test_float32_greedy_equals_transformers_on_the_same_gguf(model: tuple[str, Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    name, float32, _ = model
    gguf = _gguf(MODELS[name][0])
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    engine = LLMEngine.from_snapshot(
        float32, EngineConfig(dtype=torch.float32, max_num_batched_tokens=128, num_kv_blocks=64)
    )
    prompts = _prompts(engine.model_config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for prompt, ours in zip(prompts, engine.generate(prompts, params), strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
            )
        assert ours == out[0, len(prompt) :].tolist()


def test_bfloat16_kernels_track_float32(model: tuple[str, Path, Path]) -> None:
    """The int kernels' error stays at bfloat16's own: KL to float32 no worse than twice that of
    the same weights served dense in bfloat16 (the kernels round each de-quantized weight to
    bfloat16, as a dense bf16 snapshot of these weights would)."""
    name, float32, bf16 = model
    weights = load_snapshot(bf16).weights
    assert isinstance(weights["model.layers.0.mlp.down_proj.weight"], QuantizedTensor)
    config = EngineConfig(max_num_batched_tokens=256, num_kv_blocks=64)
    quantized = LLMEngine.from_snapshot(bf16, config)
    kinds = {layer.down.layout for layer in quantized.runner.model.weights.layers}
    assert kinds == {"thaw_int"} or not quantized.runner.model.kernels, kinds
    dense = _dense_engine(bf16, config)
    reference = LLMEngine.from_snapshot(
        float32, EngineConfig(dtype=torch.float32, num_kv_blocks=64)
    )
    tokens = _prompts(quantized.model_config.vocab_size, seed=7)[2] * 6
    want = teacher_forced_logits(reference, [tokens], decodes=16)
    ours = logit_agreement(want, teacher_forced_logits(quantized, [tokens], decodes=16))
    theirs = logit_agreement(want, teacher_forced_logits(dense, [tokens], decodes=16))
    print(f"{name}: quantized kernels {ours}, dense bf16 {theirs}")
    assert ours["kl"] <= 2 * theirs["kl"] + 1e-3
    assert ours["top1"] >= theirs["top1"] - 0.05
