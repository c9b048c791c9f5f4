"""Quantized Hugging Face checkpoints -> QuantizedTensor, read straight from the safetensors
shards (never de-quantized through transformers).

Served: AWQ gemm int4 and GPTQ int4/int8 (awq_gptq.py), compressed-tensors int4/int8/fp8
(compressed.py), transformers' own fp8 (fp8.py). detect_scheme refuses every other method
with a SnapshotError that names it. Build time only: no transformers import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snapshot.errors import SnapshotError
from snapshot.quant.awq_gptq import convert_awq, convert_gptq, describe_awq, describe_gptq
from snapshot.quant.compressed import convert_compressed, describe_compressed
from snapshot.quant.format import QuantizedTensor
from snapshot.quant.fp8 import convert_fp8, describe_fp8
from snapshot.tensorfile import read_header

SERVED = "thaw serves awq (gemm, 4-bit), gptq (4/8-bit), compressed-tensors (int4/int8/fp8), fp8"
DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "awq": describe_awq,
    "gptq": describe_gptq,
    "compressed-tensors": describe_compressed,
    "fp8": describe_fp8,
}
# Older tools wrote their settings next to config.json instead of into it.
LEGACY_CONFIGS = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


@dataclass
class QuantizedCheckpoint:
    """A quantized checkpoint's weights: keys are the dense Hugging Face names."""

    quantized: dict[str, QuantizedTensor]  # "model.layers.0.self_attn.q_proj.weight" -> ...
    dense: dict[str, torch.Tensor]  # every other tensor, as stored
    scheme: str  # e.g. "awq int4 g128"
    # Activation / KV-cache scales the checkpoint carries and thaw does not use.
    ignored: list[str] = field(default_factory=list)


def detect_scheme(config: dict[str, Any]) -> str | None:
    """What config.json's quantization_config describes, e.g. "gptq int4 g128 sym (gptq)";
    None for a dense checkpoint. SnapshotError for a method or variant thaw does not serve."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SnapshotError("config.json: quantization_config is not an object")
    method = _method(qc)
    describe = DESCRIBE.get(method)
    if describe is None:
        raise SnapshotError(f"quantization method {method!r} is not served; {SERVED}")
    return describe(qc)


def load_quantized_checkpoint(directory: Path) -> QuantizedCheckpoint:
    """Read a quantized Hugging Face directory (config.json + safetensors, one file or an
    index of shards) into QuantizedTensors; SnapshotError naming the problem otherwise."""
    directory = Path(directory)
    config = read_config(directory)
    scheme = detect_scheme(config)
    if scheme is None:
        raise SnapshotError(f"{directory}: config.json has no quantization_config (not quantized)")
    qc = config["quantization_config"]
    tensors = read_tensors(directory)
    method = _method(qc)
    ignored: list[str] = []
    if method == "awq":
        quantized, dense = convert_awq(tensors, qc)
    elif method == "gptq":
        quantized, dense = convert_gptq(tensors, qc)
    elif method == "compressed-tensors":
        quantized, dense, ignored = convert_compressed(tensors, qc)
    else:
        quantized, dense, ignored = convert_fp8(tensors, qc)
    if not quantized:
        raise SnapshotError(f"{directory}: {scheme} checkpoint without any quantized weight")
    for name in ignored:
        dense.pop(name, None)
    return QuantizedCheckpoint(quantized, dense, scheme, sorted(ignored))


def read_config(directory: Path) -> dict[str, Any]:
    """config.json, with a legacy quantize_config.json / quant_config.json folded in."""
    config = _read_json(directory / "config.json")
    if "quantization_config" not in config:
        for file_name, method in LEGACY_CONFIGS:
            if (directory / file_name).is_file():
                legacy = _read_json(directory / file_name)
                config["quantization_config"] = {"quant_method": method, **legacy}
                break
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (the index's shards, else
    model.safetensors, else every *.safetensors)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in _shards(directory):
        names = read_header(path).tensors  # checks the header; SnapshotError if corrupted
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    if name in tensors:
                        raise SnapshotError(f"{path.name}: tensor {name} is also in another shard")
                    tensors[name] = f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise SnapshotError(f"{path.name}: cannot read ({exc})") from exc
    return tensors


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SnapshotError(f"{index.name}: no weight_map")
        files = sorted(set(map(str, weight_map.values())))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise SnapshotError(f"{index.name}: shard {missing[0]} is missing")
        return [directory / f for f in files]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise SnapshotError(
            f"{directory}: no safetensors weights (quantized checkpoints are read from safetensors)"
        )
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise SnapshotError(f"{path}: not a JSON object")
    return data


def _method(qc: dict[str, Any]) -> str:
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"
    if not isinstance(method, str):
        raise SnapshotError(f"quantization_config without a quant_method ({method!r}); {SERVED}")
    return method.lower()
