"""GGUF blocks -> QuantizedTensor: synthetic blocks of every supported type against gguf's own
de-quantization, and every linear weight of the two packaged GGUF files against the dense
state transformers reads from them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from snapshot.quant.gguf_blocks import (
    GgufConversion,
    blocks_to_quantized,
    convert_gguf,
    gguf_quantized_state,
    rope_row_order,
)
from tests.support.snapshot_fixtures import GEMMA3_SNAPSHOT, GGUF_CACHE

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
SUPPORTED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K]
EXPECTED = {  # scheme, group, scale dtype
    T.Q8_0: ("int8", 32, torch.float16),
    T.Q4_0: ("int4", 32, torch.float16),
    T.Q4_1: ("int4", 32, torch.float16),
    T.Q5_0: ("int8", 32, torch.float16),
    T.Q4_K: ("int4", 32, torch.float32),
    T.Q6_K: ("int8", 16, torch.float32),
}


# --- synthetic blocks ---------------------------------------------------------------------------


def random_f16(rng: np.random.Generator, shape: tuple[int, ...], limit: float) -> np.ndarray:
    """Finite float16 bit patterns of every kind (negative, zero, -0, subnormal, normal) with
    |value| <= limit, as bytes [..., 2]."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    values = bits.view(np.float16)
    bad = ~np.isfinite(values) | (np.abs(values.astype(np.float32)) > limit)
    values = np.where(bad, np.float16(-1.5), values).astype(np.float16)
    flat = values.reshape(-1)
    for i, edge in enumerate([0.0, -0.0, 6e-8, -6e-5, min(limit, 65504.0)][: flat.size]):
        flat[i] = edge  # make sure the edges are there
    return np.ascontiguousarray(values).view(np.uint8).reshape(*shape, 2)


def random_blocks(tensor_type: Any, rows: int, blocks: int, limit: float = 65504.0) -> np.ndarray:
    """Valid raw bytes of `rows` x `blocks` blocks: random payload, finite float16 fields."""
    rng = np.random.default_rng(int(tensor_type))
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    data = rng.integers(0, 256, size=(rows, blocks, block_bytes), dtype=np.uint8)
    f16_at = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}
    for start in f16_at[tensor_type]:
        data[..., start : start + 2] = random_f16(rng, (rows, blocks), limit)
    return data.reshape(rows, blocks * block_bytes)


def assert_same(ours: torch.Tensor, reference: np.ndarray) -> None:
    """Equal value for value and bit for bit, but for the sign of a zero."""
    theirs = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    nonzero = theirs != 0
    assert torch.equal(ours.view(torch.int32)[nonzero], theirs.view(torch.int32)[nonzero])


@pytest.mark.parametrize("tensor_type", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("limit", [8.0, 65504.0], ids=["small-scales", "full-range"])
def test_synthetic_blocks_match_gguf_dequantize(tensor_type: Any, limit: float) -> None:
    data = random_blocks(tensor_type, rows=37, blocks=3, limit=limit)
    qt = blocks_to_quantized(data, tensor_type)
    assert qt is not None
    qt.check("synthetic")
    scheme, group, scale_dtype = EXPECTED[tensor_type]
    block_elems = gguf.GGML_QUANT_SIZES[tensor_type][0]
    assert (qt.scheme, qt.block, qt.shape) == (scheme, (1, group), (37, 3 * block_elems))
    if tensor_type == T.Q4_0 and limit > 8191.875:
        scale_dtype = torch.float32  # -8 d overflows float16: both kept in float32
    assert qt.scales.dtype == scale_dtype
    assert_same(qt.dequantize(torch.float32), gguf.quants.dequantize(data, tensor_type))


def test_q4_0_keeps_float16_offsets_when_they_fit() -> None:
    data = random_blocks(T.Q4_0, rows=8, blocks=4, limit=8000.0)
    qt = blocks_to_quantized(data, T.Q4_0)
    assert qt is not None and qt.offsets is not None
    assert qt.scales.dtype == qt.offsets.dtype == torch.float16
    assert torch.equal(qt.offsets.float(), -8 * qt.scales.float())


@pytest.mark.parametrize(
    "tensor_type",
    [T.F32, T.F16, T.BF16, T.Q5_1, T.Q5_K, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ2_XXS],
    ids=lambda t: t.name,
)
def test_other_types_are_not_converted(tensor_type: Any) -> None:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    data = np.zeros((4, 2 * block_bytes), dtype=np.uint8)
    assert blocks_to_quantized(data, tensor_type) is None


def test_malformed_layouts_are_not_converted() -> None:
    data = random_blocks(T.Q8_0, rows=2, blocks=2)
    assert blocks_to_quantized(data.reshape(-1), T.Q8_0) is None  # 1-D
    assert blocks_to_quantized(data[:, :-1], T.Q8_0) is None  # not whole blocks
    assert blocks_to_quantized(data.reshape(1, 2, -1), T.Q8_0) is None  # 3-D (experts)


def test_rope_row_order_undoes_llama_cpp_permutation() -> None:
    heads, head_dim = 3, 8
    hf_rows = torch.arange(heads * head_dim)
    # llama.cpp: within each head, rows (i, i + head_dim / 2) become neighbours.
    gguf_rows = hf_rows.reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(gguf_rows[rope_row_order(heads * head_dim, heads)], hf_rows)


# --- the packaged GGUF files ----------------------------------------------------------------------


def _linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    suffixes = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")
    return [n for n, t in state.items() if n.endswith(suffixes) and t.ndim == 2]


def _dense_from_transformers(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What snapshot.sources.load gets: float32 de-quantized by transformers, a tied lm_head
    dropped."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state, model.config.to_dict()


def _dense_from_snapshot(directory: Path, gguf_name: str) -> tuple[dict, dict] | None:
    """The linear weights of a float32 snapshot built from that GGUF file (the same float32
    state, loading in a second instead of a minute), or None if there is none such."""
    from safetensors import safe_open

    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    tensors = manifest.get("tensors", {})
    wanted = [n for n, e in tensors.items() if e.get("dtype") == "float32" and len(e["shape"]) == 2]
    dense = all(e.get("dtype") == "float32" for e in tensors.values())
    if gguf_name not in str(manifest.get("source")) or not dense or not wanted:
        return None
    state: dict[str, torch.Tensor] = {}
    for file_name in sorted({tensors[n]["file"] for n in wanted}):
        with safe_open(str(directory / file_name), framework="pt") as f:
            for name in wanted:
                if tensors[name]["file"] == file_name:
                    state[name] = f.get_tensor(name)
    return state, config


@dataclass
class RealGguf:
    path: Path
    reader: Any  # gguf.GGUFReader, opened once per module: it takes seconds
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    result: GgufConversion


def _real(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> RealGguf:
    reader = gguf.GGUFReader(str(path))
    return RealGguf(path, reader, state, config, convert_gguf(path, state, config, reader=reader))


@pytest.fixture(scope="module")
def smollm2() -> RealGguf:
    from snapshot.sources import default_gguf

    path = default_gguf()
    return _real(path, *_dense_from_transformers(path))


@pytest.fixture(scope="module")
def gemma3() -> RealGguf:
    from snapshot.errors import SnapshotError
    from snapshot.sources import gemma3_gguf

    try:
        path = gemma3_gguf(GGUF_CACHE)
    except SnapshotError as exc:
        pytest.skip(f"Gemma 3 GGUF unavailable: {exc}")
    found = _dense_from_snapshot(GEMMA3_SNAPSHOT, path.name)
    return _real(path, *(found if found is not None else _dense_from_transformers(path)))


def _check_all_converted(result: GgufConversion, state: dict[str, torch.Tensor]) -> None:
    assert result.skipped == {}
    assert result.inexact == []  # linear weights come out of transformers untouched
    assert sorted(result.tensors) == sorted(_linear_names(state))
    for name, qt in result.tensors.items():
        qt.check(name)
        assert torch.equal(qt.dequantize(torch.float32), state[name]), name


def test_smollm2_gguf_converts_every_linear(smollm2: RealGguf) -> None:
    result = smollm2.result
    _check_all_converted(result, smollm2.state)
    assert dict(result.types) == {"Q4_1": 210, "Q8_0": 1}
    embed = result.tensors["model.embed_tokens.weight"]
    assert (embed.scheme, embed.block, embed.scales.dtype) == ("int8", (1, 32), torch.float16)
    q = result.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.scheme, q.block, q.scales.dtype) == ("int4", (1, 32), torch.float16)


def test_smollm2_q_and_k_rows_are_permuted(smollm2: RealGguf) -> None:
    tensors = {t.name: t for t in smollm2.reader.tensors}
    for gguf_name, hf_name in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
    ]:
        t = tensors[gguf_name]
        raw = blocks_to_quantized(np.asarray(t.data), t.tensor_type)
        assert raw is not None
        assert not torch.equal(raw.dequantize(), smollm2.state[hf_name])  # llama.cpp's order


def test_mismatched_tensor_is_left_out_with_a_warning(smollm2: RealGguf) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    damaged = {name: smollm2.state[name].clone(), "model.norm.weight": torch.ones(576)}
    damaged[name][3, 5] += 1.0
    with pytest.warns(UserWarning, match="down_proj"):
        tensors = gguf_quantized_state(smollm2.path, damaged, smollm2.config, reader=smollm2.reader)
    assert tensors == {}


def test_tied_lm_head_in_the_state_reuses_the_embedding(smollm2: RealGguf) -> None:
    embed = smollm2.state["model.embed_tokens.weight"]
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed}
    result = convert_gguf(smollm2.path, state, smollm2.config, reader=smollm2.reader)
    assert result.tensors["lm_head.weight"] is result.tensors["model.embed_tokens.weight"]


def test_gemma3_gguf_converts_every_linear(gemma3: RealGguf) -> None:
    result = gemma3.result
    _check_all_converted(result, gemma3.state)
    assert dict(result.types) == {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    # Spot-check each mapping's layout on a real tensor.
    layer = "model.layers.0"
    assert result.tensors[f"{layer}.mlp.down_proj.weight"].block == (1, 16)  # Q6_K
    assert result.tensors[f"{layer}.self_attn.o_proj.weight"].scheme == "int4"  # Q4_K


def test_conversion_is_fast(smollm2: RealGguf) -> None:
    tensor = next(t for t in smollm2.reader.tensors if t.name == "token_embd.weight")
    data = np.asarray(tensor.data)
    start = time.perf_counter()
    qt = blocks_to_quantized(data, tensor.tensor_type)
    elapsed = time.perf_counter() - start
    assert qt is not None and qt.shape == (49152, 576)
    assert elapsed < 1.0, f"{elapsed:.2f} s"
