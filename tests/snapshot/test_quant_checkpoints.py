"""snapshot.quant.checkpoints: quantized Hugging Face checkpoints -> QuantizedTensor, exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from snapshot.errors import SnapshotError
from snapshot.quant.checkpoints import detect_scheme, load_quantized_checkpoint
from tests.snapshot import quant_fixtures as fx

pytest.importorskip("transformers")


def _check_dense(checkpoint: Any, fixture: fx.Fixture) -> None:
    assert sorted(checkpoint.dense) == sorted(fixture.dense)
    for name, tensor in fixture.dense.items():
        assert checkpoint.dense[name].dtype == tensor.dtype, name
        assert torch.equal(checkpoint.dense[name], tensor), name


def _check_against_reference(checkpoint: Any, fixture: fx.Fixture) -> None:
    assert sorted(checkpoint.quantized) == sorted(f"{n}.weight" for n in fixture.linears)
    for name, expected in fixture.reference.items():
        got = checkpoint.quantized[name].dequantize()
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), name


# --- AWQ / GPTQ / fp8: written from the format specifications -------------------------------


def test_awq_gemm(tmp_path: Path) -> None:
    fixture = fx.awq_checkpoint(tmp_path / "awq")
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert checkpoint.scheme == "awq int4 g32"
    _check_against_reference(checkpoint, fixture)
    _check_dense(checkpoint, fixture)
    t = checkpoint.quantized["model.layers.0.mlp.down_proj.weight"]
    assert (t.scheme, t.shape, t.block) == ("int4", (64, 128), (1, 32))
    assert t.offsets is not None and t.offsets.dtype == t.scales.dtype


@pytest.mark.parametrize("bits, fmt", [(4, "gptq"), (4, "gptq_v2"), (8, "gptq"), (8, "gptq_v2")])
def test_gptq(tmp_path: Path, bits: int, fmt: str) -> None:
    fixture = fx.gptq_checkpoint(tmp_path / "gptq", bits=bits, fmt=fmt)
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert checkpoint.scheme == f"gptq int{bits} g32 sym ({fmt})"
    _check_against_reference(checkpoint, fixture)
    _check_dense(checkpoint, fixture)
    t = checkpoint.quantized["model.layers.1.self_attn.k_proj.weight"]
    assert (t.scheme, t.shape, t.block) == (f"int{bits}", (32, 64), (1, 32))


def test_gptq_act_order_with_trivial_g_idx_is_served(tmp_path: Path) -> None:
    fixture = fx.gptq_checkpoint(tmp_path / "gptq", desc_act=True)
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert "act-order" in checkpoint.scheme
    _check_against_reference(checkpoint, fixture)


def test_gptq_scales_stay_float16_where_offsets_are_exact(tmp_path: Path) -> None:
    fixture = fx.gptq_checkpoint(tmp_path / "gptq")
    checkpoint = load_quantized_checkpoint(fixture.directory)
    dtypes = {t.scales.dtype for t in checkpoint.quantized.values()}
    # Random z * s is rarely exact in float16: float32 then, never a rounded offset.
    assert dtypes <= {torch.float16, torch.float32}
    for t in checkpoint.quantized.values():
        if t.scales.dtype == torch.float16:
            assert t.offsets is not None and t.offsets.dtype == torch.float16


def test_fp8_block(tmp_path: Path) -> None:
    fixture = fx.fp8_checkpoint(tmp_path / "fp8")
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert checkpoint.scheme == "fp8 block 32x32"
    _check_against_reference(checkpoint, fixture)
    _check_dense(checkpoint, fixture)
    t = checkpoint.quantized["model.layers.0.mlp.gate_proj.weight"]
    assert (t.scheme, t.block, t.scales.dtype, t.offsets) == ("fp8", (32, 32), torch.float32, None)

    # transformers de-quantizes fp8 checkpoints on CPU: its weights equal ours.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture.directory, dtype=torch.float32)
    state = model.state_dict()
    for name, t in checkpoint.quantized.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], t.dequantize()), name


def test_fp8_default_128_block_on_small_weights(tmp_path: Path) -> None:
    fixture = fx.fp8_checkpoint(tmp_path / "fp8", block=[128, 128])
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert checkpoint.scheme == "fp8 block 128x128"
    _check_against_reference(checkpoint, fixture)


# --- compressed-tensors: made by the package itself -----------------------------------------

CT_CASES = {
    "w4a16-group-asym": ({"num_bits": 4, "strategy": "group", "group_size": 32,
                          "symmetric": False}, "pack-quantized", False),
    "w4a16-group-sym": ({"num_bits": 4, "strategy": "group", "group_size": 32},
                        "pack-quantized", False),
    "w8a16-channel-asym": ({"num_bits": 8, "strategy": "channel", "symmetric": False},
                           "pack-quantized", False),
    "w8-naive-channel": ({"num_bits": 8, "strategy": "channel"}, "naive-quantized", False),
    "fp8-channel": ({"num_bits": 8, "type": "float", "strategy": "channel"},
                    "float-quantized", True),
    "fp8-tensor": ({"num_bits": 8, "type": "float", "strategy": "tensor"},
                   "float-quantized", True),
    "fp8-block": ({"num_bits": 8, "type": "float", "strategy": "block",
                   "block_structure": [32, 32]}, "float-quantized", False),
}  # fmt: skip
CT_SCHEMES = {
    "w4a16-group-asym": ("int4", (1, 32)),
    "w4a16-group-sym": ("int4", (1, 32)),
    "w8a16-channel-asym": ("int8", (1, 64)),
    "w8-naive-channel": ("int8", (1, 64)),
    "fp8-channel": ("fp8", (1, 64)),
    "fp8-tensor": ("fp8", (64, 64)),
    "fp8-block": ("fp8", (32, 32)),
}


def _library_dequantize(directory: Path, checkpoint: Any) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompress of every quantized module, scales in float32."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=group["targets"], weights=QuantizationArgs(**group["weights"])
    )
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    stored = load_file(str(directory / "model.safetensors"))
    out = {}
    for name in checkpoint.quantized:
        module = name.removesuffix(".weight")
        local = {k[len(module) + 1 :]: v for k, v in stored.items() if k.startswith(module + ".")}
        local["weight_scale"] = local["weight_scale"].float()
        out[name] = compressor.decompress(local, scheme)["weight"]
    return out


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors(tmp_path: Path, case: str) -> None:
    pytest.importorskip("compressed_tensors")
    weights, fmt, activations = CT_CASES[case]
    fixture = fx.compressed_checkpoint(tmp_path / case, weights, fmt, activations)
    checkpoint = load_quantized_checkpoint(fixture.directory)
    assert checkpoint.scheme.startswith(f"compressed-tensors {fmt} ")
    assert sorted(checkpoint.quantized) == sorted(f"{n}.weight" for n in fixture.linears)
    _check_dense(checkpoint, fixture)
    scheme, block = CT_SCHEMES[case]
    t = checkpoint.quantized["model.layers.0.self_attn.q_proj.weight"]
    assert (t.scheme, t.block) == (scheme, block)
    if activations:
        assert "model.layers.0.self_attn.q_proj.input_scale" in checkpoint.ignored

    # The library's own dequantization, evaluated in float32: equal, bit for bit.
    library = _library_dequantize(fixture.directory, checkpoint)
    for name, t in checkpoint.quantized.items():
        assert torch.equal(t.dequantize(), library[name].float()), name

    # transformers' loader (compressed-tensors decompression on CPU) in the checkpoint's
    # float16, which rounds the exact value once: ours, rounded once, equals it.
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        fixture.directory,
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float16,
    )
    state = model.state_dict()
    for name, t in checkpoint.quantized.items():
        assert torch.equal(state[name], t.dequantize(torch.float16)), name


# --- detection and refusals -----------------------------------------------------------------


def test_detect_scheme_dense_and_served() -> None:
    assert detect_scheme({"model_type": "llama"}) is None
    assert detect_scheme({"quantization_config": {"quant_method": "awq", "bits": 4,
                                                  "group_size": 128, "version": "GEMM"}}) == (
        "awq int4 g128"
    )  # fmt: skip
    gptq = {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": False}
    assert detect_scheme({"quantization_config": gptq}) == "gptq int8 per-channel asym (gptq)"
    assert detect_scheme({"quantization_config": {"quant_method": "fp8"}}) == "fp8 block 128x128"


@pytest.mark.parametrize(
    "qc, words",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ["'bitsandbytes'", "awq"]),
        ({"load_in_8bit": True}, ["'bitsandbytes'"]),
        ({"quant_method": "hqq"}, ["'hqq'"]),
        ({"quant_method": "exl2"}, ["'exl2'"]),
        ({"quant_method": "mxfp4"}, ["'mxfp4'"]),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, ["AWQ version 'gemv'", "gemm"]),
        ({"quant_method": "awq", "bits": 8, "version": "gemm"}, ["AWQ with bits=8"]),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, ["GPTQ with bits=3"]),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, ["'marlin'"]),
        (
            {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
             "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4,
                                     "type": "float", "strategy": "tensor_group"}}}},
            ["'nvfp4-pack-quantized'", "pack-quantized"],
        ),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 3,
                                     "type": "int", "strategy": "group", "group_size": 128}}}},
            ["int weights with 3 bits"],
        ),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "sparsity_config": {"format": "sparse-24-bitmask"},
             "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
            ["sparsity"],
        ),
        ({"quant_method": "fp8", "fmt": "e5m2"}, ["fp8 format 'e5m2'"]),
    ],
)  # fmt: skip
def test_unsupported_schemes_are_named(qc: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(SnapshotError) as info:
        detect_scheme({"quantization_config": qc})
    for word in words:
        assert word in str(info.value)
    assert "serves" in str(info.value)


def _rewrite(directory: Path, edit: Any) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_gptq_act_order_with_permuted_g_idx_is_refused(tmp_path: Path) -> None:
    fixture = fx.gptq_checkpoint(tmp_path / "gptq", desc_act=True, permute_g_idx=True)
    with pytest.raises(SnapshotError, match=r"g_idx is not i // 32 \(act-order"):
        load_quantized_checkpoint(fixture.directory)


def test_missing_qzeros_is_named(tmp_path: Path) -> None:
    fixture = fx.awq_checkpoint(tmp_path / "awq")
    _rewrite(fixture.directory, lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))
    with pytest.raises(SnapshotError, match=r"model\.layers\.1\.mlp\.up_proj .* no qzeros"):
        load_quantized_checkpoint(fixture.directory)


def test_wrong_scale_shape_is_named(tmp_path: Path) -> None:
    fixture = fx.gptq_checkpoint(tmp_path / "gptq")
    name = "model.layers.0.self_attn.v_proj.scales"
    _rewrite(fixture.directory, lambda t: t.update({name: t[name][:1].contiguous()}))
    with pytest.raises(SnapshotError, match=r"v_proj\.scales: shape \[1, 32\], expected \[2, 32\]"):
        load_quantized_checkpoint(fixture.directory)


def test_wrong_qweight_shape_is_named(tmp_path: Path) -> None:
    fixture = fx.awq_checkpoint(tmp_path / "awq")
    name = "model.layers.0.self_attn.o_proj.qweight"
    _rewrite(fixture.directory, lambda t: t.update({name: t[name][:, :4].contiguous()}))
    with pytest.raises(SnapshotError, match=r"o_proj\.qweight: shape \[64, 4\], expected"):
        load_quantized_checkpoint(fixture.directory)


def test_fp8_scale_without_weight_is_named(tmp_path: Path) -> None:
    fixture = fx.fp8_checkpoint(tmp_path / "fp8")
    _rewrite(fixture.directory, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(SnapshotError, match=r"up_proj\.weight_scale_inv has no .*up_proj\.weight"):
        load_quantized_checkpoint(fixture.directory)


def test_dense_directory_is_refused(tmp_path: Path) -> None:
    model = fx.tiny_llama()
    fx.write_checkpoint(tmp_path / "dense", model, None, dict(model.state_dict()))
    with pytest.raises(SnapshotError, match="no quantization_config"):
        load_quantized_checkpoint(tmp_path / "dense")


def test_compressed_tensors_asymmetric_without_zero_points_is_named(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    weights, fmt, _ = CT_CASES["w4a16-group-asym"]
    fixture = fx.compressed_checkpoint(tmp_path / "ct", weights, fmt)
    _rewrite(fixture.directory, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_zero_point"))
    with pytest.raises(SnapshotError, match=r"up_proj\.weight_zero_point: missing \(asymmetric"):
        load_quantized_checkpoint(fixture.directory)


def test_sharded_checkpoint_with_a_legacy_quantize_config(tmp_path: Path) -> None:
    """An index of shards, and auto-gptq's quantize_config.json beside a config.json without
    quantization_config."""
    from safetensors.torch import load_file, save_file

    fixture = fx.gptq_checkpoint(tmp_path / "gptq")
    directory = fixture.directory
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for file_name, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(directory / file_name))
    weight_map = {n: f for f, part in shards.items() for n in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    legacy = config.pop("quantization_config")
    del legacy["quant_method"]
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "quantize_config.json").write_text(json.dumps(legacy))

    checkpoint = load_quantized_checkpoint(directory)
    assert checkpoint.scheme == "gptq int4 g32 sym (gptq)"
    _check_against_reference(checkpoint, fixture)
    _check_dense(checkpoint, fixture)
