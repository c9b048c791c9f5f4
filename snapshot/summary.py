"""`thaw snapshot inspect`: what a snapshot holds, from its manifest alone (no checksums run)."""

from __future__ import annotations

from collections import Counter
from typing import Any


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its per-tensor tables, which are long and rarely what a person
    wants: quantization becomes a count of weights per scheme."""
    out = {key: value for key, value in manifest.items() if key not in ("tensors", "quantization")}
    if manifest.get("quantization"):
        out["quantization"] = quantization_counts(manifest)
    return out


def quantization_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """'int4 block 1x32, float16 scales' -> how many weights use it."""
    counts: Counter[str] = Counter()
    tensors = manifest["tensors"]
    for entry in (manifest.get("quantization") or {}).values():
        bn, bk = entry.get("block", [0, 0])
        scales = tensors.get(entry.get("scales"), {}).get("dtype", "?")
        offsets = ", offsets" if entry.get("offsets") else ""
        counts[f"{entry['scheme']} block {bn}x{bk}, {scales} scales{offsets}"] += 1
    return dict(sorted(counts.items()))


def render(manifest: dict[str, Any]) -> str:
    lines = [
        f"architecture  {manifest['architecture']} ({manifest.get('model_type')})",
        f"parameters    {manifest.get('parameter_count', 0):,}",
        f"dtype         {manifest['dtype']}",
        *(
            f"quantized     {count} weights: {scheme}"
            for scheme, count in quantization_counts(manifest).items()
        ),
        *(
            [f"quantized by  {manifest['quantization_source']}"]
            if manifest.get("quantization")
            else []
        ),
        f"tensors       {manifest.get('tensor_count', len(manifest['tensors']))}",
        f"bytes         {manifest.get('total_bytes', 0):,}",
        f"format        {manifest['format_version']} (thaw {manifest.get('thaw_version')})",
        f"source        {manifest.get('source')}",
        f"created       {manifest.get('created_at')}",
        f"warm profiles {', '.join(manifest.get('warm_profiles') or {}) or 'none'}",
        "files",
    ]
    width = max(len(f["name"]) for f in manifest["files"]) if manifest["files"] else 0
    lines += [
        f"  {f['name']:<{width}}  {f['size']:>14,}  sha256:{f['sha256']}" for f in manifest["files"]
    ]
    return "\n".join(lines)
