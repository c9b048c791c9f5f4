"""The paged KV cache is allocated zeroed, also on the CPU path that skips writing the zeros."""

from __future__ import annotations

import torch

from handler.engine.kv_cache import FRESH_PAGES_BYTES, allocate_kv_caches
from handler.model import ModelConfig


def config() -> ModelConfig:
    return ModelConfig.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
        }
    )


def test_large_cpu_cache_is_zero_without_being_written() -> None:
    model = config()
    per_block = 2 * model.num_layers * 16 * model.num_kv_heads * model.head_dim * 4
    blocks = FRESH_PAGES_BYTES // per_block * 2
    # Dirty the heap first, so that reused memory would show up as non-zero.
    garbage = torch.full((FRESH_PAGES_BYTES // 4,), 7.0)
    del garbage
    caches = allocate_kv_caches(model, blocks, 16, torch.float32, torch.device("cpu"))
    assert len(caches) == model.num_layers
    for k, v in caches:
        assert k.shape == (blocks, 16, model.num_kv_heads, model.head_dim)
        assert not k.any() and not v.any()


def test_small_cache_is_zero() -> None:
    caches = allocate_kv_caches(config(), 3, 16, torch.bfloat16, torch.device("cpu"))
    assert all(not k.any() and not v.any() for k, v in caches)
