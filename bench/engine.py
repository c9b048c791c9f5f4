"""`thaw bench engine`: output tokens/s of our engine against transformers, same model and dtype.

For each concurrency and workload, in one run: thaw's LLMEngine, transformers `generate` (static
batch), transformers `generate_batch` (continuous batching over its paged cache, sdpa attention),
and two ceilings, both replaying the tokens of every step of thaw's run through the model's linear
layers alone, random inputs, no attention, norms or sampling:

- ceiling: plain F.linear on the separate q, k, v, o, gate, up and down weights of every layer and
  the LM head for the rows that sample. This is the ceiling as first defined, measured before the
  engine existed; it stays as it is so figures remain comparable across runs.
- packed ceiling: the same linear layers as thaw runs them: q, k, v and gate, up fused into one
  matmul each, and every weight packed for oneDNN once where handler/model/linear.py packs it
  (bfloat16 on a CPU that supports it; elsewhere plain F.linear on the fused weights). Thaw's own
  matmuls are faster than the first ceiling's, so thaw can pass that one; this one it cannot.

Workloads: "fixed" (every request the same prompt and output length) and "random" (nano-vllm's
uniform 100-1024 input/output mix, scaled down by 8). Requests all arrive at once; outputs are
greedy and ignore EOS so every engine produces the same number of tokens.

Timing is what a user of each API waits for. thaw: from the first add_request to the last
token, with the engine already built (a server builds it once at start). transformers
`generate`: the whole call. transformers `generate_batch`: the whole call, the start-up of its
continuous-batching manager (cache allocation, warmup, thread start and stop) included, since
generate_batch builds a fresh manager on every call; `hf_cb_loop_tok_s` gives the same run
without that start-up, from the first request added to the last result, for reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    # For annotations only: like the rest of this file, handler is imported where it is used.
    from handler.model.linear import Linear

DEFAULT_SNAPSHOT = Path(".thaw/snapshots/default")
# SmolLM2-135M's shape, used with random weights when no snapshot is built yet.
SMOLLM2_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass
class Workload:
    name: str
    concurrency: int
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def key(self) -> str:
        return f"{self.name} c={self.concurrency}"

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class Result:
    workload: str
    concurrency: int
    dtype: str
    thaw_tok_s: float
    hf_static_tok_s: float | None
    hf_cb_tok_s: float | None  # the whole generate_batch call, manager start-up included
    hf_cb_loop_tok_s: float | None  # its request loop alone, for reference
    ceiling_tok_s: float  # separate plain F.linear layers, the original definition
    packed_ceiling_tok_s: float  # the linear layers as thaw runs them: fused, packed where it packs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--snapshot", type=Path, default=DEFAULT_SNAPSHOT)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated")
    parser.add_argument("--workloads", default="fixed,random", help="fixed, random or both")
    parser.add_argument("--prompt-len", type=int, default=32, help="fixed workload")
    parser.add_argument("--output-len", type=int, default=64, help="fixed workload")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for every contender"
    )
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per contender")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    parser.add_argument("--quick", action="store_true", help="short outputs, for a smoke run")


def run(args: argparse.Namespace) -> int:
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        print(f"error: --concurrency must be integers separated by commas: {args.concurrency!r}")
        return 2
    workloads = [w for w in args.workloads.split(",") if w]
    if not concurrencies or min(concurrencies) < 1 or set(workloads) - {"fixed", "random"}:
        print("error: --concurrency must be >= 1 and --workloads fixed and/or random")
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1")
            return 2
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        print("error: --repeat must be >= 1")
        return 2
    if args.quick:
        args.prompt_len, args.output_len = min(args.prompt_len, 16), min(args.output_len, 16)
        args.repeat = 1
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hf_config, weights, source = _load_model(args.snapshot, dtype)
    _log(args, f"model: {source}, {args.dtype}, {torch.get_num_threads()} threads")
    hf_model = _hf_model(hf_config, weights, dtype)
    if weights is None:
        # Random weights: thaw serves exactly the tensors transformers was initialised with.
        weights = dict(hf_model.state_dict())
    engine = _thaw_engine(hf_config, weights, dtype, max(concurrencies))
    linear = _linear_layers(hf_model)
    packed = _packed_linear_layers(hf_model)
    vocab = hf_config["vocab_size"]
    works = [
        _workload(name, concurrency, vocab, args)
        for name in workloads
        for concurrency in concurrencies
    ]
    # thaw and transformers' static batch alternate, repeat by repeat, so that a slow spell of
    # this shared machine weighs on both alike. transformers' continuous batching runs last:
    # it leaves state behind (its manager thread, caches) that must not weigh on the others.
    thaw: dict[str, float] = {}
    ceiling: dict[str, float] = {}
    packed_ceiling: dict[str, float] = {}
    static: dict[str, float] = {}
    for work in works:
        runs, static_runs = [], []
        for repeat in range(args.repeat):
            runs.append(_run_thaw_as_served(engine, work, repeat))
            if not args.no_hf:
                static_runs.append(_run_hf_static(hf_model, work))
        thaw[work.key], steps = min(runs, key=lambda run: run[0])
        if static_runs:
            static[work.key] = min(static_runs)
        replay = partial(_replay_linear, linear, steps, hf_config["hidden_size"], dtype)
        ceiling[work.key] = _fastest(args.repeat, replay)
        replay = partial(_replay_packed, packed, steps, hf_config["hidden_size"], dtype)
        packed_ceiling[work.key] = _fastest(args.repeat, replay)
        _log(args, f"{work.key}: thaw {work.output_tokens / thaw[work.key]:.1f} tok/s")
    cb: dict[str, float] = {}
    cb_loop: dict[str, float] = {}
    if not args.no_hf:
        for work in works:
            cb_runs = [_run_hf_cb(hf_model, work) for _ in range(args.repeat)]
            cb[work.key] = min(whole for whole, _ in cb_runs)
            cb_loop[work.key] = min(loop for _, loop in cb_runs)
    results = [
        Result(
            workload=work.name,
            concurrency=work.concurrency,
            dtype=args.dtype,
            thaw_tok_s=round(work.output_tokens / thaw[work.key], 1),
            hf_static_tok_s=_rate(work, static.get(work.key)),
            hf_cb_tok_s=_rate(work, cb.get(work.key)),
            hf_cb_loop_tok_s=_rate(work, cb_loop.get(work.key)),
            ceiling_tok_s=round(work.output_tokens / ceiling[work.key], 1),
            packed_ceiling_tok_s=round(work.output_tokens / packed_ceiling[work.key], 1),
        )
        for work in works
    ]
    for result in results:
        _log(args, _describe(result))
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results]}, indent=2))
    return 0


def _fastest(repeat: int, run: Callable[[], float]) -> float:
    # The machine is shared: a busy neighbour only ever makes a run slower.
    return min(run() for _ in range(repeat))


def _rate(work: Workload, seconds: float | None) -> float | None:
    return None if seconds is None else round(work.output_tokens / seconds, 1)


def _log(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, flush=True)


def _describe(r: Result) -> str:
    def ratio(peer: float | None) -> str:
        return "-" if not peer else f"{r.thaw_tok_s / peer:.2f}x"

    return (
        f"{r.workload:>6} c={r.concurrency:<3} thaw {r.thaw_tok_s:8.1f} tok/s | "
        f"hf static {r.hf_static_tok_s or 0:7.1f} ({ratio(r.hf_static_tok_s)}) | "
        f"hf cb {r.hf_cb_tok_s or 0:7.1f} ({ratio(r.hf_cb_tok_s)}; loop alone "
        f"{r.hf_cb_loop_tok_s or 0:.1f}) | "
        f"ceiling {r.ceiling_tok_s:7.1f} ({r.thaw_tok_s / r.ceiling_tok_s:.0%}) | "
        f"packed ceiling {r.packed_ceiling_tok_s:7.1f} "
        f"({r.thaw_tok_s / r.packed_ceiling_tok_s:.0%})"
    )


def _load_model(
    snapshot: Path, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, str]:
    if (snapshot / "config.json").exists():
        from snapshot.loader import load_snapshot

        snap = load_snapshot(snapshot, "cpu")
        return snap.config, snap.weights, f"snapshot {snapshot}"
    return dict(SMOLLM2_SHAPE), None, "random weights, SmolLM2-135M shape (no snapshot found)"


def _hf_model(hf_config: dict[str, Any], weights: dict[str, torch.Tensor] | None, dtype):
    import transformers

    arch = hf_config["architectures"][0]
    # The model class's own config class: Gemma3ForCausalLM's is Gemma3TextConfig, not the
    # multimodal Gemma3Config its name suggests.
    config = getattr(transformers, arch).config_class.from_dict(hf_config)
    model = getattr(transformers, arch)._from_config(config, attn_implementation="sdpa")
    model = model.to(dtype).eval()
    if weights is not None:
        model.load_state_dict(_dense(weights, dtype), strict=False)
    return model


def _dense(weights: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A quantized snapshot's weights de-quantized for transformers (and the ceilings, which
    therefore measure the dense model)."""
    from snapshot.quant.format import QuantizedTensor

    return {
        name: w.dequantize(torch.float32).to(dtype) if isinstance(w, QuantizedTensor) else w
        for name, w in weights.items()
    }


def _thaw_engine(
    hf_config: dict[str, Any], weights: dict[str, torch.Tensor], dtype: torch.dtype, max_seqs: int
):
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine
    from handler.model.config import ModelConfig

    config = EngineConfig(max_num_seqs=max_seqs, dtype=dtype, kv_cache_bytes=1 << 30)
    return LLMEngine(ModelConfig.from_hf_config(hf_config), weights, [], config)


def _workload(name: str, concurrency: int, vocab: int, args: argparse.Namespace) -> Workload:
    rng = random.Random(concurrency)
    if name == "fixed":
        prompt_lens = [args.prompt_len] * concurrency
        output_lens = [args.output_len] * concurrency
    else:
        # nano-vllm draws both from 100..1024; a 2-core CPU gets an eighth of that.
        low, high = (12, 128) if not args.quick else (4, 32)
        prompt_lens = [rng.randint(low, high) for _ in range(concurrency)]
        output_lens = [rng.randint(low, high) for _ in range(concurrency)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    return Workload(name, concurrency, prompts, output_lens)


def _run_thaw_as_served(engine, work: Workload, repeat: int) -> tuple[float, list[tuple[int, int]]]:
    """_run_thaw as thaw's worker runs: start-up objects frozen out of the cyclic collector
    (handler/worker.py). The transformers peers run as their users run them, without."""
    gc.freeze()
    try:
        return _run_thaw(engine, work, repeat)
    finally:
        gc.unfreeze()


def _run_thaw(engine, work: Workload, repeat: int) -> tuple[float, list[tuple[int, int]]]:
    """Seconds for the whole workload, and (tokens, sampled rows) of every step.

    Each repeat changes every prompt's first token: the engine keeps its prefix cache between
    runs, and a repeat served from an earlier run's cache would skip the prefill that the
    transformers peers pay on every call.
    """
    from handler.engine.params import SamplingParams

    vocab = engine.model_config.vocab_size

    def submit() -> None:
        for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
            params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
            fresh = [(prompt[0] + 7919 * repeat) % vocab, *prompt[1:]]
            engine.add_request(i, fresh, params)

    engine.generate([work.prompts[0][:8]], _warmup_params())
    hits_before = engine.stats().prefix_hit_tokens
    steps: list[tuple[int, int]] = []
    start = time.perf_counter()
    submit()
    produced = 0
    while engine.has_unfinished():
        outputs = engine.step()
        produced += len(outputs)
        steps.append((engine.stats().last_step_tokens, len(outputs)))
    elapsed = time.perf_counter() - start
    if produced != work.output_tokens:
        raise RuntimeError(f"thaw produced {produced} tokens, expected {work.output_tokens}")
    if engine.stats().prefix_hit_tokens != hits_before:
        raise RuntimeError("a timed run was served from the prefix cache; its prompts must be new")
    return elapsed, steps


def _warmup_params():
    from handler.engine.params import SamplingParams

    return SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def _run_hf_static(model, work: Workload) -> float:
    width = max(len(p) for p in work.prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in work.prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in work.prompts])
    longest = max(work.output_lens)
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        # A static batch runs until its longest request is done; only requested tokens count.
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
        )
        return time.perf_counter() - start


def _run_hf_cb(model, work: Workload) -> tuple[float, float]:
    """Seconds for transformers' continuous batching: the whole call, and its request loop alone.

    This is `model.generate_batch(...)` step for step (manager built with the same workload
    hints, warmed up, started, fed, drained, stopped and destroyed), inlined only because
    generate_batch takes one max_new_tokens for every request and the random workload needs one
    per request. The first figure covers all of it, as a user calling generate_batch pays it;
    the second starts once the manager is running and stops at the last result.
    """
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in work.prompts),
        max_generated_length=max(work.output_lens),
        num_requests=len(work.prompts),
    )
    config = GenerationConfig(
        max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=-1
    )
    try:
        # No inference_mode here: transformers' generation thread updates its tensors in place.
        start = time.perf_counter()
        with model.continuous_batching_context_manager(
            generation_config=config, block=True, timeout=5, workload_hints=hints
        ) as manager:
            loop_start = time.perf_counter()
            for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
                manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
            finished, produced = 0, 0
            while finished < len(work.prompts):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    finished += 1
                    produced += len(result.generated_tokens)
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
            loop = time.perf_counter() - loop_start
        whole = time.perf_counter() - start
    finally:
        # generate_batch's manager may switch the attention implementation; put sdpa back.
        model.set_attn_implementation("sdpa")
    if produced != work.output_tokens:
        raise RuntimeError(
            f"transformers produced {produced} tokens, expected {work.output_tokens}"
        )
    return whole, loop


def _linear_layers(model) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """The model's per-layer projection weights, in order, and its LM head."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            [
                attn.q_proj.weight,
                attn.k_proj.weight,
                attn.v_proj.weight,
                attn.o_proj.weight,
                mlp.gate_proj.weight,
                mlp.up_proj.weight,
                mlp.down_proj.weight,
            ]
        )
    return layers, model.lm_head.weight


def _replay_linear(
    linear: tuple[list[list[torch.Tensor]], torch.Tensor],
    steps: list[tuple[int, int]],
    hidden: int,
    dtype: torch.dtype,
) -> float:
    layers, lm_head = linear
    intermediate = layers[0][6].shape[1]
    # The attention output's width: heads * head_dim, which is not the hidden size everywhere.
    attended = layers[0][3].shape[1]
    with torch.inference_mode():
        start = time.perf_counter()
        for tokens, sampled in steps:
            x = torch.randn(tokens, hidden, dtype=dtype)
            act = torch.randn(tokens, intermediate, dtype=dtype)
            heads = torch.randn(tokens, attended, dtype=dtype)
            for q, k, v, o, gate, up, down in layers:
                F.linear(x, q), F.linear(x, k), F.linear(x, v), F.linear(heads, o)
                F.linear(x, gate), F.linear(x, up), F.linear(act, down)
            if sampled:
                F.linear(x[:sampled], lm_head)
        return time.perf_counter() - start


def _packed_linear_layers(model) -> tuple[list[list[Linear]], Linear]:
    """Per layer [qkv, o, gate_up, down] and the LM head, built as handler/model/weights.py does.

    make_linear packs wherever the engine would (thaw's matrix multiply when the CPU kernels
    have it, else oneDNN's layout where packing_supported), and gives plain F.linear elsewhere,
    so this follows thaw on any dtype and CPU. Biases come along where the model has them, as
    thaw applies them.
    """
    from handler.kernels.cpu import load_cpu_kernels
    from handler.model.linear import make_linear

    dtype = model.lm_head.weight.dtype
    kernels = load_cpu_kernels() if dtype == torch.bfloat16 else None

    def stacked(projections: list[torch.nn.Linear]) -> Linear:
        # One projection or several stacked into one matmul, as weights.py stacks q,k,v and gate,up.
        weight = torch.cat([p.weight.detach() for p in projections], dim=0).contiguous()
        bias = None
        if projections[0].bias is not None:
            bias = torch.cat([p.bias.detach() for p in projections], dim=0).contiguous()
        return make_linear(weight, bias, pack=True, kernels=kernels)

    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            [
                stacked([attn.q_proj, attn.k_proj, attn.v_proj]),
                stacked([attn.o_proj]),
                stacked([mlp.gate_proj, mlp.up_proj]),
                stacked([mlp.down_proj]),
            ]
        )
    return layers, make_linear(model.lm_head.weight.detach(), None, pack=True, kernels=kernels)


def _replay_packed(
    linear: tuple[list[list[Linear]], Linear],
    steps: list[tuple[int, int]],
    hidden: int,
    dtype: torch.dtype,
) -> float:
    layers, lm_head = linear
    intermediate = layers[0][3].in_features
    attended = layers[0][1].in_features
    with torch.inference_mode():
        start = time.perf_counter()
        for tokens, sampled in steps:
            x = torch.randn(tokens, hidden, dtype=dtype)
            act = torch.randn(tokens, intermediate, dtype=dtype)
            heads = torch.randn(tokens, attended, dtype=dtype)
            for qkv, o, gate_up, down in layers:
                qkv(x), o(heads), gate_up(x), down(act)
            if sampled:
                lm_head(x[:sampled])
        return time.perf_counter() - start
