"""`GET /openapi.json` tells the truth: real responses of every route, good and bad, validate
against the schema the document gives for that route, status and content type; every route the
router serves is documented, and every documented operation is exercised here."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from tests.gateway.test_openai import CHAT, make_chat_snapshot
from tests.support.gateway_fixtures import ROOT, Gateway, start_gateway

API_ROUTER = ROOT / "rust_gateway" / "src" / "api" / "mod.rs"
JSON = {"Content-Type": "application/json"}


@dataclass
class Checker:
    """Validates responses against the document and records which operations were seen."""

    document: dict[str, Any]
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        for template, item in self.document["paths"].items():
            pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
            if re.match(pattern, path) and method in item:
                return template, item[method]
        raise AssertionError(f"{method.upper()} {path} is not in the document")

    def schema_valid(self, instance: Any, schema: dict[str, Any], what: str) -> None:
        # References point into the document's components; resolve them from its root.
        rooted = {**schema, "components": self.document["components"]}
        errors = sorted(Draft202012Validator(rooted).iter_errors(instance), key=str)
        assert not errors, f"{what}: {errors[0].message}\n{json.dumps(instance)[:800]}"

    def check(self, response: requests.Response, method: str, path: str) -> requests.Response:
        template, op = self.operation(method, path)
        status = response.status_code
        what = f"{method.upper()} {path} -> {status}"
        documented = op["responses"].get(str(status))
        assert documented is not None, f"{what} is not documented\n{response.text[:300]}"
        self.seen.add((method, template, status))
        content = documented.get("content")
        if content is None:
            assert not response.content, f"{what} has an undocumented body"
            return response
        content_type = response.headers["content-type"].split(";")[0]
        assert content_type in content, f"{what}: undocumented content type {content_type}"
        media = content[content_type]
        if content_type == "application/json":
            self.schema_valid(response.json(), media["schema"], what)
        elif content_type == "text/event-stream":
            for data in sse_data(response):
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                schema = {"$ref": "#/components/schemas/Error"} if "error" in event else None
                self.schema_valid(event, schema or media["x-event-schema"], what + " event")
        else:
            self.schema_valid(response.text, media["schema"], what)
        return response


def sse_data(response: requests.Response) -> list[str]:
    return [
        line[len(b"data:") :].decode("utf-8").strip()
        for line in response.content.splitlines()
        if line.startswith(b"data:")
    ]


@pytest.fixture(scope="module")
def chat_snapshot(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_snapshot(tiny_snapshot, tmp_path_factory.mktemp("openapi-snapshot"))


@pytest.fixture()
def launch(gateway_binary: Path, chat_snapshot: Path, tmp_path: Path) -> Iterator[Callable]:
    started: list[Gateway] = []

    def _launch(**overrides: str) -> Gateway:
        gateway = start_gateway(gateway_binary, chat_snapshot, tmp_path, **overrides)
        started.append(gateway)
        return gateway

    yield _launch
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads((ROOT / "rust_gateway" / "openapi.json").read_text())


def router_routes() -> set[tuple[str, str]]:
    """(method, path) of every `.route(...)` in the API router's source."""
    source = API_ROUTER.read_text().split("pub fn probe_router")[0]
    routes = set()
    for path, handlers in re.findall(r'\.route\(\s*"([^"]+)",\s*(.+?)\)\n', source, re.S):
        for method in re.findall(r"\b(get|post)\(", handlers):
            routes.add((method, path))
    return routes


def test_the_document_is_valid_openapi_and_served(launch, document: dict[str, Any]) -> None:
    validate_spec(document)
    gateway = launch(THAW_API_KEY="key")
    # Open like /health: tooling fetches it without credentials.
    assert gateway.get("/openapi.json").json() == document


def test_every_served_route_is_documented(document: dict[str, Any]) -> None:
    routes = router_routes()
    assert len(routes) >= 20, routes
    documented = {(m, p) for p, item in document["paths"].items() for m in item}
    assert routes == documented


def exercise_ready_gateway(gateway: Gateway, check: Callable[..., requests.Response]) -> None:
    """Good and bad requests to every route of a ready gateway."""

    def get(path: str, **kw: Any) -> requests.Response:
        return check(gateway.get(path, **kw), "get", path.split("?")[0])

    def post(path: str, **kw: Any) -> requests.Response:
        return check(gateway.post(path, **kw), "post", path.split("?")[0])

    for path in ("/health", "/ping", "/ready", "/metrics", "/openapi.json", "/info", "/v1/models"):
        assert get(path).status_code == 200, path
    tgi = {"inputs": "hello world", "parameters": {"max_new_tokens": 4, "details": True}}
    tgi["parameters"].update({"decoder_input_details": True, "top_n_tokens": 2, "seed": 1})
    for path in ("/", "/generate", "/generate_stream"):
        assert post(path, json=tgi).status_code == 200
    assert post("/", json={**tgi, "stream": True}).status_code == 200
    best_of = {"best_of": 2, "do_sample": True}
    assert post("/generate", json={**tgi, "parameters": {**tgi["parameters"], **best_of}}).ok
    assert post("/tokenize", json={"inputs": "hello"}).status_code == 200
    assert post("/generate", data=b'{"inputs": ', headers=JSON).status_code == 400
    assert post("/generate", json={"inputs": 5}).status_code == 422
    out_of_range = {"inputs": "x", "parameters": {"top_p": 2}}
    assert post("/generate_stream", json=out_of_range).status_code == 422
    assert post("/tokenize", json={}).status_code == 422
    big = b'{"inputs": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    assert post("/generate", data=big, headers=JSON).status_code == 413

    chat = {"messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    assert post("/v1/chat/completions", json=chat).status_code == 200
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    assert post("/v1/chat/completions", json=streamed).status_code == 200
    text = {"prompt": "hello world", "max_tokens": 4, "logprobs": 2}
    assert post("/v1/completions", json=text).status_code == 200
    assert post("/v1/completions", json={**text, "stream": True}).status_code == 200
    assert post("/v1/chat/completions", json={"messages": "x"}).status_code == 400
    assert post("/v1/chat/completions", json={**chat, "n": 17}).status_code == 422
    assert post("/v1/completions", json={"prompt": "x", "best_of": 1, "n": 2}).status_code == 422
    assert post("/v1/chat/completions", json={**chat, "n": 2}).status_code == 200
    assert post("/v1/chat/completions", json={**streamed, "n": 2}).status_code == 200
    assert post("/v1/completions", json={**text, "echo": True, "best_of": 3}).status_code == 200

    jobs = [
        {"prompt": "hello", "sampling_params": {"max_tokens": 3}},
        {"messages": CHAT, "sampling_params": {"max_tokens": 3}},
        {"openai_route": "/v1/chat/completions", "openai_input": chat},
        {"openai_route": "/v1/completions", "openai_input": {**text, "stream": True}},
        {"openai_route": "/v1/models"},
    ]
    for job in jobs:
        done = post("/runsync?wait=10000", json={"input": job}).json()
        assert done["status"] == "COMPLETED", done
    job_id = post("/run", json={"input": jobs[3]}).json()["id"]
    for method in (get, post):
        assert method(f"/status/{job_id}").status_code == 200
        assert method(f"/stream/{job_id}").status_code == 200
        assert method("/status/nope").status_code == 404
        assert method("/stream/nope").status_code == 404
    assert post(f"/cancel/{job_id}").status_code == 200
    assert post("/cancel/nope").status_code == 404
    assert post("/run", json={"input": {}}).status_code == 422
    assert post("/runsync?wait=soon", json={"input": jobs[0]}).status_code == 400
    bad_openai = {"openai_route": "/v1/chat/completions", "openai_input": {"messages": 1}}
    assert post("/run", json={"input": bad_openai}).status_code == 400


def test_real_responses_match_the_document(launch, document: dict[str, Any]) -> None:
    checker = Checker(document)
    gateway = launch()
    gateway.wait_ready()
    exercise_ready_gateway(gateway, checker.check)

    # 401 with a key set.
    keyed = launch(THAW_API_KEY="key")
    for path in ("/ready", "/metrics", "/info", "/v1/models"):
        checker.check(keyed.get(path), "get", path)
    checker.check(keyed.post("/v1/completions", json={"prompt": "x"}), "post", "/v1/completions")

    # A worker that never starts: /ping 204, and a full queue answers 429.
    stuck = launch(THAW_WORKER_CMD="sleep 30", THAW_QUEUE_CAPACITY="1")
    assert checker.check(stuck.get("/ping"), "get", "/ping").status_code == 204
    assert checker.check(stuck.get("/ready"), "get", "/ready").status_code == 503
    job = {"input": {"prompt": "hello"}}
    assert checker.check(stuck.post("/run", json=job), "post", "/run").status_code == 200
    for path, body in [
        ("/run", job),
        ("/runsync", job),
        ("/generate", {"inputs": "x"}),
        ("/generate_stream", {"inputs": "x"}),
        ("/", {"inputs": "x"}),
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "x", "stream": True}),
    ]:
        assert checker.check(stuck.post(path, json=body), "post", path).status_code == 429, path

    # A worker that fails to start: 503 everywhere.
    failed = launch(STUB_FAIL_AT_START="1", THAW_MAX_START_FAILURES="1")
    deadline = time.monotonic() + 10
    while failed.get("/ping").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checker.check(failed.get("/ping"), "get", "/ping").status_code == 503
    for path, body in [("/v1/chat/completions", {"messages": CHAT}), ("/", {"inputs": "x"})]:
        assert checker.check(failed.post(path, json=body), "post", path).status_code == 503

    documented = {(m, p) for p, item in document["paths"].items() for m in item}
    exercised = {(m, p) for m, p, status in checker.seen if status == 200}
    assert documented <= exercised, f"never answered 200: {sorted(documented - exercised)}"
