"""compressed-tensors checkpoints (llm-compressor output, quant_method "compressed-tensors")
-> QuantizedTensor.

Per quantized module X (whose scheme is the config group targeting it, matched as
compressed-tensors does: exact name, then "re:" regex, then class name):
  pack-quantized     X.weight_packed int32 [n, k * bits / 32]: values + 2**(bits-1), packed
                     along k lowest bits first; X.weight_shape [n, k]; X.weight_zero_point
                     (asymmetric group/channel) int32 packed the same way along n:
                     [n * bits / 32, G]
  naive-quantized /  X.weight int8 (signed) or float8_e4m3fn [n, k]; X.weight_zero_point
  int-quantized /    int8 [n, G] when asymmetric
  float-quantized
  X.weight_scale: [1] (tensor), [n, 1] (channel), [n, k / g] (group),
  [n / bn, k / bk] (block); W = (q - z) * s. Activation and KV-cache scales are dropped
  (thaw runs the weights only).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from snapshot.errors import SnapshotError
from snapshot.quant.format import QuantizedTensor
from snapshot.quant.fp8 import fp8_tensor
from snapshot.quant.packing import expect_shape, int_tensor, split_modules, unpack_int32

# format -> the weight types it stores
KINDS = {
    "pack-quantized": ("int",),
    "naive-quantized": ("int", "float"),
    "int-quantized": ("int",),
    "float-quantized": ("float",),
}
STRATEGIES = ("tensor", "channel", "group", "block")
WEIGHT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
WEIGHT_PARTS += ("weight_g_idx",)
DROPPED = ("input_scale", "input_zero_point", "input_global_scale", "output_scale")
DROPPED += ("output_zero_point", "k_scale", "v_scale", "q_scale")
SERVED = (
    "thaw serves compressed-tensors pack-quantized / naive-quantized / int-quantized int4 and "
    "int8 weights and float-quantized fp8 e4m3 weights (tensor, channel, group or block scales)"
)


def describe_compressed(qc: dict[str, Any]) -> str:
    groups = _groups(qc)
    return "compressed-tensors " + "; ".join(
        _describe_group(_group_format(qc, g), g["weights"]) for g in groups.values()
    )


def convert_compressed(
    tensors: dict[str, torch.Tensor], qc: dict[str, Any]
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor], list[str]]:
    groups = _groups(qc)
    modules, rest = split_modules(tensors, WEIGHT_PARTS + DROPPED)
    quantized: dict[str, QuantizedTensor] = {}
    ignored: list[str] = []
    for module, parts in modules.items():
        ignored += [f"{module}.{s}" for s in DROPPED if s in parts]
        if not any(s in parts for s in WEIGHT_PARTS):
            continue
        if "weight_scale" not in parts:
            raise SnapshotError(
                f"compressed-tensors checkpoint: {module} has {', '.join(sorted(parts))} but "
                "no weight_scale (incomplete or corrupted checkpoint)"
            )
        group = _match(module, groups, qc.get("ignore") or [])
        fmt, args = _group_format(qc, group), group["weights"]
        name = f"{module}.weight"
        weight = parts.get("weight_packed") if fmt == "pack-quantized" else rest.pop(name, None)
        if weight is None:
            missing = "weight_packed" if fmt == "pack-quantized" else "weight"
            raise SnapshotError(
                f"compressed-tensors checkpoint: {module} has a weight_scale but no {missing} "
                f"({fmt})"
            )
        quantized[name] = _convert(name, fmt, args, weight, parts)
    return quantized, rest, ignored


def _groups(qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise SnapshotError(
            f"compressed-tensors checkpoint with quantization_status {status!r}: the weights are "
            f"not stored compressed; {SERVED}"
        )
    if qc.get("sparsity_config"):
        raise SnapshotError(
            f"compressed-tensors sparsity (sparsity_config) is not served; {SERVED}"
        )
    if qc.get("transform_config"):
        raise SnapshotError(
            f"compressed-tensors transforms (transform_config: rotations) are not served; {SERVED}"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise SnapshotError(
            "compressed-tensors checkpoint: quantization_config has no config_groups"
        )
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise SnapshotError(
                f"compressed-tensors config group {name!r} quantizes no weights; {SERVED}"
            )
        _describe_group(_group_format(qc, group), group["weights"])  # raises if not served
    return groups


def _group_format(qc: dict[str, Any], group: dict[str, Any]) -> str:
    fmt = group.get("format") or qc.get("format")
    if fmt not in KINDS:
        raise SnapshotError(f"compressed-tensors format {fmt!r} is not served; {SERVED}")
    return str(fmt)


def _describe_group(fmt: str, args: dict[str, Any]) -> str:
    kind, bits = args.get("type", "int"), args.get("num_bits")
    strategy = args.get("strategy")
    if args.get("dynamic"):
        raise SnapshotError(f"compressed-tensors dynamic weight scales are not served; {SERVED}")
    if kind not in KINDS[fmt]:
        raise SnapshotError(f"compressed-tensors {fmt} with {kind} weights: not served; {SERVED}")
    if bits not in ((4, 8) if kind == "int" else (8,)):
        raise SnapshotError(
            f"compressed-tensors {kind} weights with {bits} bits: not served; {SERVED}"
        )
    if strategy not in STRATEGIES:
        raise SnapshotError(f"compressed-tensors {strategy!r} weight scales: not served; {SERVED}")
    if kind == "float" and not args.get("symmetric", True):
        raise SnapshotError(f"compressed-tensors asymmetric fp8 weights: not served; {SERVED}")
    detail = {
        "group": f"g{args.get('group_size')}",
        "block": "block {}x{}".format(*(args.get("block_structure") or ["?", "?"])),
    }.get(str(strategy), f"per-{strategy}")
    sym = "sym" if args.get("symmetric", True) else "asym"
    name = "fp8" if kind == "float" else f"int{bits}"
    return f"{fmt} {name} {detail} {sym}"


def _match(module: str, groups: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """The config group of `module`, by compressed-tensors' precedence of targets."""
    by_target = {t: g for g in groups.values() for t in g.get("targets") or []}
    exact = [t for t in by_target if not t.startswith("re:") and t == module]
    regex = sorted(t for t in by_target if t.startswith("re:") and re.match(t[3:], module))
    classes = [t for t in by_target if not t.startswith("re:") and _class_matches(module, t)]
    for target in exact + regex + classes:
        return by_target[target]
    raise SnapshotError(
        f"compressed-tensors checkpoint: {module} has quantized weights but no config group "
        f"targets it (targets {sorted(by_target)}, ignore {ignore})"
    )


def _class_matches(module: str, target: str) -> bool:
    # Without the model, a quantized module's class is told by its name: embeddings are
    # named *embed*, every other quantized module of a causal LM is a Linear.
    is_embedding = "embed" in module.rpartition(".")[2]
    return target == ("Embedding" if is_embedding else "Linear")


def _convert(
    name: str, fmt: str, args: dict[str, Any], weight: torch.Tensor, parts: dict[str, Any]
) -> QuantizedTensor:
    bits, strategy = int(args["num_bits"]), str(args["strategy"])
    if fmt == "pack-quantized":
        n, k = _weight_shape(name, parts.get("weight_shape"), weight)
    elif weight.dim() == 2:
        n, k = weight.shape
    else:
        raise SnapshotError(f"{name}: {weight.dim()} dimensions, expected 2")
    group, block_rows = _block(name, strategy, args, n, k)
    scale = parts["weight_scale"]
    grid = (-(-n // block_rows), -(-k // group))
    if scale.numel() == 1 and grid == (1, 1):
        scale = scale.reshape(1, 1)
    expect_shape(f"{name[: -len('.weight')]}.weight_scale", scale, grid)
    if "weight_g_idx" in parts:
        _check_g_idx(name, parts["weight_g_idx"], k, group)
    if args.get("type") == "float":
        block = [block_rows, group]
        return fp8_tensor(name, weight, scale, block)
    zeros = _zero_points(name, fmt, args, parts, n, grid)
    q = _int_values(name, fmt, bits, weight, k)
    # Integer blocks span one row: repeat a block-row's scales over its rows (exact).
    rows = lambda t: None if t is None else t.repeat_interleave(block_rows, dim=0)[:n]  # noqa: E731
    return int_tensor(name, q, rows(zeros), rows(scale), bits, group, signed=True)


def _weight_shape(name: str, shape: torch.Tensor | None, packed: torch.Tensor) -> tuple[int, int]:
    if shape is None:
        raise SnapshotError(f"{name}: pack-quantized weight without weight_shape")
    dims = [int(d) for d in shape.reshape(-1).tolist()]
    if len(dims) != 2 or packed.dim() != 2 or dims[0] != packed.shape[0]:
        raise SnapshotError(
            f"{name}: weight_shape {dims} does not fit weight_packed {list(packed.shape)}"
        )
    return dims[0], dims[1]


def _block(name: str, strategy: str, args: dict[str, Any], n: int, k: int) -> tuple[int, int]:
    """(group along k, rows per block) of the scale grid."""
    if strategy == "tensor":
        return k, n
    if strategy == "channel":
        return k, 1
    if strategy == "group":
        group = args.get("group_size")
        if not isinstance(group, int) or group <= 0:
            raise SnapshotError(f"{name}: group strategy with group_size {group!r}")
        return group, 1
    block = args.get("block_structure")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise SnapshotError(f"{name}: block strategy with block_structure {block!r}")
    return block[1], block[0]


def _check_g_idx(name: str, g_idx: torch.Tensor, k: int, group: int) -> None:
    trivial = torch.arange(k, dtype=torch.int64) // group
    if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int64), trivial):
        raise SnapshotError(
            f"{name}: weight_g_idx is not i // {group} (activation ordering reorders the "
            f"groups); {SERVED} without actorder=group"
        )


def _int_values(name: str, fmt: str, bits: int, weight: torch.Tensor, k: int) -> torch.Tensor:
    if fmt == "pack-quantized":
        unsigned = unpack_int32(weight, bits, k, f"{name}_packed")
        return unsigned - (1 << (bits - 1))
    if weight.dtype != torch.int8:
        raise SnapshotError(f"{name}: {fmt} int weight stored as {weight.dtype}, expected int8")
    return weight.to(torch.int32)


def _zero_points(
    name: str, fmt: str, args: dict[str, Any], parts: dict[str, Any], n: int, grid: tuple[int, int]
) -> torch.Tensor | None:
    zp = parts.get("weight_zero_point")
    where = f"{name[: -len('.weight')]}.weight_zero_point"
    if args.get("symmetric", True):
        if zp is not None and bool(zp.ne(0).any()) and fmt != "pack-quantized":
            raise SnapshotError(f"{where}: non-zero zero points in a symmetric scheme")
        return None
    if zp is None:
        raise SnapshotError(f"{where}: missing (asymmetric scheme)")
    bits = int(args["num_bits"])
    if fmt == "pack-quantized" and args["strategy"] in ("group", "channel"):
        # Packed along n (dim 0), each value + 2**(bits-1), like the weight.
        expect_shape(where, zp, (-(-n * bits // 32), grid[1]))
        return (unpack_int32(zp.T, bits, n, where) - (1 << (bits - 1))).T
    if zp.numel() == 1 and grid == (1, 1):
        zp = zp.reshape(1, 1)
    expect_shape(where, zp, grid)
    if zp.is_floating_point() and not torch.equal(zp, zp.round()):
        raise SnapshotError(f"{where}: zero points are not integers")
    return zp.to(torch.int32)
