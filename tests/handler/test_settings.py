"""The environment reader every Python process uses, and the worker's settings built with it."""

from __future__ import annotations

import pytest

from handler.engine.config import EngineConfig
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
