"""The engine on the real default snapshot (SmolLM2-135M-Instruct) equals transformers."""

from __future__ import annotations

import pytest
import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from tests.conftest import DEFAULT_SNAPSHOT
from tests.support.engine_fixtures import random_prompts, run_staggered

MAX_NEW = 5


@pytest.mark.skipif(
    not (DEFAULT_SNAPSHOT / "config.json").exists(),
    reason="no default snapshot (thaw snapshot build --from default --out .thaw/snapshots/default)",
)
def test_default_snapshot_greedy_matches_transformers() -> None:
    import transformers

    config = EngineConfig(
        dtype=torch.float32, max_num_batched_tokens=64, block_size=16, num_kv_blocks=64
    )
    engine = LLMEngine.from_snapshot(DEFAULT_SNAPSHOT, config)
    from snapshot.loader import load_snapshot

    snap = load_snapshot(DEFAULT_SNAPSHOT, "cpu")
    hf_config = transformers.LlamaConfig.from_dict(snap.config)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict({k: v.float() for k, v in snap.weights.items()}, strict=False)
    model.tie_weights()

    # Shared leading blocks too, so the prefix cache is exercised on real weights.
    system = random_prompts(1, 32, 32, seed=12)[0]
    prompts = [system + p for p in random_prompts(8, 1, 20, seed=13)]
    arrivals = [0, 0, 1, 2, 3, 5, 8, 9]
    outputs = run_staggered(
        engine, prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0), arrivals
    )
    eos = set(engine.eos_token_ids)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=list(eos),
            )
        expected = out[0, len(prompt) :].tolist()
        cut = next((j for j, t in enumerate(expected) if t in eos), None)
        assert outputs[i] == (expected if cut is None else expected[: cut + 1]), f"prompt {i}"
    assert engine.stats().prefix_hit_tokens > 0
    assert engine.stats().kv_used_blocks == 0
