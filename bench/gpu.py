"""`thaw bench gpu` (or `python -m bench.gpu`): the GPU measurements of the GPU-path issue in one
process, each section independent, results as JSON and a table printed last.

Sections:
- h2d: pinned (and pageable) host-to-device bandwidth, and the device-to-device copy ceiling;
- kernels: the Triton kernels against the torch reference at serving sizes, then their speed
  (decode as GB/s of KV read, prefill as TFLOP/s, beside torch SDPA on a dense layout);
- graphs: decode at batch 1 with and without CUDA graphs (the engine's Llama model, Triton backend),
  and the same through the whole engine (its own graph path against cuda_graph_max_batch=0);
- throughput: nano-vllm's shape (256 sequences, prompt and output lengths uniform in 100-1024)
  through the engine (its KV sizing, attention choice and decode graphs), and the same prompts
  through transformers `generate_batch` (paged|sdpa);
- coldstart: a fresh worker process, exec -> first token, with its timeline.

Models are random-weight (same shapes as SmolLM2-135M and a ~1B Llama), built on the device:
throughput does not depend on the weights' values when EOS is ignored. `--device cpu --tiny` runs
every section's code path on a CPU with a tiny model, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_models import MODELS, make_random_snapshot, random_hf_model
from bench.gpu_summary import print_summary

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("h2d", "kernels", "graphs", "throughput", "coldstart")

# ---------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of fn() with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


# ---------------------------------------------------------------- h2d


def section_h2d(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type != "cuda":
        return {"note": "needs CUDA"}
    nbytes = int(args.h2d_gib * (1 << 30))
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    pageable = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    other = torch.empty_like(target)
    pinned_s = median_seconds(lambda: target.copy_(pinned, non_blocking=True), device, 5, 1)
    pageable_s = median_seconds(lambda: target.copy_(pageable), device, 3, 1)
    d2d_s = median_seconds(lambda: other.copy_(target), device, 10, 2)
    gb = nbytes / 1e9
    return {
        "bytes": nbytes,
        "h2d_pinned_gbps": gb / pinned_s,
        "h2d_pageable_gbps": gb / pageable_s,
        "d2d_gbps": 2 * gb / d2d_s,  # bytes read plus bytes written
    }


# ---------------------------------------------------------------- kernels


def _paged_case(batch, context, num_heads, num_kv_heads, head_dim, block_size, dtype, device):
    """Random caches with shuffled block tables; every sequence has `context` cached tokens."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    order = torch.randperm(num_blocks - 1, device=device)[: batch * blocks_per_seq]
    tables = order.view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens


def section_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from handler.attention import triton_paged as tp
    from tests.handler.attention import paged_reference as ref

    device = torch.device(args.device)
    dtype = torch.bfloat16
    heads, kv_heads, head_dim, block = (8, 2, 64, 16) if args.tiny else (32, 8, 128, 16)
    out: dict[str, Any] = {}

    # Correctness at serving sizes (a few sequences; the float64 reference is slow).
    k_cache, v_cache, tables, lens = _paged_case(
        4, 777, heads, kv_heads, head_dim, block, dtype, device
    )
    q = torch.randn(4, heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    got = tp.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    want = ref.paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)
    out["decode_rel_err"] = rel_error(got, want)
    new = torch.tensor([300, 1, 77, 500], dtype=torch.int32, device=device)
    cu = torch.zeros(5, dtype=torch.int32, device=device)
    cu[1:] = new.cumsum(0)
    qp = torch.randn(int(new.sum()), heads, head_dim, dtype=dtype, device=device)
    got = tp.paged_prefill_attention(qp, k_cache, v_cache, tables, cu, lens, scale)
    want = ref.paged_prefill_attention_reference(qp, k_cache, v_cache, tables, cu, lens, scale)
    out["prefill_rel_err"] = rel_error(got, want)

    if device.type != "cuda":
        return out
    import torch.nn.functional as F
    from triton.testing import do_bench

    # Decode: 64 sequences x 1024 cached tokens; the floor is reading their K and V once.
    batch, context = 64, 1024
    k_cache, v_cache, tables, lens = _paged_case(
        batch, context, heads, kv_heads, head_dim, block, dtype, device
    )
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
    ms = do_bench(
        lambda: tp.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale),
        return_mode="median",
    )
    kv_bytes = 2 * batch * context * kv_heads * head_dim * dtype.itemsize
    out["decode_b64_ctx1024_us"] = ms * 1e3
    out["decode_kv_gbps"] = kv_bytes / (ms * 1e-3) / 1e9

    # Prefill: 4 prompts of 2048 tokens, no cached prefix; against SDPA on a dense layout.
    batch, length = 4, 2048
    k_cache, v_cache, tables, lens = _paged_case(
        batch, length, heads, kv_heads, head_dim, block, dtype, device
    )
    qp = torch.randn(batch * length, heads, head_dim, dtype=dtype, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
    ms = do_bench(
        lambda: tp.paged_prefill_attention(
            qp, k_cache, v_cache, tables, cu, lens, scale, max_seqlen_q=length
        ),
        return_mode="median",
    )
    flops = 4 * batch * heads * head_dim * length * length / 2  # causal: half the square
    out["prefill_4x2048_ms"] = ms
    out["prefill_tflops"] = flops / (ms * 1e-3) / 1e12
    dq = torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device)
    dk = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
    ms_sdpa = do_bench(
        lambda: F.scaled_dot_product_attention(dq, dk, dk, is_causal=True, enable_gqa=True),
        return_mode="median",
    )
    out["sdpa_dense_tflops"] = flops / (ms_sdpa * 1e-3) / 1e12
    return out


# ---------------------------------------------------------------- graphs


def section_graphs(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        return {"note": "needs CUDA"}
    results: dict[str, Any] = {}
    for name in args.models:
        results |= {f"{name}_{k}": v for k, v in _graphs_for_model(MODELS[name], args).items()}
        _release(device)
        results |= {f"{name}_{k}": v for k, v in _engine_decode_b1(MODELS[name], args).items()}
        _release(device)
    return results


def _graphs_for_model(hf: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from handler.attention.base import AttentionMetadata
    from handler.attention.triton_paged import TritonPagedBackend
    from handler.engine.kv_cache import allocate_kv_caches
    from handler.engine.runner import BoundModel
    from handler.model import LlamaModel, ModelConfig
    from warmup.cuda_graphs import (
        CudaGraphDecodeRunner,
        DecodeInputs,
        capture_cuda_graph,
        capture_eagerly,
    )

    device = torch.device(args.device)
    cfg = ModelConfig.from_hf_config(hf)
    weights = random_hf_model(hf, device, torch.bfloat16).state_dict()
    model = LlamaModel(cfg, weights, torch.bfloat16, device, TritonPagedBackend(), 4096)
    del weights
    block_size, context, max_blocks = 16, 512, 64
    caches = allocate_kv_caches(cfg, 8 * max_blocks, block_size, torch.bfloat16, device)
    for k_cache, v_cache in caches:
        k_cache.normal_()
        v_cache.normal_()
    bound = BoundModel(model, caches)
    # Off CUDA (a --tiny dry run) the graphs are replayed eagerly: the flow, not the speed.
    capture = capture_cuda_graph if device.type == "cuda" else capture_eagerly
    runner = CudaGraphDecodeRunner(
        bound,
        AttentionMetadata.for_decode_graph,
        args.max_graph_batch,
        max_blocks,
        block_size,
        device,
        capture,
    )
    timings = runner.capture()
    out: dict[str, Any] = {
        "capture_total_s": sum(t.seconds for t in timings),
        "captured_sizes": len(timings),
    }

    def step_inputs(batch: int) -> DecodeInputs:
        tables = torch.arange(batch * max_blocks, dtype=torch.int32, device=device)
        tables = tables.view(batch, max_blocks)[:, : context // block_size]
        slots = tables[:, -1].long() * block_size + (context - 1) % block_size
        return DecodeInputs(
            input_ids=torch.randint(0, hf["vocab_size"], (batch,), device=device),
            positions=torch.full((batch,), context - 1, dtype=torch.int64, device=device),
            slot_mapping=slots,
            block_tables=tables,
            context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        )

    for batch in (1, 5):  # 5 replays the graph of 8: three padded rows
        step = step_inputs(batch)
        eager = bound.forward(step.input_ids, step.positions, _decode_meta(step, block_size))
        out[f"b{batch}_graph_vs_eager_rel_err"] = rel_error(runner.run(step), eager)

    step = step_inputs(1)
    meta = _decode_meta(step, block_size)

    def eager_token() -> torch.Tensor:
        hidden = bound.forward(step.input_ids, step.positions, meta)
        return model.compute_logits(hidden).argmax(-1)

    def graph_token() -> torch.Tensor:
        return model.compute_logits(runner.run(step)).argmax(-1)

    eager_s = median_seconds(eager_token, device, 100, 10)
    graph_s = median_seconds(graph_token, device, 100, 10)
    out["b1_eager_ms"] = eager_s * 1e3
    out["b1_graph_ms"] = graph_s * 1e3
    out["b1_graph_speedup"] = eager_s / graph_s
    return out


def _engine_decode_b1(hf: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One sequence decoding through LLMEngine.step, with the engine's decode graphs and without:
    what a lone request sees, scheduling and sampling included."""
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine
    from handler.engine.params import SamplingParams
    from handler.model import ModelConfig
    from warmup.cuda_graphs import capture_eagerly

    device = torch.device(args.device)
    cfg = ModelConfig.from_hf_config(hf)
    weights = random_hf_model(hf, device, torch.bfloat16).state_dict()
    prompt = [random.Random(1).randrange(hf["vocab_size"]) for _ in range(32 if args.tiny else 512)]
    new_tokens = 8 if args.tiny else 128
    out: dict[str, Any] = {}
    for graph_batch in (0, args.max_graph_batch):
        config = EngineConfig(
            num_kv_blocks=256,
            max_num_seqs=max(args.max_graph_batch, 1),
            max_model_len=2048,
            device=str(device),
            dtype=torch.bfloat16,
            attention_backend="triton",
            cuda_graph_max_batch=graph_batch,
        )
        engine = LLMEngine(cfg, weights, [], config)
        if device.type != "cuda" and graph_batch:
            # A --tiny dry run: the engine's graph path with capture replaced by eager replay.
            engine.runner.capture_decode_graphs(
                graph_batch, -(-engine.max_model_len // 16), capture_fn=capture_eagerly
            )
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for _ in range(2):  # the first run compiles the kernels
            engine.add_request(0, prompt, params)
            engine.step()  # the prefill (and the first token)
            sync(device)
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            sync(device)
            seconds = time.perf_counter() - start
        label = "graph" if graph_batch else "eager"
        out[f"engine_b1_{label}_ms"] = seconds * 1e3 / (new_tokens - 1)
        if graph_batch:
            out["engine_b1_graph_steps"] = engine.runner.graph_steps
        del engine
        _release(device)
    out["engine_b1_graph_speedup"] = out["engine_b1_eager_ms"] / out["engine_b1_graph_ms"]
    return out


def _decode_meta(step, block_size: int):
    from handler.attention.base import AttentionMetadata

    batch = step.batch
    lens = step.context_lens.tolist()
    return AttentionMetadata(
        num_seqs=batch,
        num_decode_tokens=batch,
        slot_mapping=step.slot_mapping,
        block_tables=step.block_tables,
        context_lens=step.context_lens,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=step.input_ids.device),
        max_query_len=1,
        max_context_len=max(lens),
        block_size=block_size,
        query_start_loc_host=list(range(batch + 1)),
        context_lens_host=lens,
    )


# ---------------------------------------------------------------- throughput


def nano_vllm_workload(
    num_seqs: int, vocab: int, low: int, high: int, seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's benchmark: random prompts and output lengths, uniform in [low, high]."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(num_seqs)
    ]
    outputs = [rng.randint(low, high) for _ in range(num_seqs)]
    return prompts, outputs


def thaw_throughput(
    hf_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    prompts: list[list[int]],
    out_lens: list[int],
    device: torch.device,
    max_num_seqs: int,
) -> dict[str, float]:
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine
    from handler.engine.params import SamplingParams
    from handler.model import ModelConfig
    from warmup.kv_sizing import GIB

    cfg = ModelConfig.from_hf_config(hf_config)
    # On CUDA the engine sizes its cache from the free memory (half of it: transformers' run
    # follows on the same GPU) and captures decode graphs up to the full batch; off CUDA a
    # fixed budget, no graphs.
    config = EngineConfig(
        block_size=16,
        kv_cache_bytes=None if device.type == "cuda" else GIB // 4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192,
        max_model_len=2048,
        device=str(device),
        dtype=torch.bfloat16,
        gpu_memory_fraction=0.5,
        cuda_graph_max_batch=max_num_seqs,
    )
    started = time.perf_counter()
    engine = LLMEngine(cfg, weights, [], config)
    start_s = time.perf_counter() - started
    # Warm-up: compile the kernels for prefill and decode shapes outside the timing.
    engine.add_request(-1, prompts[0][:50], SamplingParams(max_new_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    for i, (prompt, n) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(
            i, prompt, SamplingParams(max_new_tokens=n, temperature=0.6, ignore_eos=True)
        )
    sync(device)
    start = time.perf_counter()
    generated = 0
    while engine.has_unfinished():
        generated += sum(1 for o in engine.step() if o.token_id is not None)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "tok_s": generated / seconds,
        "tokens": generated,
        "seconds": seconds,
        "engine_start_s": start_s,
        "kv_blocks": engine.num_blocks,
        "graphs": len(engine.graph_timings),
        "graph_step_share": engine.runner.graph_steps / max(engine.stats().steps, 1),
    }


def hf_throughput(model, prompts: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """transformers' continuous batching on the same GPU (paged|sdpa), EOS never stops early."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    model.set_attn_implementation("paged|sdpa")
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    kwargs = {} if device.type == "cuda" else _small_cb_cache()
    warmup = [p[:32] for p in prompts[:4]]
    model.generate_batch(inputs=warmup, generation_config=gen, **kwargs)
    sync(device)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {"tok_s": generated / seconds, "tokens": generated, "seconds": seconds}


def _small_cb_cache() -> dict[str, Any]:
    """Off CUDA, transformers sizes its paged cache from host memory (gigabytes); cap it so a
    CPU dry run does not crowd the machine. On the GPU its own sizing stands."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return {}
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=64)}


def section_throughput(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    low, high = (100, 1024) if not args.tiny else (10, 40)
    for name in args.models:
        hf = MODELS[name]
        model = random_hf_model(hf, device, torch.bfloat16)
        weights = model.state_dict()
        prompts, out_lens = nano_vllm_workload(args.seqs, hf["vocab_size"], low, high)
        run = thaw_throughput(hf, weights, prompts, out_lens, device, max_num_seqs=args.seqs)
        results[f"{name}_thaw_nano_tok_s"] = run["tok_s"]
        results[f"{name}_thaw_nano_s"] = run["seconds"]
        for key in ("engine_start_s", "kv_blocks", "graphs", "graph_step_share"):
            results[f"{name}_thaw_{key}"] = run[key]
        _release(device)
        # Side by side with generate_batch on a subset, one output length for all (its API).
        subset, fixed = prompts[: args.hf_seqs], (low + high) // 2
        run = thaw_throughput(
            hf, weights, subset, [fixed] * len(subset), device, max_num_seqs=args.seqs
        )
        results[f"{name}_thaw_same_tok_s"] = run["tok_s"]
        _release(device)  # the engine's KV cache must not shrink transformers' own
        try:
            hf_run = hf_throughput(model, subset, fixed)
            results[f"{name}_hf_cb_tok_s"] = hf_run["tok_s"]
            results[f"{name}_thaw_vs_hf_cb"] = run["tok_s"] / hf_run["tok_s"]
        except Exception as exc:  # a transformers version without generate_batch, say
            results[f"{name}_hf_cb_error"] = repr(exc)
        del model, weights
        _release(device)
    return results


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- coldstart


def section_coldstart(args: argparse.Namespace) -> dict[str, Any]:
    """A fresh worker process: exec -> engine ready -> first token, timed from the parent.

    Run twice: the first start may compile the Triton kernels (an empty kernel cache), the second
    finds them in the cache, as a serving image with a baked-in TRITON_CACHE_DIR would.
    """
    snapshot = Path(args.snapshot)
    if not (snapshot / "manifest.json").exists():
        return {"note": f"no snapshot at {snapshot}"}
    first = _coldstart_once(snapshot, args.device)
    again = _coldstart_once(snapshot, args.device)
    return first | {f"cached_kernels_{key}": value for key, value in again.items()}


def _coldstart_once(snapshot: Path, device: str) -> dict[str, float]:
    env = {**os.environ, "THAW_BENCH_T0": repr(time.time()), "PYTHONPATH": str(REPO)}
    child = [sys.executable, "-m", "bench.gpu", "--coldstart-child", str(snapshot)]
    child += ["--device", device]
    done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def coldstart_child(snapshot: str, device_name: str) -> dict[str, Any]:
    """Runs in the fresh process: every phase since the parent's exec, in seconds."""
    t0 = float(os.environ["THAW_BENCH_T0"])
    # This module imports torch at its top, so the first mark already includes it.
    marks: dict[str, float] = {"torch_imported": time.time() - t0}
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine
    from handler.engine.params import SamplingParams

    marks["imports"] = time.time() - t0
    device = torch.device(device_name)
    config = EngineConfig(device=device_name)  # the worker's defaults: auto backend, graphs

    def phase(name: str) -> None:
        marks[name] = time.time() - t0

    engine = LLMEngine.from_snapshot(snapshot, config, on_phase=phase)
    sync(device)
    marks["engine_ready"] = time.time() - t0
    # The first start on this GPU kind measures and records; the next reads the warm profile.
    profile = engine.device_start.plan.from_profile if engine.device_start else None
    engine.add_request(0, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=1, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    sync(device)
    marks["first_token"] = time.time() - t0
    return {f"{k}_s": v for k, v in marks.items()} | {"warm_profile_reused": profile}


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--models", default="smollm2-135m,llama-1b")
    parser.add_argument("--seqs", type=int, default=256, help="sequences (nano-vllm: 256)")
    parser.add_argument(
        "--hf-seqs", type=int, default=64, help="sequences for the generate_batch comparison"
    )
    parser.add_argument("--max-graph-batch", type=int, default=32)
    parser.add_argument("--h2d-gib", type=float, default=1.0)
    parser.add_argument("--snapshot", default=str(REPO / ".thaw/snapshots/default"))
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU check)")
    parser.add_argument("--json-out", type=Path, help="write all results here as they come")
    parser.add_argument(
        "--make-snapshot", type=Path, help="build a random-weight snapshot of --models here, exit"
    )
    parser.add_argument("--summary", type=Path, help="print the final table of a run's $OUT, exit")
    parser.add_argument("--coldstart-child", help=argparse.SUPPRESS)


SECTION_FUNCTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "h2d": section_h2d,
    "kernels": section_kernels,
    "graphs": section_graphs,
    "throughput": section_throughput,
    "coldstart": section_coldstart,
}


def run(args: argparse.Namespace) -> int:
    if args.summary:
        print_summary(args.summary)
        return 0
    if args.coldstart_child:
        print(json.dumps(coldstart_child(args.coldstart_child, args.device)))
        return 0
    args.models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if args.make_snapshot and not unknown:
        make_random_snapshot(args.models[0], args.make_snapshot)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTION_FUNCTIONS]
    if unknown or bad:
        print(f"unknown models {unknown} or sections {bad}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"device": _device_name(args.device)}
    failed = False
    for name in sections:
        started = time.perf_counter()
        try:
            results[name] = SECTION_FUNCTIONS[name](args)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            failed = True
        results[name]["section_s"] = round(time.perf_counter() - started, 2)
        print(f"[bench.gpu] {name}: {json.dumps(results[name])}", flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 1 if failed else 0


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / (1 << 30):.0f} GiB)"
    return "cpu"


def print_table(results: dict[str, Any]) -> None:
    print(f"\n== bench.gpu on {results['device']} ==")
    for section, values in results.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"{section:<11} {key:<40} {shown}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
