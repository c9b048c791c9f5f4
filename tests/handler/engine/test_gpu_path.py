"""The engine's GPU path, checked on a CPU: the Triton backend (interpreted) and the CUDA-graph
decode path (capture replaced by its eager stand-in) give the torch backend's greedy tokens; the
backend choice; KV sizing from a made-up free-memory figure; the warm profile reused.

The Triton parts run in a child process with TRITON_INTERPRET=1 set before triton is imported
(see tests/handler/attention/test_triton_paged.py for why it cannot be switched on later in
this process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handler.attention.registry import resolve_backend_name
from handler.engine.config import EngineConfig
from handler.engine.device_start import plan_device_start
from handler.engine.params import SamplingParams
from handler.engine.runner import profile_step
from tests.support.engine_fixtures import build_tiny, random_prompts
from tests.warmup.test_warm_profile import snapshot_dir  # noqa: F401 - fixture
from warmup.cuda_graphs import CaptureTiming
from warmup.kv_sizing import GIB, KVCacheShape, KVCacheTooSmall
from warmup.warm_start import GpuKind

REPO = Path(__file__).resolve().parents[3]
GREEDY = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
FAKE_GPU = GpuKind("Fake GPU 80GB", 80 * GIB)


def _start_config(**overrides: object) -> EngineConfig:
    values: dict[str, object] = {
        "block_size": 16,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 256,
        "gpu_memory_fraction": 0.9,
        "cuda_graph_max_batch": 64,
        "snapshot_dir": None,
    }
    return EngineConfig(**(values | overrides))  # type: ignore[arg-type]


# ---------------------------------------------------------------- in the child process


def _child() -> dict[str, object]:
    """Greedy tokens from the torch backend, the Triton backend, and Triton with decode graphs;
    and which KV slots one padded graph step wrote."""
    from warmup.cuda_graphs import capture_eagerly

    tiny = build_tiny("LlamaForCausalLM")
    prompts = random_prompts(3, 5, 20, seed=7)
    results: dict[str, object] = {}
    for name in ("torch", "triton"):
        engine = tiny.engine(attention_backend=name, num_kv_blocks=32)
        results[name] = engine.generate(prompts, GREEDY)
    engine = tiny.engine(attention_backend="triton", num_kv_blocks=32)
    max_blocks = -(-engine.max_model_len // engine.config.block_size)
    timings = engine.runner.capture_decode_graphs(4, max_blocks, capture_fn=capture_eagerly)
    results["captured"] = [t.batch for t in timings]
    results["graphs"] = engine.generate(prompts, GREEDY)
    results["graph_steps"] = engine.runner.graph_steps
    results["padding"] = _padded_step_writes(engine, prompts)
    return results


def _padded_step_writes(engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Three decodes replay the graph of 4: the slots written must be exactly the real rows'."""
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, SamplingParams(max_new_tokens=3, temperature=0.0))
    engine.step()  # the prefills
    seqs = [engine._live[i] for i in range(len(prompts))]
    bs = engine.config.block_size
    expected = sorted(
        s.block_table[s.num_computed_tokens // bs] * bs + s.num_computed_tokens % bs for s in seqs
    )
    k_cache = engine.runner.kv_caches[0][0]
    before = k_cache.clone()
    steps = engine.runner.graph_steps
    engine.step()
    assert engine.runner.graph_steps == steps + 1, "the decode step did not replay a graph"
    changed = (k_cache != before).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
    for i in range(len(prompts)):
        engine.abort(i)
    return {"expected": expected, "written": changed}


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def child_results() -> dict[str, object]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.handler.engine.test_gpu_path"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_triton_backend_gives_the_torch_backends_greedy_tokens(child_results):
    assert child_results["triton"] == child_results["torch"]
    assert all(len(tokens) == GREEDY.max_new_tokens for tokens in child_results["torch"])


def test_decode_graphs_give_the_eager_tokens(child_results):
    assert child_results["captured"] == [4, 2, 1]  # largest first
    assert child_results["graphs"] == child_results["torch"]
    # 5 tokens for 3 prompts: the first comes from the prefill step, the other 4 from decodes.
    assert child_results["graph_steps"] == 4


def test_padded_graph_rows_write_no_kv(child_results):
    padding = child_results["padding"]
    assert len(padding["expected"]) == 3
    assert padding["written"] == padding["expected"]


def test_auto_backend_is_torch_on_the_cpu():
    tiny = build_tiny("LlamaForCausalLM")
    engine = tiny.engine(num_kv_blocks=16)
    assert engine.config.attention_backend == "auto"
    assert engine.attention_backend == "torch"
    assert engine.runner.graphs is None and engine.graph_timings == []
    assert engine.device_start is None


def test_auto_backend_on_cuda_is_flash_only_when_it_fits():
    cuda = torch.device("cuda")
    have_flash = __import__("importlib").util.find_spec("flash_attn") is not None
    assert resolve_backend_name("auto", cuda, 16) == "triton"
    assert resolve_backend_name("auto", cuda, 256) == ("flash" if have_flash else "triton")
    assert resolve_backend_name("triton", torch.device("cpu"), 16) == "triton"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_backend": "cudnn"}, "unknown attention backend"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"gpu_memory_fraction": 0.0}, "gpu_memory_fraction"),
        ({"cuda_graph_max_batch": -1}, "cuda_graph_max_batch"),
    ],
)
def test_bad_gpu_settings_are_clear_errors(overrides, message):
    tiny = build_tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match=message):
        tiny.engine(num_kv_blocks=16, **overrides)


def test_kv_sizing_from_free_memory_after_the_weights():
    cache = KVCacheShape(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype_bytes=2)
    free, headroom = 20 * GIB, GIB
    start = plan_device_start(
        _start_config(), cache, "bfloat16", FAKE_GPU, lambda: headroom, lambda: free
    )
    assert start.num_kv_blocks == (int(free * 0.9) - headroom) // cache.bytes_per_block
    # The graphs never exceed the scheduler's batch.
    assert start.plan.capture_sizes == [1, 2, 4, 8]
    no_graphs = plan_device_start(
        _start_config(cuda_graph_max_batch=0),
        cache,
        "bfloat16",
        FAKE_GPU,
        lambda: headroom,
        lambda: free,
    )
    assert no_graphs.plan.capture_sizes == []
    with pytest.raises(KVCacheTooSmall):
        plan_device_start(
            _start_config(), cache, "bfloat16", FAKE_GPU, lambda: headroom, lambda: headroom
        )


def test_warm_profile_is_written_then_reused(snapshot_dir):  # noqa: F811
    cache = KVCacheShape(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype_bytes=2)
    calls: list[str] = []

    def measure() -> int:
        calls.append("measure")
        return 64 << 20

    def free() -> int:
        calls.append("free")
        return 4 * GIB

    config = _start_config(snapshot_dir=snapshot_dir)
    first = plan_device_start(config, cache, "bfloat16", FAKE_GPU, measure, free)
    assert not first.plan.from_profile and calls == ["measure", "free"]
    assert first.record([CaptureTiming(8, 0.01), CaptureTiming(4, 0.01)])
    manifest = json.loads((snapshot_dir / "manifest.json").read_text())
    assert FAKE_GPU.key in manifest["warm_profiles"]

    second = plan_device_start(config, cache, "bfloat16", FAKE_GPU, measure, free)
    assert second.plan.from_profile and calls == ["measure", "free"]  # nothing measured again
    assert second.num_kv_blocks == first.num_kv_blocks
    assert second.plan.capture_sizes == first.plan.capture_sizes
    assert not second.record([])  # a reused profile is not rewritten

    other = plan_device_start(
        _start_config(snapshot_dir=snapshot_dir, gpu_memory_fraction=0.5),
        cache,
        "bfloat16",
        FAKE_GPU,
        measure,
        free,
    )
    assert not other.plan.from_profile  # another setting measures again


def test_profile_step_runs_the_largest_step_without_a_kv_cache():
    tiny = build_tiny("LlamaForCausalLM")
    engine = tiny.engine(num_kv_blocks=16)
    before = [k.clone() for k, _ in engine.runner.kv_caches]
    with torch.inference_mode():
        profile_step(engine.runner.model, 16, num_tokens=100, num_seqs=8, max_seq_len=40)
    assert all(torch.equal(k, b) for (k, _), b in zip(engine.runner.kv_caches, before, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh)")
def test_on_cuda_the_engine_sizes_its_cache_captures_and_replays():
    tiny = build_tiny("LlamaForCausalLM")
    prompts = random_prompts(3, 5, 20, seed=7)
    # A small fraction each: both engines share the GPU.
    eager = tiny.engine(
        device="cuda", attention_backend="triton", cuda_graph_max_batch=0, gpu_memory_fraction=0.05
    )
    graphs = tiny.engine(device="cuda", cuda_graph_max_batch=8, gpu_memory_fraction=0.05)
    assert eager.runner.graphs is None and eager.device_start is not None
    assert graphs.attention_backend in ("triton", "flash")
    assert [t.batch for t in graphs.graph_timings] == [8, 4, 2, 1]
    assert graphs.generate(prompts, GREEDY) == eager.generate(prompts, GREEDY)
    assert graphs.runner.graph_steps == GREEDY.max_new_tokens - 1


if __name__ == "__main__":
    print(json.dumps(_child()))
