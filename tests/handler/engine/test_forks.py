"""fork_of: a fork waits for the prefill of the request it names, then shares its prompt blocks
through the prefix cache; each fork samples on its own."""

from __future__ import annotations

import pytest

from handler.engine.params import SamplingParams
from handler.engine.sequence import SequenceStatus
from tests.support.engine_fixtures import TinyModel, build_tiny, random_prompts


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=41)


PROMPT = random_prompts(1, 40, 40, seed=12)[0]  # two full blocks of 16, and 8 tokens more


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)


def test_forks_wait_for_the_prefill_then_share_its_blocks(tiny: TinyModel) -> None:
    engine = tiny.engine()
    manager = engine.block_manager
    engine.add_request(0, PROMPT, sampled(1))
    engine.add_request(1, PROMPT, sampled(2), fork_of=0)
    engine.add_request(2, PROMPT, sampled(3), fork_of=0)
    parent, forks = engine._live[0], [engine._live[1], engine._live[2]]
    engine.step()  # the parent's prefill; the forks wait though the budget had room
    assert parent.status is SequenceStatus.RUNNING
    assert all(f.status is SequenceStatus.WAITING for f in forks)
    engine.step()  # the forks are admitted onto the cached prompt blocks
    shared = parent.block_table[:2]
    for fork in forks:
        assert fork.status is SequenceStatus.RUNNING
        assert fork.block_table[:2] == shared
        assert fork.block_table[2] not in parent.block_table  # its partial block is its own
    assert [manager._blocks[b].ref_count for b in shared] == [3, 3]
    assert manager.prefix_hit_tokens == 2 * 32


def test_forks_sample_independently(tiny: TinyModel) -> None:
    def run(seeds: list[int]) -> list[list[int]]:
        engine = tiny.engine()
        for i, seed in enumerate(seeds):
            engine.add_request(i, PROMPT, sampled(seed), fork_of=None if i == 0 else 0)
        out: dict[int, list[int]] = {i: [] for i in range(len(seeds))}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id].append(o.token_id)
        return [out[i] for i in range(len(seeds))]

    tokens = run([7, 8, 7])
    assert tokens[0] == tokens[2], "same seed, same tokens"
    assert tokens[0] != tokens[1], "different seeds, different tokens"
    # A fork's tokens are those of the same request run alone.
    alone = tiny.engine().generate([PROMPT], sampled(8))[0]
    assert tokens[1] == alone


def test_a_fork_of_a_finished_or_unknown_request_runs_at_once(tiny: TinyModel) -> None:
    engine = tiny.engine()
    engine.add_request(5, PROMPT, sampled(1), fork_of=999)  # unknown: an ordinary request
    engine.add_request(6, PROMPT, sampled(1), fork_of=5)
    engine.abort(5)  # gone: the fork no longer waits
    engine.step()
    assert engine._live[6].status is SequenceStatus.RUNNING
