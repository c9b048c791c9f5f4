"""Running a module's Triton kernels under Triton's interpreter when there is no GPU.

The interpreter must be chosen before triton itself is first imported (triton.language's own
helpers are decorated then), so a test module that finds triton already imported without it
cannot run its kernels in this process: it runs itself again in a fresh interpreter process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import torch


def import_kernels(module: str) -> ModuleType | None:
    """`module`, compiled on CUDA or under the interpreter off it; None when triton was already
    imported without the interpreter in this session."""
    if torch.cuda.is_available():
        return importlib.import_module(module)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    # It stays set: triton reads it again while launching. Without a GPU nothing else can run
    # triton kernels in this session anyway.
    os.environ["TRITON_INTERPRET"] = "1"
    return importlib.import_module(module)


def fresh_process_test(test_file: str, *pytest_args: str) -> Callable[[], None]:
    """A test that runs `test_file` in a fresh process under the interpreter, and passes only if
    every test there ran (none skipped) and passed."""

    def test_kernels_in_a_fresh_interpreter_process() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        done = subprocess.run(
            [*cmd, test_file], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]

    return test_kernels_in_a_fresh_interpreter_process
