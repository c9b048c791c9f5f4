"""AWQ (autoawq "gemm") and GPTQ (auto-gptq / optimum / gptqmodel "gptq", "gptq_v2")
checkpoints -> QuantizedTensor.

Both store the transposed weight W^T [k, n] as int32 words, with per-group scales [G, n] and
packed zero points [G, n * bits / 32], G = ceil(k / group); W = (q - z) * s.

AWQ gemm: qweight [k, n / 8], packed along n; within a word the 8 nibbles hold the columns
    in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column AWQ_ORDER[i]); qzeros the same.
GPTQ: qweight [k * bits / 32, n], packed along k, lowest bits first; qzeros packed along n.
    The classic format ("gptq") stores z - 1 in `bits` bits, so a quantizer's z = 0 wraps to
    2**bits - 1: z = (stored + 1) mod 2**bits, the value the weights were quantized with
    (auto-gptq's torch dequantization; kernels that read 2**bits there are the bug gptq_v2
    fixed); "gptq_v2" stores z. g_idx [k] maps each input column to its group; only
    the trivial i // group is served (act-order checkpoints permute it).
"""

from __future__ import annotations

from typing import Any

import torch

from snapshot.errors import SnapshotError
from snapshot.quant.format import QuantizedTensor
from snapshot.quant.packing import expect_shape, int_tensor, require, split_modules, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
GPTQ_FORMATS = ("gptq", "gptq_v2")
SERVED = "thaw serves AWQ gemm 4-bit and GPTQ 4/8-bit (gptq, gptq_v2)"


def describe_awq(qc: dict[str, Any]) -> str:
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if str(qc.get("backend", "")).lower() == "llm-awq":
        version = "llm-awq"
    if version != "gemm":
        raise SnapshotError(f"AWQ version {version!r} is not served; {SERVED}")
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise SnapshotError(f"AWQ with bits={bits} is not served; {SERVED}")
    if qc.get("zero_point", True) is False:
        raise SnapshotError(f"AWQ without zero points (zero_point=false) is not served; {SERVED}")
    return f"awq int4 {_group_text(_group(qc, 'AWQ'))}"


def describe_gptq(qc: dict[str, Any]) -> str:
    bits = qc.get("bits")
    if bits not in (4, 8):
        raise SnapshotError(f"GPTQ with bits={bits} is not served; {SERVED}")
    fmt = _gptq_format(qc)
    if fmt not in GPTQ_FORMATS:
        raise SnapshotError(f"GPTQ checkpoint format {fmt!r} is not served; {SERVED}")
    pack = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack != "int32":
        raise SnapshotError(f"GPTQ packed in {pack} is not served (int32 only); {SERVED}")
    sym = "sym" if qc.get("sym", True) else "asym"
    act = " act-order" if qc.get("desc_act") else ""
    return f"gptq int{bits} {_group_text(_group(qc, 'GPTQ'))} {sym}{act} ({fmt})"


def convert_awq(
    tensors: dict[str, torch.Tensor], qc: dict[str, Any]
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    describe_awq(qc)
    group = _group(qc, "AWQ")
    modules, dense = split_modules(tensors, AWQ_SUFFIXES)
    quantized = {}
    for module, parts in modules.items():
        require(module, parts, AWQ_SUFFIXES, "AWQ")
        quantized[f"{module}.weight"] = _awq_linear(module, parts, group)
    return quantized, dense


def convert_gptq(
    tensors: dict[str, torch.Tensor], qc: dict[str, Any]
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    describe_gptq(qc)
    bits, group = int(qc["bits"]), _group(qc, "GPTQ")
    v1 = _gptq_format(qc) == "gptq"
    modules, dense = split_modules(tensors, GPTQ_SUFFIXES)
    quantized = {}
    for module, parts in modules.items():
        require(module, parts, ("qweight", "qzeros", "scales"), "GPTQ")
        quantized[f"{module}.weight"] = _gptq_linear(module, parts, bits, group, v1)
    return quantized, dense


def _awq_linear(module: str, parts: dict[str, torch.Tensor], group: int) -> QuantizedTensor:
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    _two_dims(module, parts)
    groups, n = scales.shape
    k = qweight.shape[0]
    g = group if group > 0 else k
    expect_shape(f"{module}.qweight", qweight, (k, (n + 7) // 8))
    expect_shape(f"{module}.scales", scales, (-(-k // g), n))
    expect_shape(f"{module}.qzeros", qzeros, (groups, (n + 7) // 8))
    q = _awq_columns(unpack_int32(qweight, 4, qweight.shape[1] * 8, f"{module}.qweight"), n)
    z = _awq_columns(unpack_int32(qzeros, 4, qzeros.shape[1] * 8, f"{module}.qzeros"), n)
    return int_tensor(module, q.T, z.T, scales.T, 4, g, signed=False)


def _awq_columns(values: torch.Tensor, n: int) -> torch.Tensor:
    """Nibble-order values [rows, 8 * words] -> columns in order [rows, n]."""
    rows, width = values.shape
    # Nibble i of each word holds column AWQ_ORDER[i]: scatter them back into place.
    order = torch.tensor(AWQ_ORDER)
    columns = torch.empty_like(values).view(rows, width // 8, 8)
    columns[:, :, order] = values.view(rows, width // 8, 8)
    return columns.reshape(rows, width)[:, :n]


def _gptq_linear(
    module: str, parts: dict[str, torch.Tensor], bits: int, group: int, v1: bool
) -> QuantizedTensor:
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    _two_dims(module, parts)
    groups, n = scales.shape
    per_word = 32 // bits
    expect_shape(f"{module}.qweight", qweight, (qweight.shape[0], n))
    k = qweight.shape[0] * per_word
    g = group if group > 0 else k
    expect_shape(f"{module}.scales", scales, (-(-k // g), n))
    expect_shape(f"{module}.qzeros", qzeros, (groups, -(-n // per_word)))
    q = unpack_int32(qweight.T, bits, k, f"{module}.qweight")  # [n, k]
    z = unpack_int32(qzeros, bits, n, f"{module}.qzeros")  # [G, n]
    if v1:
        # The classic format stores z - 1, so z = 0 was saved as 2**bits - 1: read it back
        # modulo 2**bits (auto-gptq's torch path does; old CUDA kernels read 2**bits there).
        z = (z + 1) & ((1 << bits) - 1)
    if "g_idx" in parts:
        _check_g_idx(module, parts["g_idx"], k, g)
    return int_tensor(module, q, z.T, scales.T, bits, g, signed=False)


def _check_g_idx(module: str, g_idx: torch.Tensor, k: int, group: int) -> None:
    expect_shape(f"{module}.g_idx", g_idx, (k,))
    trivial = torch.arange(k, dtype=torch.int64) // group
    if not torch.equal(g_idx.to(torch.int64), trivial):
        raise SnapshotError(
            f"GPTQ checkpoint: {module}.g_idx is not i // {group} (act-order / desc_act "
            f"reorders the groups); {SERVED} without act-order"
        )


def _two_dims(module: str, parts: dict[str, torch.Tensor]) -> None:
    for suffix, tensor in parts.items():
        if suffix != "g_idx" and tensor.dim() != 2:
            raise SnapshotError(f"{module}.{suffix}: {tensor.dim()} dimensions, expected 2")


def _group(qc: dict[str, Any], method: str) -> int:
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
        raise SnapshotError(f"{method}: group_size {group!r} is not a positive integer or -1")
    return group


def _group_text(group: int) -> str:
    return "per-channel" if group == -1 else f"g{group}"


def _gptq_format(qc: dict[str, Any]) -> str:
    return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
