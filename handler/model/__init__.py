"""Model code for the Llama family, loaded from Hugging Face tensor names."""

from handler.model.config import ModelConfig, RopeConfig, UnsupportedModelError
from handler.model.llama import KVCaches, LlamaModel
from handler.model.weights import MissingWeightError

__all__ = [
    "KVCaches",
    "LlamaModel",
    "MissingWeightError",
    "ModelConfig",
    "RopeConfig",
    "UnsupportedModelError",
]
