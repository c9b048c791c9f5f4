"""Tiny random-weight transformers models and helpers shared by the engine tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from handler.model.config import ModelConfig

VOCAB = 384
EOS_ID = 3

_TINY_SHAPE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    # Larger than HF's default 0.02 so logits are well separated and greedy picks are stable.
    "initializer_range": 0.15,
    "eos_token_id": EOS_ID,
    "bos_token_id": 1,
    "pad_token_id": 0,
}


@dataclass
class TinyModel:
    hf_model: Any
    hf_config: dict[str, Any]
    weights: dict[str, torch.Tensor] = field(repr=False)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_config(self.hf_config)

    def engine(self, **overrides: Any) -> LLMEngine:
        config = EngineConfig(**{"max_num_seqs": 16, "max_num_batched_tokens": 256, **overrides})
        return LLMEngine(self.model_config, self.weights, [EOS_ID], config)

    def hf_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation of one prompt, stopping at EOS like the engine."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=EOS_ID,
                pad_token_id=0,
            )
        generated = out[0, len(prompt) :].tolist()
        if EOS_ID in generated:
            generated = generated[: generated.index(EOS_ID) + 1]
        return generated


def build_tiny(architecture: str, seed: int = 0, **overrides: Any) -> TinyModel:
    import transformers

    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    extra: dict[str, Any] = {}
    if architecture == "MistralForCausalLM":
        extra["sliding_window"] = None
    config = config_class(**{**_TINY_SHAPE, **extra, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model_class = getattr(transformers, architecture)
    model = model_class(config).eval().to(torch.float32)
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return TinyModel(model, config.to_dict(), weights)


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def run_staggered(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    arrivals: list[int],
) -> dict[int, list[int]]:
    """Submit prompt i at step arrivals[i]; step until everything finishes; tokens per request."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(i, prompts[i], per_prompt[i])
        for out in engine.step():
            if out.token_id is not None:
                outputs[out.request_id].append(out.token_id)
        step += 1
        assert step < 10_000, "engine did not finish"
    return outputs
