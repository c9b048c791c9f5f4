"""Webhooks cannot be aimed at the gateway's own network, end to end through the real binary.

Loopback in every spelling is refused at submit (422) and nothing reaches the recorders this
test runs on loopback; a redirect from an allowlisted target to a refused one is not followed;
an allowlisted recorder does get its webhook (so these tests can fail); with the allowlist-only
setting a public address is refused at submit. Every server here listens on loopback, and every
address a gateway here is asked to call is loopback: the public address of the allowlist-only
test is only ever refused, and that gateway cannot finish a job, so it could not deliver one
even if the check were broken. The other ranges (private, link-local, CGNAT, ...) are unit
tests of the address classifier (rust_gateway/src/jobs/address.rs), never connections."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.gateway_fixtures import Gateway

JOB = {"prompt": "hello world", "sampling_params": {"max_tokens": 4}}
# The production policy: public addresses only, no allowlist (the fixtures' default is stricter).
OPEN_POLICY = {"THAW_WEBHOOK_ALLOWLIST_ONLY": "false", "THAW_WEBHOOK_ALLOW": ""}


@dataclass
class Recorder:
    """HTTP servers on loopback addresses, all on one port, that record every request."""

    port: int = 0
    hits: list[tuple[str, str, str]] = field(default_factory=list)
    servers: list[http.server.HTTPServer] = field(default_factory=list)
    redirect_to: str | None = None

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.hits.append((self.server.server_address[0], self.command, self.path))
                if recorder.redirect_to is None:
                    self.send_response(200)
                else:
                    self.send_response(307 if "307" in self.path else 302)
                    self.send_header("Location", recorder.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def listen(self, address: str) -> bool:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            address_family = family

        try:
            server = Server((address, self.port), self.handler())
        except OSError:
            return False
        self.port = server.server_address[1]
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return True

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    """Listens on 127.0.0.1, and on 127.0.0.2 and [::1] with the same port where it can."""
    rec = Recorder()
    assert rec.listen("127.0.0.1")
    rec.listen("127.0.0.2")
    rec.listen("::1")
    yield rec
    rec.close()


def run(gateway: Gateway, webhook: str, route: str = "/run") -> Any:
    return gateway.post(route, json={"input": JOB, "webhook": webhook})


def wait_final(gateway: Gateway, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while (status := gateway.get(f"/status/{job_id}").json())["status"] in {
        "IN_QUEUE",
        "IN_PROGRESS",
    }:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)
    return status


def loopback_spellings(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook",
        f"http://127.0.0.2:{port}/hook",
        f"http://127.255.255.254:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
        f"http://[::ffff:7f00:2]:{port}/hook",
        f"http://[::127.0.0.1]:{port}/hook",
        f"http://0.0.0.0:{port}/hook",
        f"http://0:{port}/hook",
        f"http://[::]:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://LOCALHOST.:{port}/hook",
        f"http://hooks.localhost:{port}/hook",
        # The URL parser reads these as 127.0.0.1 (WHATWG IPv4 number forms).
        f"http://2130706433:{port}/hook",
        f"http://0x7f000001:{port}/hook",
        f"http://0x7f.1:{port}/hook",
        f"http://127.1:{port}/hook",
        f"http://017700000001:{port}/hook",
        f"https://127.0.0.1:{port}/hook",
        f"http://user:pw@127.0.0.1:{port}/hook",
    ]


def test_loopback_in_every_spelling_is_refused_at_submit(launch, recorder: Recorder) -> None:
    gateway = launch(**OPEN_POLICY)
    gateway.wait_ready()
    for route in ("/run", "/runsync"):
        for webhook in loopback_spellings(recorder.port):
            refused = run(gateway, webhook, route)
            assert refused.status_code == 422, (route, webhook, refused.text)
            body = refused.json()
            assert body["error_type"] == "validation"
            assert body["error"].startswith("`webhook` host"), body
    # Let anything wrongly accepted finish and try to deliver.
    time.sleep(1.5)
    assert recorder.hits == []


def test_a_redirect_is_not_followed(launch, recorder: Recorder) -> None:
    """An allowlisted target (127.0.0.2) redirects to a refused one (127.0.0.1)."""
    target = Recorder()
    target.redirect_to = f"http://127.0.0.1:{recorder.port}/hook"
    if not target.listen("127.0.0.2"):
        pytest.skip("127.0.0.2 is not usable here")
    try:
        gateway = launch(**{**OPEN_POLICY, "THAW_WEBHOOK_ALLOW": "127.0.0.2/32"})
        gateway.wait_ready()
        for path in ("/302", "/307"):
            accepted = run(gateway, f"http://127.0.0.2:{target.port}{path}")
            assert accepted.status_code == 200, accepted.text
            assert wait_final(gateway, accepted.json()["id"])["status"] == "COMPLETED"
        deadline = time.monotonic() + 10
        while {p for _, _, p in target.hits} != {"/302", "/307"}:
            assert time.monotonic() < deadline, f"no delivery attempt: {gateway.log()}"
            time.sleep(0.05)
        assert all(method == "POST" for _, method, _ in target.hits)
        time.sleep(1.0)
        assert recorder.hits == []
        assert "webhook refused" in gateway.log()
    finally:
        target.close()


def test_an_allowlisted_loopback_recorder_gets_the_webhook(launch, recorder: Recorder) -> None:
    gateway = launch(**{**OPEN_POLICY, "THAW_WEBHOOK_ALLOW": "127.0.0.1"})
    gateway.wait_ready()
    accepted = run(gateway, f"http://127.0.0.1:{recorder.port}/hook")
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["id"]
    assert wait_final(gateway, job_id)["status"] == "COMPLETED"
    deadline = time.monotonic() + 10
    while not recorder.hits:
        assert time.monotonic() < deadline, f"no webhook call: {gateway.log()}"
        time.sleep(0.05)
    assert recorder.hits == [("127.0.0.1", "POST", "/hook")]
    # Still only that address: 127.0.0.2 is loopback too, and not on the list.
    assert run(gateway, f"http://127.0.0.2:{recorder.port}/hook").status_code == 422


def test_allowlist_only_refuses_public_targets_at_submit(launch) -> None:
    # A worker that never starts, and a long wait for it: no job here can finish, so even a
    # broken check could not lead to a delivery before the gateway is killed below.
    gateway = launch(
        THAW_WEBHOOK_ALLOWLIST_ONLY="true",
        THAW_WEBHOOK_ALLOW="127.0.0.1",
        THAW_WORKER_CMD="sleep 60",
        THAW_READY_WAIT_S="600",
    )
    try:
        for webhook in (
            "http://93.184.216.34/hook",
            "https://93.184.216.34:8443/hook",
            "http://[2606:2800:220:1:248:1893:25c8:1946]/hook",
            "http://example.com/hook",
            "http://127.0.0.2/hook",
        ):
            refused = run(gateway, webhook)
            assert refused.status_code == 422, (webhook, refused.text)
            assert "THAW_WEBHOOK_ALLOWLIST_ONLY" in refused.json()["error"], refused.text
        # The listed target itself is accepted (and waits, undeliverable, for the worker).
        assert run(gateway, "http://127.0.0.1:9/hook").status_code == 200
    finally:
        gateway.process.kill()
        gateway.process.wait()


def test_the_refusal_names_the_field_and_the_reason(launch) -> None:
    # As above: a gateway that cannot finish a job, killed at the end.
    gateway = launch(**OPEN_POLICY, THAW_WORKER_CMD="sleep 60", THAW_READY_WAIT_S="600")
    try:
        refused = run(gateway, "http://169.254.169.254/latest/meta-data/")
        assert refused.status_code == 422
        assert refused.json()["error"].startswith(
            "`webhook` host 169.254.169.254 is a link-local address"
        )
    finally:
        gateway.process.kill()
        gateway.process.wait()
