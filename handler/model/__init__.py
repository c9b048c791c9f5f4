"""Model code for every supported family, loaded from Hugging Face tensor names."""

from handler.model.config import ModelConfig, RopeConfig, UnsupportedModelError
from handler.model.decoder import DecoderModel
from handler.model.llama import KVCaches, LlamaModel
from handler.model.weights import MissingWeightError

__all__ = [
    "DecoderModel",
    "KVCaches",
    "LlamaModel",
    "MissingWeightError",
    "ModelConfig",
    "RopeConfig",
    "UnsupportedModelError",
]
