"""Fixtures and helpers of the snapshot tests: tiny random models, built snapshots, an S3 server.

Registered for every test module by `pytest_plugins` in tests/conftest.py.
PYTEST_DONT_REWRITE: it is imported before pytest registers it as a plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["<unk>", "<s>", "<|end|>", "<|eot|>"]

# Small enough to build in well under a second, big enough to have GQA and every tensor kind.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json with two EOS candidates and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


def save_tiny_model(
    directory: Path,
    model_type: str = "llama",
    *,
    tie: bool = False,
    shard_size: str | None = None,
    pickle_bin: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A random model saved as Hugging Face would: safetensors (optionally sharded) or .bin."""
    import torch
    import transformers

    settings = {**TINY, "tie_word_embeddings": tie, **overrides}
    config = getattr(transformers, CONFIG_CLASSES[model_type])(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = [2, 3]
    directory.mkdir(parents=True, exist_ok=True)
    if pickle_bin:
        # transformers 5 no longer writes .bin; older checkpoints on disk still are.
        model.save_pretrained(directory)
        for weights in directory.glob("*.safetensors*"):
            weights.unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, max_shard_size=shard_size or "50GB")
    save_tiny_tokenizer(directory)
    return directory


def build(source: str | Path, out: Path, **options: Any) -> dict[str, Any]:
    from snapshot.build import BuildRequest, build_snapshot

    return build_snapshot(BuildRequest(str(source), out, **options))


GEMMA3_SNAPSHOT = REPO / ".thaw" / "snapshots" / "gemma3-270m-f32"
GGUF_CACHE = REPO / ".thaw" / "gguf"


def ensure_gemma3_snapshot() -> Path:
    """Gemma 3 270M from its PyPI packages as a float32 snapshot, built once per checkout."""
    if not (GEMMA3_SNAPSHOT / "manifest.json").is_file():
        env = dict(os.environ, THAW_GGUF_CACHE=str(GGUF_CACHE))
        cmd = [sys.executable, "-m", "thaw.cli", "snapshot", "build", "--from", "gemma3-270m"]
        cmd += ["--out", str(GEMMA3_SNAPSHOT), "--dtype", "float32"]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=900)
    return GEMMA3_SNAPSHOT


def ensure_snapshot(name: str, source: str, *options: str) -> Path:
    """.thaw/snapshots/NAME built once per checkout with `thaw snapshot build` and `options`
    (quantized variants of the packaged models, say)."""
    directory = REPO / ".thaw" / "snapshots" / name
    if not (directory / "manifest.json").is_file():
        env = dict(os.environ, THAW_GGUF_CACHE=str(GGUF_CACHE))
        cmd = [sys.executable, "-m", "thaw.cli", "snapshot", "build", "--from", source]
        cmd += ["--out", str(directory), *options]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=900)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rewrite_manifest_checksums(directory: Path) -> None:
    """After a deliberate edit, make the manifest agree with the files again."""
    from snapshot import manifest as mf

    manifest = json.loads((directory / mf.MANIFEST).read_text())
    for entry in manifest["files"]:
        path = directory / entry["name"]
        entry["size"] = path.stat().st_size
        entry["sha256"] = mf.sha256_file(path)
    (directory / mf.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def tiny_llama_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama snapshot, built once; tests that damage it work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    source = save_tiny_model(root / "source", "llama", tie=True)
    build(source, root / "snapshot")
    return root / "snapshot"


@pytest.fixture
def tiny_llama_copy(tiny_llama_snapshot: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "snapshot"
    shutil.copytree(tiny_llama_snapshot, copy)
    return copy


@pytest.fixture(scope="session")
def default_model_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's snapshot: the repo's own when it verifies, else built once here."""
    from snapshot.verify import verify_snapshot

    existing = REPO / ".thaw" / "snapshots" / "default"
    if (existing / "manifest.json").is_file() and not verify_snapshot(existing):
        return existing
    out = tmp_path_factory.mktemp("default") / "snapshot"
    build("default", out)
    return out


@pytest.fixture(scope="session")
def moto_s3_server() -> Iterator[str]:
    """moto's S3 server as a real subprocess on a free port; yields its endpoint URL."""
    port = free_port()
    command = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def moto_s3_env(moto_s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Standard AWS variables pointing boto3 at the local server, as a user would set them."""
    env = {
        "AWS_ENDPOINT_URL": moto_s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    return {**os.environ, **env}
