"""Random-weight models for the GPU benchmarks: no model hub is reachable from the device, and
throughput does not depend on weight values when EOS is ignored, so the shapes are what matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SMOLLM2_135M: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
LLAMA_1B: dict[str, Any] = {  # the shape of Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
TINY: dict[str, Any] = {
    **SMOLLM2_135M,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
}
MODELS = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B, "tiny": TINY}


def random_hf_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """A random-weight transformers Llama built directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    return model.to(dtype).eval()


def make_random_snapshot(model_name: str, out: Path) -> None:
    """Build a snapshot of a random-weight model of the given shape (no model hub is reachable
    from the device): a Hugging Face directory with a small word-level tokenizer, then
    `thaw snapshot build --from DIR`."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from snapshot.build import BuildRequest, build_snapshot

    with tempfile.TemporaryDirectory(prefix="thaw-random-") as tmp:
        source = Path(tmp)
        random_hf_model(MODELS[model_name], torch.device("cpu"), torch.bfloat16).save_pretrained(
            source
        )
        words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(500)]
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        tokenizer.save_pretrained(source)
        build_snapshot(BuildRequest(source=str(source), out=out, dtype="bfloat16", force=True))
