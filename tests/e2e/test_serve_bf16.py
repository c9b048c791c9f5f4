"""`make serve`'s own configuration end to end: the default snapshot in its bfloat16, which on the
CPU runs the packed weights and the fused kernels (handler/kernels) inside the real worker.

bfloat16 has no exact reference, so the checks are what a user sees: right answers, streamed or
not, logprobs that are log-probabilities, and a burst of concurrent requests all served.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Iterator

import openai
import pytest

from handler.kernels.build import compiler
from tests.support.serve_fixtures import Server, ensure_default_snapshot

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # An empty THAW_DTYPE: serve in the snapshot's dtype, as `make serve` does.
    srv = Server(ensure_default_snapshot(), env={"THAW_DTYPE": ""}).start().wait_ready()
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_the_kernels_serve_this_worker(server: Server) -> None:
    # The worker's ready line names its attention backend; "cpu" is the fused-kernel one.
    expected = "cpu attention" if compiler() is not None else "torch attention"
    assert expected in server.logs(), server.logs()
    assert "kernels unavailable" not in server.logs()


def test_answers_streamed_or_not(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=24, temperature=0
    )
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    streamed = client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=24, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    # Not compared token for token: the repeat hits the prefix cache, a different bfloat16
    # computation of the same prompt (float32 equality is checked in test_clients_e2e.py).
    assert "Paris" in "".join(pieces)


def test_logprobs_are_log_probabilities(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="default",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0.0
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(alternatives[0], abs=1e-3)
        assert sum(math.exp(lp) for lp in alternatives) <= 1.0 + 1e-3


def test_a_burst_of_requests_is_all_served(client: openai.OpenAI) -> None:
    def ask(i: int) -> tuple[str, int]:
        reply = client.completions.create(
            model="default", prompt=f"Count to {i + 3}:", max_tokens=12, temperature=0.7, seed=i
        )
        return reply.choices[0].text, reply.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(ask, range(12)))
    assert all(tokens >= 1 and text for text, tokens in results)
