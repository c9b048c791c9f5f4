"""Continuous-batching engine over a paged KV cache (the worker's in-process API)."""

from handler.engine.llm_engine import LLMEngine
from handler.engine.params import EngineConfig, EngineStats, SamplingParams, TokenOutput
from handler.model import ModelConfig

__all__ = [
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "SamplingParams",
    "TokenOutput",
]
