"""`thaw bench quant`: llama-batched-bench's table parsed, the agreement measure, and a dry run
of the thaw side on the bf16 snapshot. The llama.cpp build is never part of these tests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench.llamacpp import BatchedBenchRow, Gguf, parse_batched_bench
from bench.quant import (
    DEFAULT_SNAPSHOT,
    PEERS,
    QUANT_SNAPSHOT,
    SchemeSnapshot,
    add_arguments,
    logit_agreement,
    peer_row,
    run,
)

# Captured from this project's build (llama-cpp-python 0.3.36's llama.cpp, 2 threads, a busy
# shared machine): `llama-batched-bench -m Q8_0.gguf -c 8192 -b 2048 -ub 512 -npp 32 -ntg 64
# -npl 1,32 -t 2`, its whole stdout as the benchmark reads it.
CAPTURED = """
llama_batched_bench: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, \
is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     64 |    1 |     96 |    0.578 |    55.39 |    3.226 |    19.84 |    3.804 |    25.24 |
|    32 |     64 |   32 |   3072 |    5.672 |   180.53 |   72.094 |    28.41 |   77.766 |    39.50 |

"""

EXPECTED_KEYS = {
    "scheme",
    "concurrency",
    "thaw_tok_s",
    "llamacpp_peer",
    "llamacpp_tok_s",
    "ratio",
    "snapshot_bytes",
    "gguf_bytes",
    "exec_to_first_token_s",
    "kl_vs_bf16",
    "top1_vs_bf16",
}


def test_the_table_rows_are_parsed_and_the_rest_ignored() -> None:
    rows = parse_batched_bench(CAPTURED)
    assert [r.batch for r in rows] == [1, 32]
    first = rows[0]
    assert first == BatchedBenchRow(32, 64, 1, 96, 0.578, 55.39, 3.226, 19.84, 3.804, 25.24)


def test_the_figure_is_output_tokens_over_the_whole_call() -> None:
    # Not S_TG (no prefill) and not S (prompt tokens counted): B * TG / T, as thaw is timed.
    row = parse_batched_bench(CAPTURED)[1]
    assert row.output_tok_s == pytest.approx(32 * 64 / 77.766)
    assert row.output_tok_s < row.s_tg


def test_int4_has_both_q4_peers() -> None:
    assert PEERS["int4"] == ("Q4_1", "Q4_0")
    assert PEERS["int8"] == ("Q8_0",) and PEERS["bf16"] == ("BF16",)


def test_int4_ratio_is_against_the_faster_peer_and_both_are_reported(tmp_path: Path) -> None:
    ggufs = {}
    for name, size in (("Q4_1", 98), ("Q4_0", 91)):
        (tmp_path / f"{name}.gguf").write_bytes(b"x" * size)
        ggufs[name] = Gguf(name, tmp_path / f"{name}.gguf")
    slow, fast = parse_batched_bench(CAPTURED)[1], parse_batched_bench(CAPTURED)[1]
    fast.t = slow.t / 2
    llama = {("Q4_1", 32): slow, ("Q4_0", 32): fast}
    snap = SchemeSnapshot("int4", tmp_path, error="not built")  # no weight files to read
    row = peer_row("int4", 32, snap, "not built", {("int4", 32): 100.0}, llama, ggufs)
    assert row.llamacpp_peer == "Q4_0" and row.gguf_bytes == 91
    assert set(row.llamacpp) == {"Q4_1", "Q4_0"}
    assert row.ratio == pytest.approx(100.0 / fast.output_tok_s, rel=1e-3)
    assert row.gguf_bytes_by_peer == {"Q4_1": 98, "Q4_0": 91}
    assert row.snapshot_bytes is None and row.error == "not built"


def test_agreement_is_zero_kl_and_full_top1_for_identical_distributions() -> None:
    logits = torch.randn(8, 50)
    same = logit_agreement(logits, logits)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    other = logit_agreement(logits, torch.randn(8, 50))
    assert other.kl > 0 and other.top1 < 1.0


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_args("--concurrency", "a")) == 2
    assert run(_args("--schemes", "int3")) == 2
    assert run(_args("--schemes", "int8")) == 2, "accuracy needs the bf16 reference"
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(
    not (DEFAULT_SNAPSHOT / "manifest.json").exists(), reason="no default snapshot built"
)
def test_dry_run_prints_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    # bf16, and the quantized snapshots that are already built (building one takes a minute).
    built = [
        s
        for s in ("int8", "int4")
        if (Path(QUANT_SNAPSHOT.format(scheme=s)) / "manifest.json").exists()
    ]
    schemes = ["bf16", *built]
    argv = ["--json", "--quick", "--no-llamacpp", "--schemes", ",".join(schemes)]
    # One thread: two spinning ones crawl when the shared machine is busy. Put it back after.
    threads = torch.get_num_threads()
    try:
        assert run(_args(*argv, "--concurrency", "1,2", "--threads", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    rows = result["results"]
    assert [(r["scheme"], r["concurrency"]) for r in rows] == [
        (s, c) for s in schemes for c in (1, 2)
    ]
    for row in rows:
        assert EXPECTED_KEYS <= set(row)
        assert row["error"] is None, row["error"]
        assert row["thaw_tok_s"] > 0 and row["snapshot_bytes"] > 0
        assert row["exec_to_first_token_s"] > 0
        assert row["llamacpp_tok_s"] is None and row["ratio"] is None
        assert 0.0 <= row["kl_vs_bf16"] and 0.0 <= row["top1_vs_bf16"] <= 1.0
    bf16 = rows[0]
    assert bf16["kl_vs_bf16"] == 0.0 and bf16["top1_vs_bf16"] == 1.0
    # Smaller weights than bf16's, whatever the scheme keeps dense.
    assert all(r["snapshot_bytes"] < bf16["snapshot_bytes"] for r in rows[2:])
    assert result["config"]["llamacpp"] is None
