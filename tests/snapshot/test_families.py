"""Snapshots of every supported family: built from a Hugging Face directory as transformers saves
it (MoE experts one by one on disk, Phi-3's fused projections), verified against the family's
required tensors, and served greedy-exact by the engine; an unsupported architecture is refused
at build with the supported list, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from snapshot.architectures import SUPPORTED
from snapshot.errors import SnapshotError
from snapshot.verify import verify_snapshot
from tests.support.engine_fixtures import EOS_ID, build_tiny, random_prompts
from tests.support.families import FAMILIES
from tests.support.snapshot_fixtures import build, save_tiny_model, save_tiny_tokenizer

NEW_TOKENS = 12


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_verifies_and_serves_exactly(tmp_path: Path, name: str) -> None:
    architecture, overrides = FAMILIES[name]
    tiny = build_tiny(architecture, seed=2, **overrides)
    source = tmp_path / "source"
    tiny.hf_model.save_pretrained(source)
    save_tiny_tokenizer(source)
    manifest = build(source, tmp_path / "snap", dtype="float32")
    assert manifest["architecture"] == architecture
    assert verify_snapshot(tmp_path / "snap") == []

    engine = LLMEngine.from_snapshot(tmp_path / "snap", EngineConfig(max_num_seqs=4))
    prompts = random_prompts(2, 10, 40, seed=4)
    # The snapshot's EOS ids come from its tokenizer too; stop where the reference stops.
    params = SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, stop_token_ids=[EOS_ID]
    )
    outputs = engine.generate(prompts, params)
    assert outputs == [tiny.hf_greedy(p, NEW_TOKENS) for p in prompts]


def test_an_unsupported_architecture_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "src", "llama")
    config = source / "config.json"
    config.write_text(config.read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel"))
    with pytest.raises(SnapshotError) as refused:
        build(source, tmp_path / "snap")
    message = str(refused.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED)
    assert not (tmp_path / "snap").exists()


def test_bfloat16_family_snapshot_keeps_expert_tensors_stacked(tmp_path: Path) -> None:
    architecture, overrides = FAMILIES["mixtral"]
    tiny = build_tiny(architecture, **overrides)
    source = tmp_path / "source"
    tiny.hf_model.save_pretrained(source)
    save_tiny_tokenizer(source)
    # On disk transformers writes one tensor per expert (the Hub layout) ...
    from safetensors import safe_open

    with safe_open(source / "model.safetensors", "pt") as f:
        assert any(".block_sparse_moe.experts.0.w1." in k for k in f.keys())  # noqa: SIM118
    manifest = build(source, tmp_path / "snap")
    # ... and the snapshot stores what transformers loads: one stacked tensor per kind.
    shape = manifest["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]["shape"]
    assert shape == [5, 2 * tiny.hf_config["intermediate_size"], tiny.hf_config["hidden_size"]]
    assert manifest["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]["dtype"] == "bfloat16"
    assert verify_snapshot(tmp_path / "snap") == []
