"""`thaw bench structured`: engine throughput with every request under a JSON schema against the
same requests unconstrained, in one run, and where the difference goes.

The engine is built as the worker builds it (`LLMEngine.from_snapshot`, the snapshot's
tokenizer.json for grammars). Each of `--concurrency` requests gets a prompt and a schema from
the test corpus (bench/schema_corpus.py), as an array of exactly `--records` instances
(longer outputs, so decoding outweighs the prefill); its grammar is the string Python's
`llguidance.LLMatcher.grammar_from_json_schema` returns with the gateway's JSON layout options
(`--whitespace`), what the gateway sends. Decoding is
greedy with the prefix cache off, so every run of a contender computes the same prefill and
produces the same tokens.

A constrained request stops when its grammar completes; the unconstrained twin of request i gets
`max_new_tokens` = the number of tokens request i produced constrained, with `ignore_eos`. Both
contenders therefore generate the same tokens per request and run the same batch shapes step by
step: the throughput ratio is the cost of constraining alone. The contenders alternate
(C F F C C F ...) so a slow spell of this shared machine weighs on both alike; best of
`--repeat` each.

Printed: tok/s of each, the ratio, the mask time per constrained token (a step's mask
computation on the mask thread divided by its constrained rows) p50/p99, the time the sampler
waited for masks after the forward pass (the part on the critical path), the time to build the
matchers at add_request, and the per-step difference between the twin runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SNAPSHOT = Path(".thaw/snapshots/default")
REPO = Path(__file__).resolve().parent.parent
# llguidance JSON compile options per --whitespace; "gateway" is what rust_gateway's
# constraint::with_output_style sets on every schema that does not set its own.
LAYOUTS: dict[str, dict[str, Any] | None] = {
    "gateway": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    "compact": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
    "flexible": None,
}


@dataclass
class Workload:
    names: list[str]
    prompts: list[list[int]]
    schemas: list[dict[str, Any]]
    grammars: list[str]


@dataclass
class RunResult:
    seconds: float
    tokens: int
    step_seconds: list[float]
    add_seconds: float  # add_request for every request (matchers built there)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    mask_compute: list[tuple[int, float]] = field(default_factory=list)  # (rows, s) per step
    mask_wait: list[float] = field(default_factory=list)  # s per step with masks


@dataclass
class Report:
    concurrency: int
    dtype: str
    whitespace: str
    records: int
    requests_tokens: int  # generated tokens per run, both contenders
    constrained_tok_s: float
    unconstrained_tok_s: float
    ratio: float
    mask_us_per_token_p50: float
    mask_us_per_token_p99: float
    mask_step_ms_p50: float
    mask_step_ms_p99: float
    mask_wait_ms_p50: float
    mask_wait_ms_p99: float
    mask_wait_share: float  # of the constrained run's time
    matcher_build_ms_per_request: float
    step_overhead_ms_p50: float  # constrained step minus its unconstrained twin
    step_overhead_ms_p99: float
    grammar_tokenizer_load_s: float | None
    valid_outputs: int
    checked_outputs: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--snapshot", type=Path, default=DEFAULT_SNAPSHOT)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=192, help="per constrained request")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--whitespace",
        choices=sorted(LAYOUTS),
        default="gateway",
        help="JSON layout: the gateway's (no free whitespace, ', ' and ': '), compact "
        "(',' and ':') or llguidance's default (flexible)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=4,
        help="each request's schema: an array of exactly N objects of its corpus schema",
    )
    parser.add_argument("--quick", action="store_true", help="8 requests, one repeat")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.quick:
        args.concurrency, args.repeat = min(args.concurrency, 8), 1
    if args.concurrency < 1 or args.repeat < 1 or args.max_tokens < 1:
        print("error: --concurrency, --repeat and --max-tokens must be >= 1")
        return 2
    if not (args.snapshot / "tokenizer.json").is_file():
        print(f"error: {args.snapshot} has no tokenizer.json (build the default snapshot first)")
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = _engine(args)
    work = _workload(args.snapshot, args.concurrency, args.whitespace, args.records)
    _log(args, f"{args.snapshot}, {args.dtype}, {torch.get_num_threads()} threads")

    # Untimed: loads the grammar tokenizer, warms both paths, and fixes each request's length.
    load_start = time.perf_counter()
    first = _run(engine, work, args.max_tokens, None)
    grammar_load = getattr(engine.grammar_tokenizer, "load_seconds", None)
    lengths = [len(first.outputs[i]) for i in range(len(work.prompts))]
    _run(engine, work, args.max_tokens, lengths)
    _log(args, f"warm-up {time.perf_counter() - load_start:.1f}s; lengths {lengths}")

    constrained: list[RunResult] = []
    free: list[RunResult] = []
    for repeat in range(args.repeat):
        order = ("c", "f") if repeat % 2 == 0 else ("f", "c")
        for which in order:
            if which == "c":
                constrained.append(_run(engine, work, args.max_tokens, None))
            else:
                free.append(_run(engine, work, args.max_tokens, lengths))
        _log(
            args,
            f"repeat {repeat}: constrained {constrained[-1].seconds:.2f}s, "
            f"unconstrained {free[-1].seconds:.2f}s",
        )
    report = _report(args, engine, work, first, constrained, free, lengths, grammar_load)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        _print(report)
    return 0


def _engine(args: argparse.Namespace):
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine

    config = EngineConfig(
        max_num_seqs=args.concurrency,
        dtype=args.dtype,
        kv_cache_bytes=1 << 30,
        # Every run computes its whole prefill, so repeats are alike.
        enable_prefix_caching=False,
    )
    return LLMEngine.from_snapshot(args.snapshot, config)


def _workload(
    snapshot: Path, count: int, whitespace: str = "gateway", records: int = 1
) -> Workload:
    import llguidance
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    items = load_corpus(count)
    overrides = LAYOUTS[whitespace]
    schemas = [_records(item.schema, records) for item in items]
    return Workload(
        names=[item.name for item in items],
        prompts=[tokenizer.encode(f"{item.prompt}\n").ids for item in items],
        schemas=schemas,
        grammars=[
            llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
            for schema in schemas
        ],
    )


def _records(schema: dict[str, Any], count: int) -> dict[str, Any]:
    """`schema` itself for 1, else an object holding exactly `count` instances of it: longer
    outputs, so that decoding outweighs the prompt's prefill."""
    if count <= 1:
        return schema
    return {
        "type": "object",
        "properties": {
            "records": {"type": "array", "items": schema, "minItems": count, "maxItems": count}
        },
        "required": ["records"],
        "additionalProperties": False,
    }


def load_corpus(count: int) -> list[Any]:
    """The first `count` schemas of the corpus the tests use too."""
    from bench.schema_corpus import corpus

    return corpus(count=count)


def _run(engine, work: Workload, max_tokens: int, lengths: list[int] | None) -> RunResult:
    """Every request at once until all finish. lengths None: constrained, else unconstrained
    with those exact lengths."""
    from handler.engine.params import SamplingParams

    timings_before = len(getattr(engine, "mask_timings", []))
    outputs: dict[int, list[int]] = {i: [] for i in range(len(work.prompts))}
    steps: list[float] = []
    start = time.perf_counter()
    for i, prompt in enumerate(work.prompts):
        if lengths is None:
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=0.0, constraint=work.grammars[i]
            )
        else:
            params = SamplingParams(max_new_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        engine.add_request(i, prompt, params)
    added = time.perf_counter() - start
    while engine.has_unfinished():
        step_start = time.perf_counter()
        for out in engine.step():
            if out.token_id is not None:
                outputs[out.request_id].append(out.token_id)
        steps.append(time.perf_counter() - step_start)
    seconds = time.perf_counter() - start
    result = RunResult(seconds, sum(map(len, outputs.values())), steps, added, outputs)
    if lengths is not None and [len(outputs[i]) for i in range(len(lengths))] != lengths:
        raise RuntimeError("an unconstrained twin did not produce its constrained length")
    timings = list(getattr(engine, "mask_timings", []))[timings_before:]
    result.mask_compute = [(t.rows, t.compute_s) for t in timings]
    result.mask_wait = [t.wait_s for t in timings]
    return result


def _validity(engine, work: Workload, run: RunResult, snapshot: Path) -> tuple[int, int]:
    """Outputs that parse and validate against their schema (EOS stripped), of those checked."""
    from tokenizers import Tokenizer

    try:
        import jsonschema
    except ImportError:  # a test dependency; without it only parsing is checked
        jsonschema = None
    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    eos = set(engine.eos_token_ids)
    valid = 0
    for i, schema in enumerate(work.schemas):
        text = tokenizer.decode([t for t in run.outputs[i] if t not in eos])
        try:
            doc = json.loads(text)
            if jsonschema is not None:
                jsonschema.validate(doc, schema)
        except ValueError:
            continue
        except Exception as exc:  # jsonschema.ValidationError
            if type(exc).__name__ != "ValidationError":
                raise
            continue
        valid += 1
    return valid, len(work.schemas)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _report(
    args: argparse.Namespace,
    engine,
    work: Workload,
    first: RunResult,
    constrained: list[RunResult],
    free: list[RunResult],
    lengths: list[int],
    grammar_load: float | None,
) -> Report:
    best_c = min(constrained, key=lambda r: r.seconds)
    best_f = min(free, key=lambda r: r.seconds)
    tokens = sum(lengths)
    per_token = [s / rows * 1e6 for run in constrained for rows, s in run.mask_compute if rows]
    step_ms = [s * 1e3 for run in constrained for _, s in run.mask_compute]
    wait_ms = [w * 1e3 for run in constrained for w in run.mask_wait]
    # The twins run the same batch shapes: step k of one is step k of the other.
    overhead = [
        (c - f) * 1e3 for c, f in zip(best_c.step_seconds, best_f.step_seconds, strict=False)
    ]
    valid, checked = _validity(engine, work, first, args.snapshot)
    return Report(
        concurrency=len(work.prompts),
        dtype=args.dtype,
        whitespace=args.whitespace,
        records=args.records,
        requests_tokens=tokens,
        # Greedy and batch-for-batch alike, every constrained run makes the same tokens; its own
        # count is used all the same.
        constrained_tok_s=round(best_c.tokens / best_c.seconds, 1),
        unconstrained_tok_s=round(tokens / best_f.seconds, 1),
        ratio=round((best_c.tokens / best_c.seconds) / (tokens / best_f.seconds), 3),
        mask_us_per_token_p50=round(_pct(per_token, 0.5), 1),
        mask_us_per_token_p99=round(_pct(per_token, 0.99), 1),
        mask_step_ms_p50=round(_pct(step_ms, 0.5), 3),
        mask_step_ms_p99=round(_pct(step_ms, 0.99), 3),
        mask_wait_ms_p50=round(_pct(wait_ms, 0.5), 3),
        mask_wait_ms_p99=round(_pct(wait_ms, 0.99), 3),
        mask_wait_share=round(sum(best_c.mask_wait) / best_c.seconds, 4),
        matcher_build_ms_per_request=round(
            statistics.median(r.add_seconds for r in constrained) / len(work.prompts) * 1e3, 3
        ),
        step_overhead_ms_p50=round(_pct(overhead, 0.5), 3),
        step_overhead_ms_p99=round(_pct(overhead, 0.99), 3),
        grammar_tokenizer_load_s=None if grammar_load is None else round(grammar_load, 3),
        valid_outputs=valid,
        checked_outputs=checked,
    )


def _log(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, flush=True)


def _print(r: Report) -> None:
    print(
        f"c={r.concurrency} {r.dtype}, {r.whitespace} JSON whitespace, {r.records} records, "
        f"{r.requests_tokens} tokens per run\n"
        f"  constrained   {r.constrained_tok_s:8.1f} tok/s\n"
        f"  unconstrained {r.unconstrained_tok_s:8.1f} tok/s\n"
        f"  ratio         {r.ratio:.3f} (target >= 0.85)\n"
        f"  mask per constrained token p50 {r.mask_us_per_token_p50} us, "
        f"p99 {r.mask_us_per_token_p99} us (mask thread, amortised over the step's rows)\n"
        f"  mask per step p50 {r.mask_step_ms_p50} ms, p99 {r.mask_step_ms_p99} ms\n"
        f"  sampler waiting for masks per step p50 {r.mask_wait_ms_p50} ms, "
        f"p99 {r.mask_wait_ms_p99} ms ({r.mask_wait_share:.1%} of the constrained run)\n"
        f"  matchers built at add_request: {r.matcher_build_ms_per_request} ms per request\n"
        f"  step time, constrained minus its twin: p50 {r.step_overhead_ms_p50} ms, "
        f"p99 {r.step_overhead_ms_p99} ms\n"
        f"  grammar tokenizer load (first constrained request): {r.grammar_tokenizer_load_s} s\n"
        f"  valid outputs: {r.valid_outputs}/{r.checked_outputs}"
    )
