"""`python -m bench.gpu_quant`: quantized linear layers against bf16 F.linear on the device, at
the layer shapes of SmolLM2-135M and a ~1B Llama, for decode (m = 1) to prefill (m = 256).

Variants: bf16 F.linear; int_linear int8 (g128, symmetric) and int4 (g128, with offsets);
fp8_linear per channel (torch._scaled_mm on sm89+) and the same weight through the Triton kernel;
fp8_linear with 128x128 blocks (Triton). Weights are random, quantized here; each variant's
result is checked against its own de-quantized weight (rel err) before it is timed.

Timing (the method of /work/.library/device/METHOD.md): a CUDA graph of one call per weight copy
(enough copies to overflow L2, so the weights come from HBM as in a real model), warmed up, then
the median over replays of event time / copies. Off CUDA (`--device cpu --tiny`, with
TRITON_INTERPRET=1) the same code runs on tiny shapes with host timing: a check of the script,
not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu_models import MODELS
from snapshot.quant.format import QuantizedTensor, pack_int4

VARIANTS = ("bf16", "int8", "int4", "fp8_channel", "fp8_channel_triton", "fp8_block")
GROUP = 128
FP8_MAX = 448.0


# ---------------------------------------------------------------- random quantized weights


def layer_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """[n, k] of a decoder layer's linears (q, k, v and gate, up fused as the engine does)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    return {
        "qkv": (qkv, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }


def quantize_int8(w: torch.Tensor, group: int) -> QuantizedTensor:
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    scales = (wg.abs().amax(dim=-1) / 127).clamp_min(1e-8).to(torch.float16)
    q = (wg / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return QuantizedTensor("int8", (n, k), (1, group), q.reshape(n, k), scales)


def quantize_int4(w: torch.Tensor, group: int) -> QuantizedTensor:
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    low, high = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((high - low) / 15).clamp_min(1e-8).to(torch.float16)
    offsets = low.to(torch.float16)
    q = ((wg - offsets.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    return QuantizedTensor(
        "int4", (n, k), (1, group), pack_int4(q.reshape(n, k).to(torch.uint8)), scales, offsets
    )


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> QuantizedTensor:
    n, k = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = F.pad(w.float(), (0, cols * bk - k, 0, rows * bn - n))
    tiles = padded.reshape(rows, bn, cols, bk)
    scales = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (tiles / scales[:, None, :, None]).reshape(rows * bn, cols * bk)[:n, :k]
    return QuantizedTensor("fp8", (n, k), block, q.to(torch.float8_e4m3fn).contiguous(), scales)


# ---------------------------------------------------------------- timing


def _copies(weight_bytes: int, device: torch.device, tiny: bool) -> int:
    """Weight sets to rotate through, so that together they are 4x the L2 cache."""
    if device.type != "cuda" or tiny:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(256, -(-4 * l2 // max(weight_bytes, 1))))


def time_calls(
    calls: list[Callable[[], Any]], device: torch.device, repeats: int, warmup: int
) -> float:
    """Median seconds per call: a CUDA graph of all the calls, replayed; host timing off CUDA."""
    if device.type != "cuda":
        for _ in range(warmup):
            for call in calls:
                call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for call in calls:
                call()
            times.append((time.perf_counter() - start) / len(calls))
        return statistics.median(times)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


# ---------------------------------------------------------------- one shape


def _variant_weights(w: torch.Tensor, variant: str) -> Any:
    k = w.shape[1]
    group = min(GROUP, k)
    if variant == "bf16":
        return w
    if variant == "int8":
        return quantize_int8(w, group)
    if variant == "int4":
        return quantize_int4(w, group)
    if variant.startswith("fp8_channel"):
        return quantize_fp8(w, (1, k))
    return quantize_fp8(w, (128, 128))


def _variant_fn(variant: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    from handler.model import quant_triton as qt

    if variant == "bf16":
        return lambda x, w: F.linear(x, w)
    if variant in ("int8", "int4"):
        return lambda x, w: qt.int_linear(x, w)
    if variant == "fp8_channel_triton":

        def triton_fp8(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor:
            m, (n, k) = x.shape[0], w.shape
            cfg = qt.choose_config(m, n, k, k, x.device)
            scheme = qt.FP8_NATIVE if qt._native_fp8(x.device) else qt.FP8_BITS
            return qt._run_kernel(x, w, None, cfg, scheme)

        return triton_fp8
    return lambda x, w: qt.fp8_linear(x, w)


def _clone(w: Any) -> Any:
    if isinstance(w, torch.Tensor):
        return w.clone()
    return QuantizedTensor(
        w.scheme,
        w.shape,
        w.block,
        w.qweight.clone(),
        w.scales.clone(),
        None if w.offsets is None else w.offsets.clone(),
    )


def _weight_bytes(w: Any) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def measure_shape(
    n: int, k: int, m: int, variant: str, args: argparse.Namespace
) -> tuple[float, float, int]:
    """(seconds per call, rel err against the variant's own de-quantized weight, weight bytes)."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(torch.bfloat16)
    first = _variant_weights(w, variant)
    nbytes = _weight_bytes(first)
    copies = _copies(nbytes, device, args.tiny)
    # Copies at other addresses (same values) so that the rotation reads HBM, not L2.
    weights = [first] + [_clone(first) for _ in range(1, copies)]
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    fn = _variant_fn(variant)
    dense = first if variant == "bf16" else first.dequantize(torch.float32)
    ref = x.double() @ dense.double().T
    out = fn(x, first)
    error = float((out.double() - ref).norm() / ref.norm())
    if torch.isnan(out).any():
        error = float("nan")
    seconds = time_calls(
        [lambda w=wi: fn(x, w) for wi in weights], device, args.repeats, args.warmup
    )
    return seconds, error, nbytes


def run_model(name: str, args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    """Every layer shape x m x variant of one model; emit(row) after each shape."""
    for layer, (n, k) in layer_shapes(MODELS[name]).items():
        for m in args.ms:
            row: dict[str, Any] = {"model": name, "layer": layer, "m": m, "n": n, "k": k}
            row["ms"], row["errors"], row["weight_gbps"] = {}, {}, {}
            for variant in args.variants:
                try:
                    seconds, error, nbytes = measure_shape(n, k, m, variant, args)
                except Exception as exc:  # one variant's failure must not hide the others
                    row["errors"][variant] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                row["ms"][variant] = seconds * 1e3
                row["errors"][variant] = error
                row["weight_gbps"][variant] = nbytes / seconds / 1e9
            print(f"[bench.gpu_quant] {json.dumps(row)}", flush=True)
            emit(row)


# ---------------------------------------------------------------- output


def print_table(result: dict[str, Any]) -> None:
    variants = result.get("variants", VARIANTS)
    print(f"\n== quantized linears on {result.get('device', 'n/a')}: ms per call (x bf16) ==")
    print(
        f"{'model':<13}{'layer':<8}{'m':>5}{'n':>7}{'k':>6} "
        + "".join(f"{v:>20}" for v in variants)
    )
    for row in result.get("rows", []):
        cells = []
        for v in variants:
            value = row["ms"].get(v)
            cells.append(f"{value:>20.4f}" if isinstance(value, float) else f"{'fail':>20}")
        print(
            f"{row['model']:<13}{row['layer']:<8}{row['m']:>5}{row['n']:>7}{row['k']:>6} "
            + "".join(cells)
        )
    worst = {
        v: max(
            (
                r["errors"][v]
                for r in result.get("rows", [])
                if isinstance(r["errors"].get(v), float)
            ),
            default=None,
        )
        for v in variants
    }
    print("max rel err vs own de-quantized weight: " + json.dumps(worst))
    if result.get("fp8_scaled_mm"):
        print("(fp8_channel ran torch._scaled_mm: its error includes x rounded to e4m3, ~3e-2)")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm{props.major}{props.minor})"
    return "cpu (interpreter dry run: not a measurement)"


def run(args: argparse.Namespace) -> int:
    if args.summary:
        try:
            print_table(json.loads(args.summary.read_text()))
        except (OSError, ValueError) as exc:
            print(f"no quantized-linear results: {exc}")
        return 0
    device = torch.device(args.device)
    models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if m]
    args.ms = [1, 5] if args.tiny else [int(m) for m in args.ms.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [
        v for v in args.variants if v not in VARIANTS
    ]
    if unknown:
        print(f"unknown models or variants: {unknown}", file=sys.stderr)
        return 2
    from handler.model import quant_triton as qt

    result: dict[str, Any] = {
        "device": _device_name(device),
        "fp8_scaled_mm": qt.fp8_supported(device),
        "variants": args.variants,
        "rows": [],
    }
    started = time.perf_counter()

    def emit(row: dict[str, Any]) -> None:  # written as it goes: a step timeout keeps the rest
        result["rows"].append(row)
        result["seconds"] = round(time.perf_counter() - started, 1)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))

    for name in models:
        run_model(name, args, emit)
    print_table(result)
    failed = any(isinstance(e, str) for r in result["rows"] for e in r["errors"].values())
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="smollm2-135m,llama-1b")
    parser.add_argument("--ms", default="1,32,256", help="token counts (rows of x)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=20, help="timed graph replays")
    parser.add_argument("--warmup", type=int, default=3, help="untimed graph replays")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--json-out", type=Path, help="write the results here as they come")
    parser.add_argument("--summary", type=Path, help="print the table of a results file, exit")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(
        prog="python -m bench.gpu_quant", description=__doc__.splitlines()[0]
    )
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
