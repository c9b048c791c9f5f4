"""The environment reader every Python process uses, and the worker's settings built with it."""

from __future__ import annotations

import pytest

from handler.engine.config import EngineConfig
from handler.engine.faults import FaultInjection
from handler.env import EnvReader, SettingsError
from handler.worker_settings import WorkerSettings

BASE = {"THAW_SOCKET": "/tmp/thaw.sock", "THAW_SNAPSHOT": "/tmp/snap"}


def test_empty_means_unset_and_values_are_typed():
    read = EnvReader({"A": "", "N": "12", "F": "0.5", "B": "off"})
    assert read.integer("A", 7) == 7
    assert read.integer("N", 7, minimum=1) == 12
    assert read.number("F", 1.0) == 0.5
    assert read.flag("B", True) is False
    assert read.optional_text("A") is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"N": "twelve"}, "N must be an integer, got 'twelve'"),
        ({"N": "0"}, "N must be a positive integer, got '0'"),
        ({"F": "nan"}, "F must be a number, got 'nan'"),
        ({"B": "maybe"}, "B must be true or false, got 'maybe'"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    read = EnvReader(env)
    with pytest.raises(SettingsError, match=message):
        if "N" in env:
            read.integer("N", 1, minimum=None if env["N"] == "twelve" else 1)
        elif "F" in env:
            read.number("F", 1.0)
        else:
            read.flag("B", True)


def test_worker_defaults_are_the_engines():
    settings = WorkerSettings.from_env(BASE)
    expected = EngineConfig(device="auto", snapshot_dir="/tmp/snap")
    assert settings.engine == expected
    assert settings.socket_path == "/tmp/thaw.sock" and settings.snapshot == "/tmp/snap"


def test_worker_settings_reach_the_engine_config():
    env = {
        **BASE,
        "THAW_DEVICE": "cpu",
        "THAW_DTYPE": "float32",
        "THAW_KV_CACHE_BYTES": "1048576",
        "THAW_MAX_NUM_SEQS": "4",
        "THAW_MAX_BATCHED_TOKENS": "128",
        "THAW_BLOCK_SIZE": "32",
        "THAW_ATTENTION_BACKEND": "torch",
        "THAW_GPU_MEMORY_FRACTION": "0.5",
        "THAW_CUDA_GRAPH_MAX_BATCH": "0",
        "THAW_CPU_KERNELS": "false",
    }
    engine = WorkerSettings.from_env(env).engine
    assert (engine.device, engine.dtype, engine.kv_cache_bytes) == ("cpu", "float32", 1 << 20)
    assert (engine.max_num_seqs, engine.max_num_batched_tokens, engine.block_size) == (4, 128, 32)
    assert engine.attention_backend == "torch" and engine.gpu_memory_fraction == 0.5
    assert engine.cuda_graph_max_batch == 0 and engine.cpu_kernels is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "THAW_SOCKET and THAW_SNAPSHOT"),
        ({**BASE, "THAW_MAX_NUM_SEQS": "0"}, "THAW_MAX_NUM_SEQS must be a positive integer"),
        ({**BASE, "THAW_GPU_MEMORY_FRACTION": "1.5"}, "gpu_memory_fraction must be in"),
        ({**BASE, "THAW_DTYPE": "float8"}, "dtype must be one of"),
        ({**BASE, "THAW_CUDA_GRAPH_MAX_BATCH": "-1"}, "THAW_CUDA_GRAPH_MAX_BATCH must be a non"),
    ],
)
def test_bad_worker_settings_are_refused(env, message):
    with pytest.raises(SettingsError, match=message):
        WorkerSettings.from_env(env)


def test_a_torch_dtype_is_taken_by_name():
    import torch

    assert EngineConfig(dtype=torch.bfloat16).dtype == "bfloat16"


def test_option_lists():
    read = EnvReader({"O": " a, b=1 ,c=", "E": "", "D": "a,a=2", "N": "=3"})
    assert read.options("O") == {"a": None, "b": "1", "c": ""}
    assert read.options("E") == {} and read.options("UNSET") == {}
    with pytest.raises(SettingsError, match="D: a is given twice"):
        read.options("D")
    with pytest.raises(SettingsError, match="N: '=3' has no name"):
        read.options("N")


def test_fault_injection_is_off_unless_set():
    assert WorkerSettings.from_env(BASE).engine.fault_injection is None
    env = {**BASE, "THAW_FAULT_INJECT": "nan_logits_token=42, crash_token=7,crash_at_start"}
    faults = WorkerSettings.from_env(env).engine.fault_injection
    assert faults == FaultInjection(nan_logits_token=42, crash_token=7, crash_at_start=True)
    assert faults.in_engine
    assert faults.describe() == "nan_logits_token=42,crash_token=7,crash_at_start"
    only_start = WorkerSettings.from_env({**BASE, "THAW_FAULT_INJECT": "crash_at_start"})
    assert not only_start.engine.fault_injection.in_engine


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan_logits_token", "nan_logits_token needs a token id"),
        ("crash_token=-1", "crash_token needs a token id"),
        ("crash_at_start=1", "crash_at_start takes no value"),
        ("explode", "unknown fault 'explode'"),
    ],
)
def test_bad_fault_injection_names_the_variable(value, message):
    with pytest.raises(SettingsError, match=f"THAW_FAULT_INJECT: {message}"):
        WorkerSettings.from_env({**BASE, "THAW_FAULT_INJECT": value})
