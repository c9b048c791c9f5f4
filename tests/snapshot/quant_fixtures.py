"""Tiny quantized Llama checkpoints on disk, one per format snapshot.quant.checkpoints reads.

compressed-tensors checkpoints are made by the real package (apply_quantization_config, then
ModelCompressor compresses and writes the config), so their layout is the library's own.
autoawq and auto-gptq / gptqmodel need CUDA to quantize, so the AWQ and GPTQ checkpoints are
written here from their format specifications (the layouts described in
snapshot/quant/awq_gptq.py), as is transformers' fp8 format; each returns the float32
reference W = (q - z) * s (or q * s) computed from the integer values before packing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Fixture:
    directory: Path
    linears: list[str]  # "model.layers.0.self_attn.q_proj" ...
    dense: dict[str, torch.Tensor]  # the tensors that stay unquantized, as written
    reference: dict[str, torch.Tensor]  # "X.weight" -> float32 W (empty for compressed-tensors)


def tiny_llama(dtype: torch.dtype = torch.float16) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def linear_names(model: Any) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    ]


def write_checkpoint(
    directory: Path,
    model: Any,
    quantization_config: dict[str, Any] | None,
    tensors: dict[str, torch.Tensor],
) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))


def _dense_state(model: Any, linears: list[str]) -> dict[str, torch.Tensor]:
    skip = {f"{name}.weight" for name in linears}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in skip}


def _expand(grid: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    return grid.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]


def _pack_lsb_first(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, m] unsigned values -> [rows, m * bits / 32] int32, element i at bits i * bits."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], -1, per)
    words = sum(v[:, :, j] << (bits * j) for j in range(per))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement wrap


def _random_scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 0.02 + 0.001).to(torch.float16)


def awq_checkpoint(directory: Path, group: int = 32) -> Fixture:
    """autoawq gemm: qweight [k, n/8] (AWQ nibble order), qzeros [k/g, n/8], scales [k/g, n]."""
    model = tiny_llama()
    linears = linear_names(model)
    gen = torch.Generator().manual_seed(1)
    tensors = _dense_state(model, linears)
    dense = dict(tensors)
    reference = {}
    for name in linears:
        n, k = model.get_submodule(name).weight.shape
        groups = math.ceil(k / group)
        q = torch.randint(0, 16, (n, k), generator=gen)
        z = torch.randint(0, 16, (n, groups), generator=gen)
        s = _random_scales((n, groups), gen)
        reference[f"{name}.weight"] = (q - _expand(z, 1, group, n, k)) * _expand(
            s.float(), 1, group, n, k
        )
        tensors[f"{name}.qweight"] = _pack_lsb_first(_awq_interleave(q.T), 4)
        tensors[f"{name}.qzeros"] = _pack_lsb_first(_awq_interleave(z.T), 4)
        tensors[f"{name}.scales"] = s.T.contiguous()
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True}
    qc["version"] = "gemm"
    write_checkpoint(directory, model, qc, tensors)
    return Fixture(directory, linears, dense, reference)


def _awq_interleave(columns: torch.Tensor) -> torch.Tensor:
    """Columns in order -> nibble order: nibble i of each word takes column AWQ_ORDER[i]."""
    rows, n = columns.shape
    grouped = columns.reshape(rows, n // 8, 8)
    return grouped[:, :, list(AWQ_ORDER)].reshape(rows, n)


def gptq_checkpoint(
    directory: Path,
    bits: int = 4,
    fmt: str = "gptq",
    group: int = 32,
    desc_act: bool = False,
    permute_g_idx: bool = False,
) -> Fixture:
    """GPTQ: qweight [k*bits/32, n] packed along k, qzeros [k/g, n*bits/32] packed along n,
    storing z - 1 (mod 2**bits) in the classic "gptq" format, z in "gptq_v2"; scales [k/g, n];
    g_idx [k]."""
    model = tiny_llama()
    linears = linear_names(model)
    gen = torch.Generator().manual_seed(2)
    tensors = _dense_state(model, linears)
    dense = dict(tensors)
    reference = {}
    top = 1 << bits
    for name in linears:
        n, k = model.get_submodule(name).weight.shape
        groups = math.ceil(k / group)
        q = torch.randint(0, top, (n, k), generator=gen)
        stored = torch.randint(0, top, (n, groups), generator=gen)
        stored[0, 0] = top - 1  # v1: the zero point 0, wrapped around when saved as z - 1
        z = (stored + 1) % top if fmt == "gptq" else stored
        s = _random_scales((n, groups), gen)
        reference[f"{name}.weight"] = (q - _expand(z, 1, group, n, k)) * _expand(
            s.float(), 1, group, n, k
        )
        tensors[f"{name}.qweight"] = _pack_lsb_first(q, bits).T.contiguous()
        tensors[f"{name}.qzeros"] = _pack_lsb_first(stored.T, bits)
        tensors[f"{name}.scales"] = s.T.contiguous()
        g_idx = torch.arange(k, dtype=torch.int32) // group
        if permute_g_idx:
            g_idx = g_idx[torch.randperm(k, generator=gen)]
        tensors[f"{name}.g_idx"] = g_idx
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": desc_act,
        "sym": True,
        "checkpoint_format": fmt,
    }
    write_checkpoint(directory, model, qc, tensors)
    return Fixture(directory, linears, dense, reference)


def fp8_checkpoint(directory: Path, block: list[int] | None = None) -> Fixture:
    """transformers fp8: weight float8_e4m3fn [n, k], weight_scale_inv float32 per block."""
    block = block or [32, 32]
    model = tiny_llama(torch.bfloat16)
    linears = linear_names(model)
    gen = torch.Generator().manual_seed(3)
    tensors = _dense_state(model, linears)
    dense = dict(tensors)
    reference = {}
    for name in linears:
        n, k = model.get_submodule(name).weight.shape
        grid = (math.ceil(n / block[0]), math.ceil(k / block[1]))
        q = (torch.randn((n, k), generator=gen) * 100).to(torch.float8_e4m3fn)
        scale = torch.rand(grid, generator=gen) * 1e-3 + 1e-5
        reference[f"{name}.weight"] = q.float() * _expand(scale, block[0], block[1], n, k)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale_inv"] = scale
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block}
    write_checkpoint(directory, model, qc, tensors)
    return Fixture(directory, linears, dense, reference)


def compressed_checkpoint(
    directory: Path, weights: dict[str, Any], fmt: str | None = None, activations: bool = False
) -> Fixture:
    """A checkpoint compressed by the compressed-tensors package itself. `weights`: its
    QuantizationArgs; scales (and zero points) are set to random values before compressing,
    the way calibration would; `activations` adds static fp8 input scales (dropped by thaw)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model = tiny_llama()
    linears = linear_names(model)
    dense = _dense_state(model, linears)
    args = QuantizationArgs(**weights)
    input_args = None
    if activations:
        input_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=input_args)
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen"
    )
    apply_quantization_config(model, config, show_progress=False)
    gen = torch.Generator().manual_seed(4)
    for name in linears:
        _calibrate(model.get_submodule(name), weights, gen)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    return Fixture(directory, linears, dense, {})


def _calibrate(module: Any, weights: dict[str, Any], gen: torch.Generator) -> None:
    """Scales from the weight's range, jittered; random zero points when asymmetric."""
    scale = module.weight_scale
    if weights.get("type") == "float":
        value = torch.rand(scale.shape, generator=gen) * 2e-4 + 5e-5
    else:
        value = torch.rand(scale.shape, generator=gen) * 0.004 + 0.001
    scale.data = value.to(scale.dtype)
    zero = getattr(module, "weight_zero_point", None)
    if zero is not None and not weights.get("symmetric", True):
        half = 1 << (weights["num_bits"] - 1)
        zero.data = torch.randint(-half, half, zero.shape, generator=gen).to(zero.dtype)
    input_scale = getattr(module, "input_scale", None)
    if input_scale is not None:
        input_scale.data = torch.full_like(input_scale, 0.01)
