"""GGUF quantized blocks -> QuantizedTensor, exactly and without de-quantizing.

Each supported GGML block type maps onto the one rule of format.py (W = q * s + o in float32)
so that `QuantizedTensor.dequantize(torch.float32)` reproduces gguf's own de-quantization value
for value (the only difference possible is the sign of a zero):

    GGUF    scheme  group  scales (dtype)        offsets (dtype)
    Q8_0    int8    32     d (float16)           -
    Q4_0    int4    32     d (float16)           -8 d (float16; float32 if it overflows)
    Q4_1    int4    32     d (float16)           m (float16)
    Q5_0    int8    32     d (float16)           -           (q - 16 fits int8)
    Q4_K    int4    32     d * sc (float32)      -dmin * m (float32)
    Q6_K    int8    16     d * sc (float32)      -           (q - 32 fits int8)

Every product above is exact in float32 (at most 23 significant bits), so the only rounding is
the final addition of an offset, which gguf does too. Other types (dense F32/F16/BF16, Q5_1, the
other K-quants, IQ*) are not converted: the caller keeps the de-quantized dense tensor.

Build time only: `gguf` is imported inside the functions that read files.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapshot.quant.format import QuantizedTensor
from snapshot.quant.hf_config import config_value

# GGML type ids, fixed by the GGUF specification.
Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 2, 3, 6, 8, 12, 14
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
QK_K = 256  # elements in a K-quant super-block
F16_MAX = 65504.0


@dataclass(frozen=True)
class _BlockType:
    elements: int  # weights per block
    nbytes: int  # bytes per block
    convert: Callable[[np.ndarray], QuantizedTensor]  # [n, blocks, nbytes] -> tensor


def gguf_type_name(tensor_type: Any) -> str:
    """The GGML type's name (an IntEnum from gguf, or a plain int id)."""
    name = getattr(tensor_type, "name", None)
    return name if isinstance(name, str) else TYPE_NAMES.get(int(tensor_type), str(tensor_type))


def blocks_to_quantized(data: np.ndarray, tensor_type: Any) -> QuantizedTensor | None:
    """A GGUF tensor's raw block bytes (GGUFReader's tensor.data: uint8 [rows, bytes per row])
    as a QuantizedTensor of logical shape [rows, row elements], or None for a type (or a
    layout) that is not converted."""
    block_type = _BLOCK_TYPES.get(int(tensor_type))
    if block_type is None or data.ndim != 2 or data.dtype != np.uint8:
        return None
    rows, row_bytes = data.shape
    if rows == 0 or row_bytes == 0 or row_bytes % block_type.nbytes:
        return None
    blocks = np.ascontiguousarray(data).reshape(rows, row_bytes // block_type.nbytes, -1)
    return block_type.convert(blocks)


# --- the block layouts ------------------------------------------------------------------------


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of every block: [n, blocks]."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., m] -> [..., 2m] values: the low nibbles of all m bytes, then the high ones
    (the element order of Q4_0/Q4_1/Q5_0 blocks and of each 64-weight run of Q4_K)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _rows(values: np.ndarray) -> np.ndarray:
    """[n, blocks, ...] -> [n, k]."""
    return values.reshape(values.shape[0], -1)


def _int4(q: np.ndarray) -> torch.Tensor:
    """Values 0..15 [n, blocks, ...] -> format.pack_int4's bytes (k is even: whole blocks),
    packed in numpy, which is several times faster than torch's strided uint8 ops here."""
    rows = _rows(q)
    return torch.from_numpy(np.ascontiguousarray(rows[:, 0::2] | (rows[:, 1::2] << 4)))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _shape(blocks: np.ndarray, elements: int) -> tuple[int, int]:
    return (blocks.shape[0], blocks.shape[1] * elements)


def _q8_0(blocks: np.ndarray) -> QuantizedTensor:
    # d (f16) | 32 x int8
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return QuantizedTensor(
        "int8", _shape(blocks, 32), (1, 32), _tensor(_rows(q)), _tensor(_f16(blocks, 0))
    )


def _q4_0(blocks: np.ndarray) -> QuantizedTensor:
    # d (f16) | 16 bytes: w = d * (q - 8)  ->  q * d + (-8 d)
    d = _f16(blocks, 0)
    offsets = -8.0 * d.astype(np.float32)
    if np.abs(offsets).max(initial=0.0) <= F16_MAX:
        scales, offsets = d, offsets.astype(np.float16)  # exact: a power-of-two multiple
    else:
        scales = d.astype(np.float32)
    q = _nibbles_split(blocks[..., 2:])
    return QuantizedTensor(
        "int4", _shape(blocks, 32), (1, 32), _int4(q), _tensor(scales), _tensor(offsets)
    )


def _q4_1(blocks: np.ndarray) -> QuantizedTensor:
    # d (f16) | m (f16) | 16 bytes: w = d * q + m
    q = _nibbles_split(blocks[..., 4:])
    return QuantizedTensor(
        "int4",
        _shape(blocks, 32),
        (1, 32),
        _int4(q),
        _tensor(_f16(blocks, 0)),
        _tensor(_f16(blocks, 2)),
    )


def _q5_0(blocks: np.ndarray) -> QuantizedTensor:
    # d (f16) | qh: bit j of a little-endian u32 is bit 4 of weight j | 16 bytes of low nibbles
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # [n, b, 32]
    q = (_nibbles_split(blocks[..., 6:]) | (high << 4)).astype(np.int8) - np.int8(16)
    return QuantizedTensor(
        "int8", _shape(blocks, 32), (1, 32), _tensor(_rows(q)), _tensor(_f16(blocks, 0))
    )


def _k4_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K super-block from its 12 bytes [..., 12].
    Bytes 0-3: scales 0-3 (low 6 bits); 4-7: mins 0-3; 8-11: low nibble = low 4 bits of scale
    4-7, high nibble = low 4 bits of min 4-7; the top 2 bits of bytes 0-3 / 4-7 complete scales
    / mins 4-7."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)), axis=-1)
    mins = np.concatenate((b & 0x3F, (c >> 4) | ((b >> 6) << 4)), axis=-1)
    return scales, mins


def _q4_k(blocks: np.ndarray) -> QuantizedTensor:
    # d (f16) | dmin (f16) | 12 bytes of scales/mins | 128 bytes: 4 runs of 64 weights, each run
    # the low nibbles of its 32 bytes then the high ones. Sub-block i (32 weights): d*sc_i, m_i.
    n, nb = blocks.shape[:2]
    sc, m = _k4_scale_min(blocks[..., 4:16])
    d = _f16(blocks, 0).astype(np.float32)[..., None]
    dmin = _f16(blocks, 2).astype(np.float32)[..., None]
    scales = (d * sc.astype(np.float32)).reshape(n, nb * 8)  # exact: 11 x 6 bits
    offsets = -(dmin * m.astype(np.float32)).reshape(n, nb * 8)
    q = _nibbles_split(blocks[..., 16:].reshape(n, nb, 4, 32))
    return QuantizedTensor(
        "int4", _shape(blocks, QK_K), (1, 32), _int4(q), _tensor(scales), _tensor(offsets)
    )


def _q6_k(blocks: np.ndarray) -> QuantizedTensor:
    # ql (128) | qh (64) | 16 x int8 scales | d (f16). Two halves of 128 weights; in half h,
    # weight 32j + l (j = 0..3, l = 0..31) has low 4 bits from nibble (j // 2) of
    # ql[64h + 32 (j % 2) + l] and high 2 bits from bits 2j..2j+1 of qh[32h + l].
    n, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n, nb, 2, 2, 32)  # [half, j % 2, l]
    low = np.concatenate((ql & 0x0F, ql >> 4), axis=3)  # [half, j, l]
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 0x03
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blocks, 208).astype(np.float32)[..., None]
    scales = (d * sc).reshape(n, nb * 16)  # exact: 11 x 8 bits
    return QuantizedTensor(
        "int8", _shape(blocks, QK_K), (1, 16), _tensor(_rows(q)), _tensor(scales)
    )


_BLOCK_TYPES: dict[int, _BlockType] = {
    Q8_0: _BlockType(32, 34, _q8_0),
    Q4_0: _BlockType(32, 18, _q4_0),
    Q4_1: _BlockType(32, 20, _q4_1),
    Q5_0: _BlockType(32, 22, _q5_0),
    Q4_K: _BlockType(QK_K, 144, _q4_k),
    Q6_K: _BlockType(QK_K, 210, _q6_k),
}


# --- a GGUF file's weights under Hugging Face names -------------------------------------------

# The weights worth keeping quantized: linear projections and the embedding / output tables.
_LINEAR = re.compile(r"(_proj|embed_tokens|lm_head)\.weight$")
# llama.cpp permutes the rows of llama's q/k for its rotary layout; transformers undoes it.
_PERMUTED_ARCHITECTURES = ("llama",)


@dataclass
class GgufConversion:
    """What came out of a GGUF file: the converted weights, and why the others were not."""

    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # HF name -> reason
    types: Counter[str] = field(default_factory=Counter)  # GGUF type -> converted tensors
    inexact: list[str] = field(default_factory=list)  # matched within float32 rounding only


def gguf_quantized_state(
    gguf_path: str | Path,
    dense_state: Mapping[str, torch.Tensor],
    config: Any,
    *,
    reader: Any = None,
) -> dict[str, QuantizedTensor]:
    """For each linear weight of `dense_state` (the state transformers de-quantized from
    `gguf_path`), the QuantizedTensor read straight from the file's blocks, verified to
    de-quantize to that dense tensor. Weights that are not converted (other block types) or
    that fail the check are left out: the caller keeps them dense. Mismatches are warned."""
    result = convert_gguf(gguf_path, dense_state, config, reader=reader)
    mismatched = {n: r for n, r in result.skipped.items() if r.startswith("mismatch")}
    if mismatched:
        listing = "; ".join(f"{n}: {r}" for n, r in sorted(mismatched.items()))
        warnings.warn(f"{gguf_path}: kept dense, not quantized: {listing}", stacklevel=2)
    return result.tensors


def convert_gguf(
    gguf_path: str | Path,
    dense_state: Mapping[str, torch.Tensor],
    config: Any,
    *,
    reader: Any = None,
) -> GgufConversion:
    """gguf_quantized_state with the details: per-tensor reasons and the types converted.
    `reader`: a gguf.GGUFReader of that file already open (it parses all the metadata, the
    tokenizer's included, which takes seconds for a large vocabulary)."""
    if reader is None:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_path))
    architecture = _architecture(reader)
    file_tensors = {t.name: t for t in reader.tensors}
    names = _name_map(architecture, dense_state, config)
    result = GgufConversion()
    converted: dict[str, QuantizedTensor | None] = {}  # a tied lm_head reuses the embedding's
    for hf_name, dense in dense_state.items():
        if not (_LINEAR.search(hf_name) and dense.ndim == 2):
            continue
        gguf_name = names(hf_name)
        if gguf_name not in file_tensors and hf_name.endswith("lm_head.weight"):
            gguf_name = "token_embd.weight"  # tied: the file stores the table once
        tensor = file_tensors.get(gguf_name) if gguf_name else None
        if tensor is None:
            result.skipped[hf_name] = f"no GGUF tensor ({gguf_name or 'name not mapped'})"
            continue
        if gguf_name not in converted:
            converted[gguf_name] = blocks_to_quantized(np.asarray(tensor.data), tensor.tensor_type)
        qt = converted[gguf_name]
        type_name = gguf_type_name(tensor.tensor_type)
        if qt is None:
            result.skipped[hf_name] = f"{gguf_name}: {type_name} is not converted"
            continue
        if architecture in _PERMUTED_ARCHITECTURES and _is_q_or_k(gguf_name):
            qt = _permute_rows(qt, _rope_heads(gguf_name, config))
        verdict = _compare(qt, dense)
        if verdict not in ("exact", "rounding"):
            result.skipped[hf_name] = f"mismatch with the dense tensor ({gguf_name}: {verdict})"
            continue
        if verdict == "rounding":
            result.inexact.append(hf_name)
        result.tensors[hf_name] = qt
        result.types[type_name] += 1
    return result


def _architecture(reader: Any) -> str:
    field_ = reader.fields.get("general.architecture")
    if field_ is None:
        return ""
    return bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")


def _name_map(
    architecture: str, dense_state: Mapping[str, torch.Tensor], config: Any
) -> Callable[[str], str | None]:
    """HF weight name -> GGUF tensor name, by gguf's own table for the file's architecture."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == architecture), None)
    if arch is None:
        return lambda _name: None
    layers = config_value(config, "num_hidden_layers") or _count_layers(dense_state)
    table = get_tensor_name_map(arch, int(layers))

    def lookup(hf_name: str) -> str | None:
        base = hf_name.removesuffix(".weight")
        found = table.get_name(base)
        return None if found is None else f"{found}.weight"

    return lookup


def _count_layers(dense_state: Mapping[str, torch.Tensor]) -> int:
    layers = [int(m.group(1)) for n in dense_state if (m := re.search(r"layers\.(\d+)\.", n))]
    return max(layers, default=-1) + 1


def _is_q_or_k(gguf_name: str) -> bool:
    return gguf_name.endswith((".attn_q.weight", ".attn_k.weight"))


def _rope_heads(gguf_name: str, config: Any) -> int | None:
    """The head count llama.cpp permuted a q (attention heads) or k (KV heads) weight by."""
    heads = config_value(config, "num_attention_heads")
    if gguf_name.endswith(".attn_k.weight"):
        heads = config_value(config, "num_key_value_heads") or heads
    return None if heads is None else int(heads)


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row i of the Hugging Face weight is row order[i] of the GGUF one: within each head,
    GGUF interleaves the two rotary halves (row pairs), HF stores them one after the other."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)


def _permute_rows(qt: QuantizedTensor, heads: int | None) -> QuantizedTensor:
    if not heads or qt.shape[0] % (2 * heads):
        return qt  # cannot be the rotary layout; the comparison will tell
    order = rope_row_order(qt.shape[0], heads)
    pick = lambda t: None if t is None else t[order].contiguous()  # noqa: E731
    return QuantizedTensor(
        qt.scheme, qt.shape, qt.block, pick(qt.qweight), pick(qt.scales), pick(qt.offsets)
    )


def _compare(qt: QuantizedTensor, dense: torch.Tensor, chunk_elements: int = 1 << 22) -> str:
    """ "exact", "rounding" (within float32 rounding: transformers did arithmetic after
    de-quantizing) or what differs; compared in row chunks to bound memory."""
    if tuple(dense.shape) != qt.shape:
        return f"shape {list(qt.shape)} vs {list(dense.shape)}"
    step = max(1, chunk_elements // max(1, qt.shape[1]))
    exact = True
    for start in range(0, qt.shape[0], step):
        stop = min(start + step, qt.shape[0])
        ours = _dequantize_rows(qt, start, stop).to(dense.dtype)
        theirs = dense[start:stop]
        if torch.equal(ours, theirs):
            continue
        exact = False
        ours32, theirs32 = ours.to(torch.float32), theirs.to(torch.float32)
        tolerance = math.ldexp(1.0, -22) * theirs32.abs()  # a float32 rounding or two
        worst = float((ours32 - theirs32).abs().sub(tolerance).max())
        if not worst <= 0.0:
            diff = float((ours32 - theirs32).abs().max())
            return f"max abs difference {diff:.3g} in rows {start}..{stop - 1}"
    return "exact" if exact else "rounding"


def _dequantize_rows(qt: QuantizedTensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of qt.dequantize(torch.float32): the same products and sums, but
    broadcast over whole groups (GGUF rows are whole blocks) rather than expanded scales,
    several times faster on a large table."""
    n, k = qt.shape
    group = qt.block[1]
    if k % group:
        index = torch.arange(start, stop)
        return qt.rows(index, torch.float32)
    packed = qt.qweight[start:stop]
    if qt.scheme == "int4":
        q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(stop - start, k)
    else:
        q = packed
    grouped = q.to(torch.float32).reshape(stop - start, k // group, group)
    w = grouped * qt.scales[start:stop].to(torch.float32).unsqueeze(-1)
    if qt.offsets is not None:
        w = w + qt.offsets[start:stop].to(torch.float32).unsqueeze(-1)
    return w.reshape(stop - start, k)
