"""`thaw bench coldstart`'s floor without interpreter teardown, and its --docker flag."""

from __future__ import annotations

import argparse
import sys
import time

import pytest

from bench.coldstart import FLOOR_MARKER, add_arguments, time_to_marker


def test_the_no_teardown_floor_stops_at_the_marker_not_at_exit() -> None:
    # The child would take 3 s to exit; the clock stops when it prints the marker.
    script = (
        f"import sys, time; print({FLOOR_MARKER!r}, flush=True); sys.stdout.close(); time.sleep(3)"
    )
    t0 = time.perf_counter()
    seconds = time_to_marker([sys.executable, "-c", script])
    assert seconds < 2.5
    assert time.perf_counter() - t0 >= 3, "the child is waited for, after the clock stopped"


def test_a_child_that_never_prints_the_marker_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before printing 'torch imported'"):
        time_to_marker([sys.executable, "-c", "raise SystemExit(3)"])


def test_docker_takes_an_image() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).docker is None
    assert parser.parse_args(["--docker", "thaw"]).docker == "thaw"
