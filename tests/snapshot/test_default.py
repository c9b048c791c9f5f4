"""The embedded default model: its snapshot matches what transformers reads from the GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from snapshot.sources import default_gguf

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_model() -> tuple[Any, Any]:
    """transformers' own reading of the GGUF: de-quantized in float32, as the build does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def test_every_tensor_equals_the_gguf_in_bfloat16(
    default_model_snapshot: Path, gguf_model: tuple[Any, Any]
) -> None:
    reference = gguf_model[0].state_dict()
    tensors = load_file(default_model_snapshot / "model.safetensors")
    # Tied: the snapshot stores the embedding once and no lm_head.
    assert set(tensors) == set(reference) - {"lm_head.weight"}
    for name, tensor in tensors.items():
        want = reference[name].to(torch.bfloat16)
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.view(torch.uint8), want.view(torch.uint8)), name


def test_greedy_generation_from_the_snapshot_matches_the_gguf(
    default_model_snapshot: Path, gguf_model: tuple[Any, Any]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(default_model_snapshot)
    tokenizer = AutoTokenizer.from_pretrained(default_model_snapshot)
    assert ours.dtype == torch.bfloat16
    assert ours.generation_config.eos_token_id == [2]
    # In place: the bitwise test's f32 -> bf16 cast gives the same bits either way.
    reference = gguf_model[0].to(torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt"
    )
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    want = gguf_model[1].apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt"
    )
    want_ids = want["input_ids"] if hasattr(want, "keys") else want
    assert torch.equal(prompt_ids, want_ids)

    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    got = ours.generate(prompt_ids, **settings)
    expected = reference.generate(want_ids, **settings)
    assert got.shape[1] > prompt_ids.shape[1]
    assert torch.equal(got, expected)
    assert tokenizer.decode(got[0, prompt_ids.shape[1] :]).strip()
