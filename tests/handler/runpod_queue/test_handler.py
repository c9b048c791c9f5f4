"""The RunPod queue handler against a fake gateway, driven by the runpod SDK's own local modes.

The fake gateway speaks the parts of the gateway's HTTP contract the handler uses (/ping, /ready,
the OpenAI routes with SSE). It "generates" the prompt's words upper-cased, one per event, so the
text that comes back proves the prompt and the sampling parameters went through.

Run as a script, this file serves the fake gateway (the handler's gateway-spawning test uses it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeGateway:
    """A stand-in for thaw-gateway: readiness states, OpenAI routes, a record of what came in."""

    def __init__(self, ready: bool = True, token_delay_s: float = 0.0) -> None:
        self.ready = ready
        self.failed_reason: str | None = None
        self.token_delay_s = token_delay_s
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.pings = 0
        self.streaming = 0
        self.max_streaming = 0  # most token streams open at once
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        return app

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def _ping(self, _request: web.Request) -> web.Response:
        self.pings += 1
        if self.failed_reason:
            return web.Response(status=503)
        return web.Response(status=200 if self.ready else 204)

    async def _ready(self, _request: web.Request) -> web.Response:
        phase = "failed" if self.failed_reason else "ready" if self.ready else "loading"
        return web.json_response({"phase": phase, "reason": self.failed_reason})

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"route": request.path, "body": body})
        if not self.ready:
            return _error(503, "not ready", "unavailable")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            return _error(422, "temperature must be a number >= 0", "validation")
        chat = request.path.endswith("chat/completions")
        source = body["messages"][-1]["content"] if chat else body["prompt"]
        words = str(source).split()
        limit = body.get("max_tokens", 16)
        pieces = [" " + word.upper() for word in words[:limit]]
        finish = "length" if len(words) > limit else "stop"
        usage = {
            "prompt_tokens": len(words),
            "completion_tokens": len(pieces),
            "total_tokens": len(words) + len(pieces),
        }
        if not body.get("stream"):
            return web.json_response(_completion(chat, "".join(pieces), finish) | {"usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.streaming += 1
        self.max_streaming = max(self.max_streaming, self.streaming)
        try:
            for index, piece in enumerate(pieces):
                await asyncio.sleep(self.token_delay_s)
                last = index == len(pieces) - 1
                await _send(response, _chunk(chat, piece, finish if last else None))
            if (body.get("stream_options") or {}).get("include_usage"):
                await _send(response, {"choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        finally:
            self.streaming -= 1
        return response

    # Same event loop (async tests) ...
    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ... or its own thread, for a handler running in a subprocess.
    def start_in_thread(self) -> int:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start())
            started.set()
            self._loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        started.wait(10)
        return self.port

    def stop_thread(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)


def _completion(chat: bool, text: str, finish: str) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"object": "chat.completion" if chat else "text_completion", "choices": [choice]}


def _chunk(chat: bool, piece: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": piece}
    else:
        choice["text"] = piece
    return {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": message, "error_type": error_type}, status=status)


@pytest.fixture
def fake_gateway() -> Iterator[FakeGateway]:
    fake = FakeGateway()
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


def handler_env(gateway_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "THAW_"))}
    env.update(THAW_GATEWAY_URL=f"http://127.0.0.1:{gateway_port}", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run_test_input(job: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "handler.runpod_queue", "--test_input", json.dumps(job)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- the SDK's --test_input mode


def test_test_input_prompt_succeeds(fake_gateway: FakeGateway) -> None:
    job = {"input": {"prompt": "hello brave new world", "sampling_params": {"max_tokens": 3}}}
    done = run_test_input(job, handler_env(fake_gateway.port))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "' HELLO BRAVE NEW'" in done.stdout
    assert "'finish_reason': 'length'" in done.stdout
    sent = fake_gateway.requests[-1]
    assert sent["route"] == "/v1/completions"
    assert sent["body"]["max_tokens"] == 3 and sent["body"]["stream"] is True


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"sampling_params": {}}, "input needs exactly one of prompt, messages or openai_route"),
        ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "temperature must be"),
        ({"openai_route": "/v1/embeddings", "openai_input": {}}, "openai_route must be one of"),
    ],
)
def test_test_input_bad_input_fails(
    fake_gateway: FakeGateway, job_input: dict[str, Any], message: str
) -> None:
    done = run_test_input({"input": job_input}, handler_env(fake_gateway.port))
    assert done.returncode == 1
    assert message in done.stdout + done.stderr


def test_handler_starts_the_gateway_it_needs() -> None:
    """No gateway listening: the handler spawns one (here the fake) and stops it at exit."""
    port = free_port()
    spawn = f"{sys.executable} {Path(__file__)} {port} --ready-after 1.0"
    job = {"input": {"messages": [{"role": "user", "content": "spawned gateway works"}]}}
    done = run_test_input(job, handler_env(port, THAW_GATEWAY_CMD=spawn))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "' SPAWNED GATEWAY WORKS'" in done.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_bad_environment_is_refused() -> None:
    done = run_test_input({"input": {"prompt": "x"}}, handler_env(1, THAW_RUNPOD_CONCURRENCY="0"))
    assert done.returncode == 2
    assert "THAW_RUNPOD_CONCURRENCY must be a positive integer" in done.stderr


# ------------------------------------------------------- the SDK's --rp_serve_api local server


@pytest.fixture
def sdk_api(fake_gateway: FakeGateway) -> Iterator[str]:
    fake_gateway.ready = False  # every test here starts while the model is "loading"
    port = free_port()
    cmd = [sys.executable, "-m", "handler.runpod_queue", "--rp_serve_api"]
    cmd += ["--rp_api_port", str(port)]
    proc = subprocess.Popen(
        cmd, env=handler_env(fake_gateway.port), cwd=ROOT, stdout=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"{base}/openapi.json", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(10)


def test_job_submitted_before_ready_waits_and_succeeds(
    sdk_api: str, fake_gateway: FakeGateway
) -> None:
    result: dict[str, Any] = {}
    job = {"input": {"prompt": "early bird", "sampling_params": {"temperature": 0}}}

    def submit() -> None:
        result.update(requests.post(f"{sdk_api}/runsync", json=job, timeout=30).json())

    worker = threading.Thread(target=submit)
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive(), "the job finished before the gateway was ready"
    assert fake_gateway.requests == []
    fake_gateway.ready = True
    worker.join(30)
    assert result["status"] == "COMPLETED"
    assert result["output"] == [
        {
            "text": " EARLY BIRD",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        }
    ]


def test_run_then_status_and_stream(sdk_api: str, fake_gateway: FakeGateway) -> None:
    fake_gateway.ready = True
    job = {"input": {"prompt": "one two three", "stream": True}}
    job_id = requests.post(f"{sdk_api}/run", json=job, timeout=10).json()["id"]
    status = requests.post(f"{sdk_api}/status/{job_id}", timeout=30).json()
    assert status["status"] == "COMPLETED"
    assert [chunk["text"] for chunk in status["output"]] == [" ONE", " TWO", " THREE"]
    assert status["output"][-1]["finish_reason"] == "stop"
    assert status["output"][-1]["usage"]["completion_tokens"] == 3

    job_id = requests.post(f"{sdk_api}/run", json=job, timeout=10).json()["id"]
    stream = requests.post(f"{sdk_api}/stream/{job_id}", timeout=30).json()
    assert stream["status"] == "COMPLETED"
    assert [item["output"]["text"] for item in stream["stream"]] == [" ONE", " TWO", " THREE"]


def test_openai_passthrough_streams_each_chunk(sdk_api: str, fake_gateway: FakeGateway) -> None:
    fake_gateway.ready = True
    openai_input = {"messages": [{"role": "user", "content": "a b"}], "stream": True}
    job = {"input": {"openai_route": "/v1/chat/completions", "openai_input": openai_input}}
    result = requests.post(f"{sdk_api}/runsync", json=job, timeout=30).json()
    assert result["status"] == "COMPLETED"
    assert [c["choices"][0]["delta"]["content"] for c in result["output"]] == [" A", " B"]
    assert all(c["object"] == "chat.completion.chunk" for c in result["output"])
    assert fake_gateway.requests[-1]["body"] == openai_input

    job["input"]["openai_input"] = {"prompt": "c d", "max_tokens": 1}
    job["input"]["openai_route"] = "/v1/completions"
    result = requests.post(f"{sdk_api}/runsync", json=job, timeout=30).json()
    assert result["output"] == [
        {
            "object": "text_completion",
            "choices": [{"index": 0, "finish_reason": "length", "text": " C"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
    ]


def test_gateway_error_becomes_job_error(sdk_api: str, fake_gateway: FakeGateway) -> None:
    fake_gateway.ready = True
    job = {"input": {"prompt": "x", "sampling_params": {"temperature": "hot"}}}
    result = requests.post(f"{sdk_api}/runsync", json=job, timeout=30).json()
    # The local server reports a generator's error chunk as output; RunPod marks the job FAILED.
    assert result["output"] == [
        {"error": "gateway answered 422 to POST /v1/completions: temperature must be a number >= 0"}
    ]


# ------------------------------------------- the SDK's real queue worker, against a fake RunPod


def _wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_worker_runs_jobs_concurrently_streams_and_cancels() -> None:
    """Production mode: the SDK takes jobs from (fake) RunPod, as a deployed worker does."""
    from tests.support.fake_runpod_api import FakeRunPodJobs

    gateway = FakeGateway(ready=False, token_delay_s=0.05)
    gateway.start_in_thread()
    runpod = FakeRunPodJobs().start()
    for index in range(3):
        runpod.add_job(f"job{index}", {"prompt": f"w{index} x y z", "stream": True})
    env = handler_env(gateway.port, THAW_RUNPOD_CONCURRENCY="16", **runpod.worker_env())
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.runpod_queue"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: runpod.takes)  # taken while the model is still "loading"
        time.sleep(0.5)
        assert runpod.done == {} and gateway.requests == []
        gateway.ready = True
        _wait_for(lambda: len(runpod.done) == 3)
        # concurrency_modifier: one batched take for up to 16 jobs, all three run at once.
        assert "batch_size=16" in runpod.takes[0]
        assert gateway.max_streaming == 3
        for index in range(3):
            expected = [f" W{index}", " X", " Y", " Z"]
            assert [c["text"] for c in runpod.streamed[f"job{index}"]] == expected
            # return_aggregate_stream: the final result carries every chunk.
            assert runpod.done[f"job{index}"]["output"] == runpod.streamed[f"job{index}"]

        # Bad input fails that job only.
        bad = {"prompt": "x", "sampling_params": {"stream": False}}
        runpod.add_job("bad", bad)
        _wait_for(lambda: "bad" in runpod.done)
        assert runpod.done["bad"]["error"] == "sampling_params.stream is not a sampling parameter"

        # A stopped job closes its gateway stream; the worker goes on with the next job.
        runpod.add_job("long", {"prompt": " ".join(["word"] * 200), "stream": True})
        _wait_for(lambda: runpod.streamed.get("long"))
        runpod.stop_job("long")
        _wait_for(lambda: gateway.disconnects == 1)
        runpod.add_job("after", {"messages": [{"role": "user", "content": "still here"}]})
        _wait_for(lambda: "after" in runpod.done)
        assert runpod.done["after"]["output"][0]["text"] == " STILL HERE"
        assert "long" not in runpod.done
        assert len(runpod.streamed["long"]) < 200
    finally:
        proc.terminate()
        proc.wait(20)
        runpod.stop()
        gateway.stop_thread()


# --------------------------------------------------------------- the handler, in this process


def _handler(port: int, **env: str) -> tuple[Callable[..., AsyncIterator[Any]], Any]:
    from handler.runpod_queue.config import HandlerConfig
    from handler.runpod_queue.gateway_client import GatewayClient
    from handler.runpod_queue.handler import QueueHandler

    config = HandlerConfig.from_env({"THAW_GATEWAY_URL": f"http://127.0.0.1:{port}", **env})
    client = GatewayClient(config)
    return QueueHandler(client).handle, client


def test_cancelled_job_closes_its_gateway_stream() -> None:
    async def scenario() -> None:
        fake = FakeGateway(token_delay_s=0.2)
        port = await fake.start()
        handle, client = _handler(port)
        received: list[Any] = []

        async def consume() -> None:
            async for chunk in handle(
                {"id": "j1", "input": {"prompt": "a b c d e f", "stream": True}}
            ):
                received.append(chunk)

        task = asyncio.create_task(consume())
        while not received:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(40):  # the fake notices the disconnect at its next write
            if fake.disconnects:
                break
            await asyncio.sleep(0.05)
        assert fake.disconnects == 1
        assert len(received) < 6
        await client.close()
        await fake.stop()

    asyncio.run(scenario())


def test_failed_start_and_ready_timeout_fail_the_job_with_a_reason() -> None:
    async def scenario() -> None:
        fake = FakeGateway(ready=False)
        port = await fake.start()
        handle, client = _handler(port, THAW_RUNPOD_READY_TIMEOUT="0.3")
        job = {"id": "j", "input": {"prompt": "x"}}
        chunks = [chunk async for chunk in handle(job)]
        assert chunks == [{"error": "gateway not ready after 0.3 s (THAW_RUNPOD_READY_TIMEOUT)"}]
        fake.failed_reason = "CUDA out of memory while allocating the KV cache"
        chunks = [chunk async for chunk in handle(job)]
        assert chunks == [
            {
                "error": "gateway is not serving (GET /ping 503): "
                "CUDA out of memory while allocating the KV cache"
            }
        ]
        await client.close()
        await fake.stop()

    asyncio.run(scenario())


def test_concurrent_jobs_share_one_readiness_poll() -> None:
    async def scenario() -> None:
        fake = FakeGateway(ready=False)
        port = await fake.start()
        handle, client = _handler(port)
        jobs = [
            asyncio.create_task(_collect(handle({"id": str(i), "input": {"prompt": f"w{i}"}})))
            for i in range(20)
        ]
        await asyncio.sleep(0.5)
        fake.ready = True
        outputs = await asyncio.gather(*jobs)
        assert [out[0]["text"] for out in outputs] == [f" W{i}" for i in range(20)]
        # One poll every 50 ms for all twenty jobs, not twenty polls.
        assert fake.pings < 20
        await client.close()
        await fake.stop()

    asyncio.run(scenario())


async def _collect(chunks: Any) -> list[Any]:
    return [chunk async for chunk in chunks]


def test_sse_parser_handles_comments_crlf_and_multiline_data() -> None:
    from unittest.mock import Mock

    from handler.runpod_queue.gateway_client import _sse_data

    async def scenario() -> list[str]:
        reader = aiohttp.StreamReader(Mock(_reading_paused=False), 2**16)
        reader.feed_data(b': keep-alive\r\n\r\nevent: token\r\ndata: {"a":\r\n')
        reader.feed_data(b"data: 1}\r\n\r\ndata:[DONE]\n\ndata: tail")
        reader.feed_eof()
        return [data async for data in _sse_data(reader)]

    assert asyncio.run(scenario()) == ['{"a":\n1}', "[DONE]", "tail"]


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ("just text", "input must be a JSON object, got str"),
        ({"prompt": "a", "messages": []}, "input has both prompt and messages"),
        ({"prompt": ""}, "prompt must be a non-empty string or a list"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"prompt": "a", "sampling_params": [1]}, "sampling_params must be a JSON object"),
        ({"prompt": "a", "stream": "yes"}, "stream must be true or false"),
        ({"prompt": "a", "sampling_params": {"n": 3}}, r"sampling_params.n > 1 needs the openai"),
        ({"prompt": "a", "sampling_params": {"best_of": 2}}, r"sampling_params.best_of > 1 needs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "sampling_params": {"tools": []}},
            "sampling_params.tools needs the openai_route input",
        ),
        ({"openai_route": "/v1/completions", "openai_input": "x"}, "openai_input must be a JSON"),
        (
            {"openai_route": "/v1/completions", "openai_input": {"stream": 1}},
            "openai_input.stream must be true or false",
        ),
    ],
)
def test_job_input_errors_name_the_field(job_input: Any, message: str) -> None:
    from handler.runpod_queue.jobs import JobInputError, parse_job_input

    with pytest.raises(JobInputError, match=message):
        parse_job_input(job_input)


def test_text_job_becomes_a_streamed_openai_call() -> None:
    from handler.runpod_queue.jobs import parse_job_input

    call = parse_job_input(
        {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"top_k": 5}}
    )
    assert (call.method, call.route, call.sse, call.per_event) == (
        "POST",
        "/v1/chat/completions",
        True,
        False,
    )
    assert call.body == {
        "messages": [{"role": "user", "content": "hi"}],
        "top_k": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    models = parse_job_input({"openai_route": "/v1/models"})
    assert (models.method, models.body, models.sse) == ("GET", None, False)


def _serve_fake(argv: list[str]) -> None:
    """`python tests/handler/runpod_queue/test_handler.py PORT [--ready-after S]`: a fake
    gateway process."""
    port = int(argv[0])
    ready_after = float(argv[argv.index("--ready-after") + 1]) if "--ready-after" in argv else 0

    async def serve() -> None:
        fake = FakeGateway(ready=ready_after == 0)
        fake.port = port
        await fake.start()
        await asyncio.sleep(ready_after)
        fake.ready = True
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    _serve_fake(sys.argv[1:])
