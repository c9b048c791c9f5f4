"""`thaw bench load SNAPSHOT`: thaw's loader vs safetensors.load_file vs transformers, in GB/s.

All run in the same process on the same files, with the files in the page cache (read once
before timing), best of --repeat runs. GB/s = weight bytes / seconds (1 GB = 1e9 bytes).

On the CPU, mapping is lazy for us and for safetensors (0.8 maps the file too): a "load" that
touches no byte says nothing. So the headline CPU figures (`ours_gbps`, `safetensors_gbps`,
`transformers_gbps`) include one read of every weight byte after the load; the lazy figures are
reported beside them as `*_lazy_gbps`, and `ours_copy_gbps` copies every byte into fresh memory.
On CUDA every loader really moves the bytes, `ours_gbps` is the full load into device memory, and
`h2d_gbps` the pinned host-to-device copy bandwidth of this machine: the ceiling for any loader.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

H2D_PROBE_BYTES = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", type=Path, help="snapshot directory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per loader; best is kept")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from snapshot.errors import SnapshotError
    from snapshot.loader import load_snapshot, prefetch_into_page_cache
    from snapshot.manifest import load_manifest, weight_files

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        manifest = load_manifest(args.snapshot)
        files = [args.snapshot / name for name in weight_files(manifest)]
        prefetch_into_page_cache(args.snapshot)
        # Also the warm-up: CUDA context, allocator and page cache are all set up before timing.
        weight_bytes = int(load_snapshot(args.snapshot, device=device).timings["bytes"])
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 1
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def gbps(load: Callable[[], Any]) -> float:
        return weight_bytes / 1e9 / best_of(args.repeat, load, sync)

    result: dict[str, Any] = {
        "device": device,
        "snapshot": str(args.snapshot),
        "weight_bytes": weight_bytes,
        "page_cache": "warm",
        "repeat": args.repeat,
    }
    if device == "cpu":
        result["ours_gbps"] = gbps(lambda: touch(load_snapshot(args.snapshot).weights))
        result["ours_lazy_gbps"] = gbps(lambda: load_snapshot(args.snapshot))
        result["ours_copy_gbps"] = gbps(lambda: load_snapshot(args.snapshot, copy=True))
        result["safetensors_gbps"] = gbps(lambda: touch(load_with_safetensors(files, device)))
        result["safetensors_lazy_gbps"] = gbps(lambda: load_with_safetensors(files, device))
    else:
        result["h2d_gbps"] = h2d_gbps(torch, device, args.repeat)
        result["ours_gbps"] = gbps(lambda: load_snapshot(args.snapshot, device=device))
        result["ours_vs_h2d"] = result["ours_gbps"] / result["h2d_gbps"]
        result["safetensors_gbps"] = gbps(lambda: load_with_safetensors(files, device))
    if not args.skip_transformers:
        touched = touch if device == "cpu" else (lambda tensors: tensors)
        result["transformers_gbps"] = gbps(
            lambda: touched(load_with_transformers(args.snapshot, device).state_dict())
        )
    result["measures"] = {k: v for k, v in labels(device).items() if k in result}
    print(json.dumps(result) if args.json else render(result))
    return 0


def best_of(repeat: int, load: Callable[[], Any], sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        loaded = load()
        sync()
        best = min(best, time.perf_counter() - start)
        del loaded
    return best


def touch(tensors: dict[str, Any]) -> dict[str, Any]:
    """Read every byte once, so lazily mapped pages are really loaded.

    amax over same-width integers: a cheap reduction that any dtype allows (torch's plain
    .max() over small integers runs ~50x slower here and would measure itself, not the load).
    """
    import torch

    same_width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for tensor in tensors.values():
        if tensor.numel():
            tensor.reshape(-1).view(same_width[tensor.element_size()]).amax()
    return tensors


def load_with_safetensors(files: list[Path], device: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in files:
        tensors |= load_file(file, device=device)
    return tensors


def load_with_transformers(snapshot: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(snapshot, device_map=device)


def h2d_gbps(torch: Any, device: str, repeat: int) -> float:
    """Pinned host -> device copy bandwidth, timed with CUDA events."""
    host = torch.empty(H2D_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(H2D_PROBE_BYTES, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)  # warm-up: first use pays for driver setup
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(max(repeat, 3)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return H2D_PROBE_BYTES / 1e9 / best


def labels(device: str) -> dict[str, str]:
    """What each figure measures; printed beside it, and under "measures" in the JSON."""
    touched = ", then every byte read" if device == "cpu" else " into device memory"
    return {
        "h2d_gbps": "pinned host->device copy (ceiling)",
        "ours_gbps": f"thaw loader{touched}",
        "ours_lazy_gbps": "thaw loader, lazy map (no byte read)",
        "ours_copy_gbps": "thaw loader, copy into fresh memory",
        "safetensors_gbps": f"safetensors.torch.load_file{touched}",
        "safetensors_lazy_gbps": "safetensors.torch.load_file, lazy",
        "transformers_gbps": f"transformers from_pretrained{touched}",
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"snapshot {result['snapshot']}: {result['weight_bytes'] / 1e9:.3f} GB of weights,"
        f" device {result['device']}, page cache warm, best of {result['repeat']}",
    ]
    for key, label in result["measures"].items():
        lines.append(f"  {label:<48} {result[key]:9.2f} GB/s")
    if "ours_vs_h2d" in result:
        lines.append(f"  thaw loader / host->device ceiling: {result['ours_vs_h2d']:.0%}")
    return "\n".join(lines)
