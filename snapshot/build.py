"""`thaw snapshot build`: turn a source model into a snapshot directory, atomically."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshot import manifest as mf
from snapshot.errors import SnapshotError
from snapshot.swap import replace_directory
from snapshot.writer import DEFAULT_SHARD_BYTES, plan_shards, write_shard

DTYPES = ("bfloat16", "float16", "float32")
QUANTIZE = ("auto", "none", "source", "int8", "int4")
# transformers' save_pretrained leaves bookkeeping keys that mean nothing outside one machine.
DROPPED_TOKENIZER_KEYS = ("is_local", "local_files_only")


@dataclass(frozen=True)
class BuildRequest:
    source: str  # "default", a Hugging Face directory, or a .gguf file
    out: Path
    dtype: str = "bfloat16"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False
    quantize: str = "auto"  # see sources.load


def build_snapshot(request: BuildRequest) -> dict[str, Any]:
    """Build the snapshot and return its manifest. `out` appears only when it is complete."""
    from snapshot import sources

    if request.dtype not in DTYPES:
        raise SnapshotError(f"--dtype {request.dtype}: expected one of {', '.join(DTYPES)}")
    if request.quantize not in QUANTIZE:
        raise SnapshotError(f"--quantize {request.quantize}: expected one of {', '.join(QUANTIZE)}")
    out = request.out
    if out.exists() and not request.force:
        raise SnapshotError(f"{out}: already exists (pass --force to replace it)")
    source = sources.resolve(request.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        model = sources.load(source, request.dtype, request.quantize)
        _write_tokenizer(staging, model.tokenizer)
        mf.write_json(staging / mf.CONFIG, model.config)
        mf.write_json(staging / mf.GENERATION_CONFIG, model.generation_config)
        tensors = _write_weights(staging, _stored_state(model), request.shard_bytes)
        manifest = _manifest(staging, model, request.dtype, tensors)
        mf.write_json(staging / mf.MANIFEST, manifest)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the snapshot is meant to be shared
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_tokenizer(staging: Path, tokenizer: Any) -> None:
    tokenizer.save_pretrained(staging)
    if not (staging / mf.TOKENIZER).is_file():
        raise SnapshotError("tokenizer: the source tokenizer did not produce a tokenizer.json")
    config_path = staging / mf.TOKENIZER_CONFIG
    config = mf.read_json(config_path) if config_path.is_file() else {}
    for key in DROPPED_TOKENIZER_KEYS:
        config.pop(key, None)
    template = tokenizer.chat_template
    if isinstance(template, str):
        # The gateway reads the .jinja file; older readers look in tokenizer_config.json.
        (staging / mf.CHAT_TEMPLATE).write_text(template, encoding="utf-8")
        config["chat_template"] = template
    mf.write_json(config_path, config)
    if tokenizer.special_tokens_map:
        mf.write_json(staging / mf.SPECIAL_TOKENS_MAP, tokenizer.special_tokens_map)


def _stored_state(model: Any) -> dict[str, Any]:
    """Dense tensors and the parts of every quantized weight, in the source's order."""
    from snapshot.quant.format import stored_tensors

    state = dict(model.state)
    for name, quantized in model.quantized.items():
        state.update(stored_tensors(name, quantized))
    return state


def _write_weights(staging: Path, state: dict[str, Any], shard_bytes: int) -> dict[str, Any]:
    from tqdm import tqdm

    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    shards = plan_shards(sizes, shard_bytes)
    entries: dict[str, Any] = {}
    with tqdm(
        total=sum(sizes.values()),
        unit="B",
        unit_scale=True,
        desc="writing weights",
        file=sys.stderr,
    ) as bar:
        for shard in shards:
            write_shard(staging / shard.file, {n: state[n] for n in shard.names}, bar.update)
            for name in shard.names:
                tensor = state[name]
                dtype = str(tensor.dtype).removeprefix("torch.")
                entries[name] = {"file": shard.file, "dtype": dtype, "shape": list(tensor.shape)}
    if len(shards) > 1:
        # Lets transformers (and anything else Hugging Face-shaped) open the snapshot as is.
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: e["file"] for name, e in entries.items()},
        }
        mf.write_json(staging / mf.WEIGHTS_INDEX, index)
    return entries


def _manifest(staging: Path, model: Any, dtype: str, tensors: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    from tqdm import tqdm

    paths = sorted(p for p in staging.iterdir() if p.name != mf.MANIFEST)
    total = sum(p.stat().st_size for p in paths)
    files = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", file=sys.stderr) as bar:
        for path in paths:
            digest = mf.sha256_file(path, bar.update)
            files.append({"name": path.name, "size": path.stat().st_size, "sha256": digest})
    from snapshot.quant.format import manifest_entry

    quantized = model.quantized
    parameters = sum(t.numel() for t in model.state.values())
    parameters += sum(q.shape[0] * q.shape[1] for q in quantized.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state.values())
    weight_bytes += sum(q.nbytes for q in quantized.values())
    manifest: dict[str, Any] = {
        "format_version": mf.QUANTIZED_FORMAT_VERSION if quantized else mf.FORMAT_VERSION,
        "architecture": model.architecture,
        "model_type": model.config.get("model_type"),
        "dtype": dtype,
        "tensor_count": len(tensors),
        "parameter_count": parameters,
        "weight_bytes": weight_bytes,
        "total_bytes": total,
        "files": files,
        "tensors": tensors,
        "thaw_version": version("thaw"),
        "source": model.source.description,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warm_profiles": {},
    }
    if quantized:
        manifest["quantization_source"] = model.quantization
        manifest["quantization"] = {name: manifest_entry(name, q) for name, q in quantized.items()}
    return manifest
