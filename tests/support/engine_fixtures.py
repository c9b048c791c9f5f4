"""Tiny random-weight transformers models and helpers shared by the engine tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from handler.engine.sequence import Sequence
from handler.model.config import ModelConfig

VOCAB = 384
EOS_ID = 3
ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)

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


# transformers' config class of each architecture build_tiny knows.
CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
    "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    "MixtralForCausalLM": "MixtralConfig",
    "Gemma2ForCausalLM": "Gemma2Config",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
    "Phi3ForCausalLM": "Phi3Config",
}


def build_tiny(architecture: str, seed: int = 0, **overrides: Any) -> TinyModel:
    """A random-weight model of `architecture` at the tiny shape, with `overrides` switching a
    family's features on (windows, soft-caps, experts, rotary variants). Its weights are
    transformers' state_dict(), the names a snapshot stores."""
    import transformers

    config_class = getattr(transformers, CONFIG_CLASSES[architecture])
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


def teacher_forced_logits(
    engine: LLMEngine, sequences: list[list[int]], decodes: int
) -> torch.Tensor:
    """float32 logits of every token: one prefill step of all but the last `decodes` tokens of
    each sequence, then batched decode steps over the rest."""
    runner, manager = engine.runner, engine.block_manager
    seqs = []
    for i, tokens in enumerate(sequences):
        seq = Sequence(i, tokens, ONE_TOKEN, None)
        # Every group's blocks for the whole sequence (window groups keep them all here).
        hit = manager.find_cached_prefix(Sequence(i, [], ONE_TOKEN, None))
        assert manager.allocate_new(seq, hit, len(tokens)), "the KV cache is too small"
        seqs.append(seq)

    def run(items: list[tuple[Sequence, int]]) -> torch.Tensor:
        input_ids, positions, meta, _, _ = runner._prepare(items)
        hidden = runner.model.forward(input_ids, positions, meta, runner.kv_caches)
        for seq, count in items:
            seq.num_computed_tokens += count
        return runner.model.compute_logits(hidden).float()

    with torch.inference_mode():
        steps = [run([(seq, len(seq) - decodes) for seq in seqs])]
        for _ in range(decodes):
            steps.append(run([(seq, 1) for seq in seqs]))
    for seq in seqs:
        manager.free(seq)
    return torch.cat(steps)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) over rows of logits."""
    ref, oth = reference.log_softmax(-1), other.log_softmax(-1)
    return float((ref.exp() * (ref - oth)).sum(-1).mean())
