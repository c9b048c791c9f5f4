"""Reading a model config given as a dict or as a transformers config object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_value(config: Any, key: str) -> Any:
    """config[key], the text config's first (multimodal configs nest the language model's)."""
    for source in (_get(config, "text_config"), config):
        value = _get(source, key)
        if value is not None:
            return value
    return None


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)
