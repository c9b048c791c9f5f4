"""`thaw bench engine` on a quantized snapshot: thaw serves the quantized weights, the
transformers model behind the peers and ceilings gets them de-quantized."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench.engine import add_arguments, run
from tests.support.snapshot_fixtures import build, save_tiny_model


def test_engine_bench_runs_a_quantized_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_tiny_model(tmp_path / "source", "llama", tie=True)
    snapshot = tmp_path / "int4"
    build(source, snapshot, quantize="int4")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--snapshot", str(snapshot), "--concurrency", "1,2", "--workloads", "fixed"]
        + ["--prompt-len", "4", "--output-len", "4", "--repeat", "1", "--json", "--threads", "1"]
        + ["--no-hf"]
    )
    threads = torch.get_num_threads()
    try:
        assert run(args) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["concurrency"] for r in results] == [1, 2]
    # The ceilings replay the linear layers of the transformers model, de-quantized.
    assert all(r["thaw_tok_s"] > 0 and r["ceiling_tok_s"] > 0 for r in results)
