"""`thaw snapshot inspect`: what a snapshot holds, from its manifest alone (no checksums run)."""

from __future__ import annotations

from typing import Any


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its per-tensor table, which is long and rarely what a person wants."""
    return {key: value for key, value in manifest.items() if key != "tensors"}


def render(manifest: dict[str, Any]) -> str:
    lines = [
        f"architecture  {manifest['architecture']} ({manifest.get('model_type')})",
        f"parameters    {manifest.get('parameter_count', 0):,}",
        f"dtype         {manifest['dtype']}",
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
