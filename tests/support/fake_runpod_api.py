"""Local stand-ins for RunPod's APIs that record every call.

FakeRunPodApi is the GraphQL management API (POST /graphql): it understands the three operations
`thaw deploy` sends (the list of the caller's templates and endpoints, `saveTemplate` and
`saveEndpoint`, which create without `id` and update with one) and checks the bearer key.
FakeRunPodJobs is the job API a queue worker polls, so the runpod SDK runs as on RunPod.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RecordedCall:
    path: str
    authorization: str | None
    body: dict[str, Any]

    @property
    def variables_input(self) -> dict[str, Any]:
        return self.body.get("variables", {}).get("input", {})


@dataclass
class FakeRunPodApi:
    api_key: str = "test-key"
    calls: list[RecordedCall] = field(default_factory=list)
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Make the next mutation of this name answer with a GraphQL error.
    fail_mutation: str | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeRunPodApi:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                status, answer = fake.answer(self.path, self.headers.get("Authorization"), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def answer(
        self, path: str, authorization: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        self.calls.append(RecordedCall(path, authorization, body))
        if path != "/graphql":
            return 404, {"error": "not found"}
        if authorization != f"Bearer {self.api_key}":
            return 401, {"errors": [{"message": "Unauthorized"}]}
        query = str(body.get("query", ""))
        payload = (body.get("variables") or {}).get("input")
        for mutation, store in (("saveTemplate", self.templates), ("saveEndpoint", self.endpoints)):
            if f"{mutation}(" in query:
                if self.fail_mutation == mutation:
                    self.fail_mutation = None
                    return 200, {"errors": [{"message": f"{mutation}: GPU pool not available"}]}
                return 200, {"data": {mutation: self._save(store, payload)}}
        if "myself" in query:
            return 200, {"data": {"myself": self._listing()}}
        return 200, {"errors": [{"message": "unknown operation"}]}

    def _save(self, store: dict[str, dict[str, Any]], payload: Any) -> dict[str, Any]:
        record = dict(payload or {})
        if not record.get("id"):
            record["id"] = f"id{next(self._ids)}"
        store[record["id"]] = record
        return record

    def _listing(self) -> dict[str, Any]:
        return {
            "podTemplates": [
                {"id": t["id"], "name": t.get("name")} for t in self.templates.values()
            ],
            "endpoints": [
                {"id": e["id"], "name": e.get("name"), "templateId": e.get("templateId")}
                for e in self.endpoints.values()
            ],
        }


@dataclass
class FakeRunPodJobs:
    """RunPod's side of a queue worker: the job-take, job-stream, job-done and job-stop URLs.

    Point a worker at it with `worker_env()`; the runpod SDK then runs exactly as on RunPod.
    Tests add jobs to `pending`, job ids to stop to `to_stop`, and read what came back.
    """

    pending: list[dict[str, Any]] = field(default_factory=list)
    to_stop: list[str] = field(default_factory=list)
    takes: list[str] = field(default_factory=list)
    streamed: dict[str, list[Any]] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def worker_env(self) -> dict[str, str]:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        base = f"http://{host}:{port}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_POD_ID": "fake-worker",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            # The SDK refuses to start below 10% free disk; how full the test machine's disk
            # is says nothing about the handler under test.
            "RUNPOD_MIN_DISK_PERCENT": "0",
        }

    def add_job(self, job_id: str, job_input: Any) -> None:
        with self._lock:
            self.pending.append({"id": job_id, "input": job_input})

    def stop_job(self, job_id: str) -> None:
        with self._lock:
            self.to_stop.append(job_id)

    def start(self) -> FakeRunPodJobs:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                status, answer = fake._get(self.path)
                self._reply(status, answer)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                fake._post(self.path, self.rfile.read(length))
                self._reply(200, {})

            def _reply(self, status: int, answer: Any) -> None:
                data = b"" if status == 204 else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _get(self, path: str) -> tuple[int, Any]:
        # Both are long polls on RunPod; a short hold keeps the worker from spinning.
        for _ in range(10):
            with self._lock:
                if path.startswith("/job-stop/") and self.to_stop:
                    stopping, self.to_stop = self.to_stop, []
                    return 200, {"jobsToStop": stopping}
                if path.startswith("/job-take") and self.pending:
                    self.takes.append(path)
                    batch = path.startswith("/job-take-batch/")
                    size = _query_int(path, "batch_size", 1) if batch else 1
                    jobs, self.pending = self.pending[:size], self.pending[size:]
                    return 200, jobs if batch else jobs[0]
            threading.Event().wait(0.05)
        return 204, None

    def _post(self, path: str, body: bytes) -> None:
        job_id = path.split("?")[0].rstrip("/").split("/")[-1]
        payload = json.loads(body or b"{}")
        with self._lock:
            if path.startswith("/job-stream/"):
                self.streamed.setdefault(job_id, []).append(payload.get("output"))
            elif path.startswith("/job-done/"):
                self.done[job_id] = payload


def _query_int(path: str, name: str, default: int) -> int:
    for part in path.partition("?")[2].split("&"):
        key, _, value = part.partition("=")
        if key == name and value.isdigit():
            return int(value)
    return default
