"""`thaw bench quant`: quantized thaw snapshots against llama.cpp's quantized GGUFs, same run.

thaw side, one process: the bf16 snapshot and the int8 / int4 snapshots that `thaw snapshot build
--quantize` makes from the same source (built once into .thaw/snapshots/bench-quant-SCHEME).
Each snapshot is loaded with LLMEngine.from_snapshot and decodes `bench engine`'s fixed workload
(PROMPT_LEN-token prompts, OUTPUT_LEN new tokens, greedy, EOS ignored, every request at once);
throughput is output tokens over the wall time of the whole batch, prefill included, from the
first add_request to the last token. Each repeat runs every scheme, each right before its
llama.cpp peers, and the best of --repeat runs counts: this machine is shared, and a busy
neighbour only ever makes a run slower.

llama.cpp side, same run, interleaved with thaw: `llama-batched-bench` (built from the
llama.cpp vendored in PyPI's llama-cpp-python sdist by scripts/build_llamacpp.sh) on GGUFs that
all come from thaw's bf16 snapshot: convert_hf_to_gguf.py makes BF16, llama-quantize makes
Q8_0, Q4_1 and Q4_0 from it. Peers: bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_1 and Q4_0 (both
reported, the ratio against the faster), and source (`--quantize source`: the packaged GGUF's
own Q4_1 blocks, kept) vs llama.cpp on that very GGUF, the one pair with identical weights.

Which llama.cpp figure: batched-bench prefills B separate prompts of PP tokens (T_PP), then
decodes TG steps of B tokens (T_TG), and prints S_TG = B*TG / T_TG and S = (B*PP + B*TG) / T.
Neither matches thaw's figure: S_TG leaves the prefill out, S counts prompt tokens as output.
We use B*TG / T: the output tokens over the whole call, prefill included, as thaw is timed
(`llamacpp_tok_s`; S_TG is kept as `llamacpp_s_tg`). llama.cpp feeds random tokens and computes
logits without sampling; thaw samples (greedy), so the comparison slightly favours llama.cpp.

exec_to_first_token_s: a fresh Python, from exec until it prints after its first generated
token: import torch, LLMEngine.from_snapshot with the worker's default EngineConfig, one greedy
token for a 4-token prompt. That is the worker's start path without the gateway and its socket
(`bench coldstart` times the full path for the default snapshot). Median of --exec-runs runs.

Accuracy: each quantized snapshot's next-token distributions against bf16's, teacher-forced
over a fixed English paragraph (ACCURACY_TOKENS tokens with the snapshot's tokenizer), taken
from the engine's own LM head: KL(bf16 || quantized) averaged over positions, and how often the
two agree on the top-1 token. The default model's source is the packaged Q4_1 GGUF, so bf16
here is Q4_1 de-quantized: int4's groups of 32 fall close to Q4_1's own grid, which flatters
int4's figures next to int8's; on weights that never were Q4_1, int8 should be the closer.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.coldstart import time_to_marker
from bench.llamacpp import (
    LLAMACPP_VERSION,
    BatchedBench,
    BatchedBenchRow,
    Gguf,
    ensure_ggufs,
    llamacpp_bin,
    run_batched_bench,
)
from thaw.serve import REPO

DEFAULT_SNAPSHOT = REPO / ".thaw" / "snapshots" / "default"
QUANT_SNAPSHOT = str(REPO / ".thaw" / "snapshots" / "bench-quant-{scheme}")
SCHEMES = ("bf16", "int8", "int4", "source")
DEFAULT_SCHEMES = "bf16,int8,int4,source"
# thaw scheme -> its llama.cpp peers; the ratio is taken against the fastest of them.
PEERS: dict[str, tuple[str, ...]] = {
    "bf16": ("BF16",),
    "int8": ("Q8_0",),
    "int4": ("Q4_1", "Q4_0"),
    "source": ("Q4_1-source",),
}
FIRST_TOKEN_MARKER = "first token"
EXEC_SCRIPT = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
engine = LLMEngine.from_snapshot(sys.argv[1], EngineConfig())
engine.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
sys.stdout.write({FIRST_TOKEN_MARKER!r} + "\\n")
sys.stdout.flush()
os._exit(0)
"""
# Teacher-forced text for the accuracy columns: plain English prose, fixed so runs compare.
ACCURACY_TEXT = (
    "The river town woke slowly on market days. Before the sun had cleared the hills, the baker "
    "had already pulled the first loaves from the oven, and the smell of warm bread drifted down "
    "the narrow street toward the water. Fishermen checked their nets by lantern light, arguing "
    "quietly about the weather and the price of salt. By seven o'clock the square was full: "
    "farmers unloaded crates of apples and cabbages, a woman sold honey in small glass jars, and "
    "children chased each other between the stalls until someone told them to stop. The old "
    "clock above the town hall had been wrong for as long as anyone could remember, so people "
    "told the time by the bells of the church instead. At noon the traders closed their "
    "awnings against the heat and ate together in the shade of the chestnut trees, sharing "
    "cheese, bread and stories about the cities they had visited when they were young. In the "
    "afternoon the river grew busy with barges carrying timber and grain to the mills "
    "downstream, and the bridge keeper collected his small toll from each of them with a nod. "
    "When evening came, the lamps were lit one by one along the quay, the last customers "
    "counted their change, and the town settled back into the quiet it had known for three "
    "hundred years. Nobody who lived there thought it remarkable, but visitors often stayed "
    "longer than they had planned, and a few of them never left at all."
)
ACCURACY_TOKENS = 256


@dataclass
class SchemeSnapshot:
    """A thaw snapshot under test, or why it is missing."""

    scheme: str
    path: Path
    error: str | None = None

    @property
    def weight_bytes(self) -> int | None:
        return None if self.error else snapshot_weight_bytes(self.path)


@dataclass
class Accuracy:
    kl: float  # mean KL(bf16 || this) over positions, nats
    top1: float  # share of positions where both pick the same top token


@dataclass
class Row:
    """One scheme at one concurrency: thaw and its llama.cpp peers."""

    scheme: str
    concurrency: int
    thaw_tok_s: float | None
    llamacpp_peer: str | None  # the peer the ratio is taken against (the fastest)
    llamacpp_tok_s: float | None
    ratio: float | None  # thaw / peer
    llamacpp: dict[str, float] = field(default_factory=dict)  # every peer: output tok/s
    llamacpp_s_tg: dict[str, float] = field(default_factory=dict)  # every peer: S_TG, reference
    snapshot_bytes: int | None = None
    gguf_bytes: int | None = None  # the ratio's peer's file
    gguf_bytes_by_peer: dict[str, int] = field(default_factory=dict)
    exec_to_first_token_s: float | None = None
    kl_vs_bf16: float | None = None
    top1_vs_bf16: float | None = None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--snapshot",
        type=Path,
        default=DEFAULT_SNAPSHOT,
        help="the bf16 reference (int8, int4 and source are built --from default)",
    )
    parser.add_argument(
        "--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated, of {', '.join(SCHEMES)}"
    )
    parser.add_argument("--concurrency", default="1,32", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="best of N alternating runs")
    parser.add_argument("--exec-runs", type=int, default=3, help="exec -> first token runs")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both sides")
    parser.add_argument("--no-llamacpp", action="store_true", help="thaw side only")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the KL / top-1 columns")
    parser.add_argument("--rebuild", action="store_true", help="rebuild quantized snapshots")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")


def run(args: argparse.Namespace) -> int:
    error = _check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    schemes = [s for s in args.schemes.split(",") if s]
    if args.quick:
        args.prompt_len, args.output_len = min(args.prompt_len, 16), min(args.output_len, 16)
        args.repeat, args.exec_runs = 1, 1
    log = _logger(args)

    snapshots = {s: _scheme_snapshot(s, args, log) for s in schemes}
    engines, errors = _engines(snapshots, max(concurrencies), log)
    ggufs: dict[str, Gguf] = {}
    bin_dir: Path | None = None
    if not args.no_llamacpp:
        bin_dir = llamacpp_bin(log)
        wanted = sorted({p for s in schemes for p in PEERS[s]})
        ggufs = ensure_ggufs(bin_dir, args.snapshot, wanted, log)

    thaw_s, llama = _timed_runs(schemes, engines, ggufs, concurrencies, bin_dir, threads, args, log)
    accuracy = {} if args.no_accuracy else _accuracy(engines, args, log)
    exec_s = {s: exec_to_first_token(snapshots[s].path, args.exec_runs) for s in engines}

    rows = [
        peer_row(scheme, c, snapshots[scheme], errors.get(scheme), thaw_s, llama, ggufs)
        for scheme in schemes
        for c in concurrencies
    ]
    for row in rows:
        row.exec_to_first_token_s = _round(exec_s.get(row.scheme), 3)
        if row.scheme in accuracy:
            row.kl_vs_bf16 = float(f"{accuracy[row.scheme].kl:.3g}")  # KLs span decades
            row.top1_vs_bf16 = _round(accuracy[row.scheme].top1, 4)
    result = {
        "config": {
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "concurrency": concurrencies,
            "repeat": args.repeat,
            "threads": threads,
            "llamacpp": None if bin_dir is None else _batched(args, threads).command(Path("GGUF")),
            "llama_cpp_python_sdist": LLAMACPP_VERSION,
            "accuracy_tokens": _accuracy_tokens(args),
        },
        "results": [asdict(r) for r in rows],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(rows)
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        return f"--concurrency must be integers separated by commas: {args.concurrency!r}"
    schemes = [s for s in args.schemes.split(",") if s]
    if not concurrencies or min(concurrencies) < 1:
        return "--concurrency must be >= 1"
    if not schemes or set(schemes) - set(SCHEMES):
        return f"--schemes must be some of {', '.join(SCHEMES)}"
    if "bf16" not in schemes and not args.no_accuracy:
        return "the accuracy columns need bf16 in --schemes (or give --no-accuracy)"
    if min(args.repeat, args.exec_runs, args.prompt_len, args.output_len) < 1:
        return "--repeat, --exec-runs, --prompt-len and --output-len must be >= 1"
    if args.threads is not None and args.threads < 1:
        return "--threads must be >= 1"
    return None


def _logger(args: argparse.Namespace):
    def log(line: str) -> None:
        # Progress goes to stderr under --json, so stdout stays one JSON object.
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    return log


# ---- snapshots -------------------------------------------------------------------------------


def snapshot_weight_bytes(path: Path) -> int:
    """The snapshot's weight files, in bytes, as its manifest lists them."""
    from snapshot.manifest import load_manifest, weight_files

    manifest = load_manifest(path)
    names = set(weight_files(manifest))
    return sum(int(f["size"]) for f in manifest["files"] if f["name"] in names)


def _scheme_snapshot(scheme: str, args: argparse.Namespace, log) -> SchemeSnapshot:
    if scheme == "bf16":
        return SchemeSnapshot(scheme, args.snapshot)
    path = Path(QUANT_SNAPSHOT.format(scheme=scheme))
    if (path / "manifest.json").exists() and not args.rebuild:
        return SchemeSnapshot(scheme, path)
    log(f"building the {scheme} snapshot {path} (thaw snapshot build --quantize {scheme})")
    error = build_quant_snapshot(scheme, path)
    return SchemeSnapshot(scheme, path, error)


def build_quant_snapshot(scheme: str, out: Path) -> str | None:
    """Run `thaw snapshot build --from default --quantize SCHEME`; None, or why it failed."""
    cmd = [sys.executable, "-m", "thaw.cli", "snapshot", "build", "--from", "default",
           "--out", str(out), "--quantize", scheme, "--force"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"snapshot build --quantize {scheme} failed: {lines[-1] if lines else proc.returncode}"


def _engines(snapshots: dict[str, SchemeSnapshot], max_seqs: int, log):
    """Every loadable snapshot's engine, and per scheme why it has none."""
    engines: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for scheme, snap in snapshots.items():
        if snap.error:
            errors[scheme] = snap.error
            continue
        try:
            engines[scheme] = thaw_engine(snap.path, max_seqs)
        except Exception as exc:  # a scheme the engine cannot serve yet is a row, not a crash
            errors[scheme] = f"{type(exc).__name__}: {exc}"
        if scheme in errors:
            log(f"{scheme}: {errors[scheme]}")
    return engines, errors


def thaw_engine(path: Path, max_seqs: int):
    """The snapshot's engine as `bench engine` configures it (whatever weights the loader gives)."""
    import torch

    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine

    config = EngineConfig(max_num_seqs=max_seqs, dtype=torch.bfloat16, kv_cache_bytes=1 << 30)
    return LLMEngine.from_snapshot(path, config)


# ---- timed runs ------------------------------------------------------------------------------


def _timed_runs(
    schemes: list[str],
    engines: dict[str, Any],
    ggufs: dict[str, Gguf],
    concurrencies: list[int],
    bin_dir: Path | None,
    threads: int,
    args: argparse.Namespace,
    log,
) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], BatchedBenchRow]]:
    """Best thaw seconds per (scheme, c) and best llama.cpp row per (gguf, c), alternating."""
    from bench.engine import _run_thaw_as_served, _workload

    works = {
        scheme: [_workload("fixed", c, engine.model_config.vocab_size, args) for c in concurrencies]
        for scheme, engine in engines.items()
    }
    thaw: dict[tuple[str, int], float] = {}
    llama: dict[tuple[str, int], BatchedBenchRow] = {}
    for repeat in range(args.repeat):
        step = f"[{repeat + 1}/{args.repeat}]"
        # Each scheme right next to its peers, so a slow spell weighs on both alike.
        for scheme in schemes:
            for work in works.get(scheme, []):
                seconds, _ = _run_thaw_as_served(engines[scheme], work, repeat)
                key = (scheme, work.concurrency)
                thaw[key] = min(seconds, thaw.get(key, math.inf))
                log(f"{step} thaw {scheme} c={work.concurrency}: "
                    f"{work.output_tokens / seconds:.1f} tok/s")  # fmt: skip
            for gguf in (ggufs[p] for p in PEERS[scheme] if p in ggufs):
                assert bin_dir is not None
                bench = _batched(args, threads, concurrencies)
                for row in run_batched_bench(bin_dir, gguf.path, bench):
                    key = (gguf.name, row.batch)
                    if key not in llama or row.output_tok_s > llama[key].output_tok_s:
                        llama[key] = row
                    log(f"{step} llama.cpp {gguf.name} c={row.batch}: "
                        f"{row.output_tok_s:.1f} tok/s")  # fmt: skip
    rates = {(scheme, c): args.output_len * c / seconds for (scheme, c), seconds in thaw.items()}
    return rates, llama


def peer_row(
    scheme: str,
    c: int,
    snap: SchemeSnapshot,
    error: str | None,
    thaw: dict[tuple[str, int], float],
    llama: dict[tuple[str, int], BatchedBenchRow],
    ggufs: dict[str, Gguf],
) -> Row:
    """thaw's figure for (scheme, c) beside its llama.cpp peers; the ratio is to the fastest."""
    peers = {p: llama[(p, c)] for p in PEERS[scheme] if (p, c) in llama}
    best = max(peers, key=lambda p: peers[p].output_tok_s) if peers else None
    thaw_tok_s = thaw.get((scheme, c))
    peer_tok_s = peers[best].output_tok_s if best else None
    return Row(
        scheme=scheme,
        concurrency=c,
        thaw_tok_s=_round(thaw_tok_s, 1),
        llamacpp_peer=best,
        llamacpp_tok_s=_round(peer_tok_s, 1),
        ratio=_round(thaw_tok_s / peer_tok_s, 3) if thaw_tok_s and peer_tok_s else None,
        llamacpp={p: round(r.output_tok_s, 1) for p, r in peers.items()},
        llamacpp_s_tg={p: round(r.s_tg, 1) for p, r in peers.items()},
        snapshot_bytes=None if error else snap.weight_bytes,
        gguf_bytes=ggufs[best].bytes if best else None,
        gguf_bytes_by_peer={p: ggufs[p].bytes for p in PEERS[scheme] if p in ggufs},
        error=error,
    )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def exec_to_first_token(path: Path, runs: int) -> float:
    """Median seconds from exec of a fresh Python to its first generated token (see above)."""
    # No warm-up run: this process has already loaded the same files, so the page cache is warm.
    cmd = [sys.executable, "-c", EXEC_SCRIPT, str(path)]
    return statistics.median(time_to_marker(cmd, FIRST_TOKEN_MARKER) for _ in range(runs))


# ---- accuracy --------------------------------------------------------------------------------


def _accuracy_tokens(args: argparse.Namespace) -> int:
    return 64 if args.quick else ACCURACY_TOKENS


def _accuracy(engines: dict[str, Any], args: argparse.Namespace, log) -> dict[str, Accuracy]:
    """KL and top-1 agreement of each scheme's next-token distributions against bf16's."""
    if "bf16" not in engines:
        return {}
    tokens = accuracy_tokens(args.snapshot, _accuracy_tokens(args))
    reference = next_token_logits(engines["bf16"], tokens)
    found: dict[str, Accuracy] = {}
    for scheme, engine in engines.items():
        test = reference if scheme == "bf16" else next_token_logits(engine, tokens)
        found[scheme] = logit_agreement(reference, test)
        log(f"accuracy {scheme}: KL {found[scheme].kl:.3g}, top-1 {found[scheme].top1:.1%}")
    return found


def accuracy_tokens(snapshot: Path, count: int) -> list[int]:
    """The fixed paragraph's first `count` tokens, with the snapshot's own tokenizer."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode(ACCURACY_TEXT).ids
    if len(ids) < count:
        raise ValueError(f"the accuracy text is {len(ids)} tokens, fewer than {count}")
    return ids[:count]


def next_token_logits(engine, tokens: list[int]):
    """[len(tokens), vocab] float32 logits of the token after each position.

    Taken from the engine's own LM head during one prefill with prompt logprobs on (rows for
    positions 0..n-2), then the sampling row (position n-1): the path every request runs, on
    whatever weights the snapshot gave it.
    """
    import torch

    from handler.engine.params import SamplingParams

    model = engine.runner.model
    original = model.compute_logits
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        logits = original(hidden)
        captured.append(logits.detach().float().clone())
        return logits

    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    model.compute_logits = capture
    try:
        engine.generate([tokens], params)
    finally:
        model.compute_logits = original
    rows = torch.cat(captured)
    if rows.shape[0] != len(tokens):
        raise RuntimeError(f"captured {rows.shape[0]} logit rows for {len(tokens)} tokens")
    return rows


def logit_agreement(reference, test) -> Accuracy:
    """Mean KL(reference || test) and top-1 agreement of two [positions, vocab] logit sets."""
    from snapshot.quant.accuracy import logit_agreement as agreement

    found = agreement(reference, test)
    return Accuracy(kl=found["kl"], top1=found["top1"])


def _batched(
    args: argparse.Namespace, threads: int, concurrencies: list[int] | None = None
) -> BatchedBench:
    npl = concurrencies or [int(c) for c in args.concurrency.split(",") if c]
    return BatchedBench(args.prompt_len, args.output_len, npl, threads)


# ---- output ----------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'scheme':<7}{'c':>4}{'thaw tok/s':>12}{'llama.cpp peer':>26}{'ratio':>8}"
        f"{'snapshot MB':>13}{'GGUF MB':>9}{'exec->1st s':>13}{'KL':>10}{'top-1':>8}"
    )
    print(header)
    for r in rows:
        if r.error and r.thaw_tok_s is None:
            print(f"{r.scheme:<7}{r.concurrency:>4}  unavailable: {r.error}")
            continue
        peers = ", ".join(f"{p} {v:.1f}" for p, v in r.llamacpp.items()) or "-"
        print(
            f"{r.scheme:<7}{r.concurrency:>4}{_fmt(r.thaw_tok_s, '.1f'):>12}{peers:>26}"
            f"{_fmt(r.ratio, '.2f', 'x'):>8}{_fmt(_mb(r.snapshot_bytes), '.1f'):>13}"
            f"{_fmt(_mb(r.gguf_bytes), '.1f'):>9}{_fmt(r.exec_to_first_token_s, '.3f'):>13}"
            f"{_fmt(r.kl_vs_bf16, '.2e'):>10}{_fmt(r.top1_vs_bf16, '.1%'):>8}"
        )


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
