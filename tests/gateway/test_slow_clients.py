"""Slow clients and floods against the real gateway, on loopback only: hundreds of sockets that
trickle headers or bodies (or send nothing) are each closed by their timeout while /health stays
fast; connections over THAW_MAX_CONNECTIONS wait; a full queue refuses a request before its
prompt is tokenized, /tokenize included."""

from __future__ import annotations

import select
import socket
import threading
import time

import requests

from tests.support.gateway_fixtures import Gateway

LOOPBACK = "127.0.0.1"


def open_socket(gateway: Gateway) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, gateway.port), timeout=5)
    sock.setblocking(False)
    return sock


def health_latencies(gateway: Gateway, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        assert gateway.get("/health", timeout=5).status_code == 200
        latencies.append(time.monotonic() - started)
    return latencies


def trickle_until_closed(
    sockets: dict[socket.socket, bytes], every_s: float, deadline_s: float
) -> dict[socket.socket, bytes]:
    """Sends one byte of each socket's payload every `every_s` until the server closes it;
    returns what each closed socket received."""
    sent = dict.fromkeys(sockets, 0)
    received: dict[socket.socket, bytes] = {}
    open_ = set(sockets)
    deadline = time.monotonic() + deadline_s
    next_send = time.monotonic()
    while open_ and time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            for sock in list(open_):
                payload = sockets[sock]
                if sent[sock] < len(payload):
                    try:
                        sock.send(payload[sent[sock] : sent[sock] + 1])
                        sent[sock] += 1
                    except OSError:
                        open_.discard(sock)
                        received[sock] = received.get(sock, b"")
            next_send = time.monotonic() + every_s
        readable, _, _ = select.select(list(open_), [], [], 0.05)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                received[sock] = received.get(sock, b"") + data
            else:
                open_.discard(sock)
                received.setdefault(sock, b"")
    return {sock: received[sock] for sock in sockets if sock in received and sock not in open_}


def test_slow_loris_sockets_are_closed_by_their_timeouts_while_health_stays_fast(launch) -> None:
    gateway = launch(THAW_HEADER_READ_TIMEOUT_S="2", THAW_BODY_READ_TIMEOUT_S="2")
    gateway.wait_ready()
    header_payload = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    body_payload = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    slow_headers = {open_socket(gateway): header_payload for _ in range(120)}
    slow_bodies = {open_socket(gateway): body_payload + b"{" * 1000 for _ in range(120)}
    silent = {open_socket(gateway): b"" for _ in range(60)}
    everyone = {**slow_headers, **slow_bodies, **silent}
    # The body sockets send their headers at once; then everyone trickles.
    for sock in slow_bodies:
        sock.send(body_payload)
    outcome: dict[socket.socket, bytes] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(trickle_until_closed(everyone, 0.25, 15)), daemon=True
    )
    started = time.monotonic()
    runner.start()
    time.sleep(0.5)
    latencies = health_latencies(gateway, 5)
    runner.join()
    elapsed = time.monotonic() - started
    closed_headers = sum(sock in outcome for sock in slow_headers)
    closed_silent = sum(sock in outcome for sock in silent)
    timed_out_bodies = sum(b" 408 " in outcome.get(sock, b"") for sock in slow_bodies)
    print(
        f"slow-loris: {len(everyone)} sockets; closed: {closed_headers}/{len(slow_headers)} "
        f"trickling headers, {closed_silent}/{len(silent)} silent, "
        f"{timed_out_bodies}/{len(slow_bodies)} trickling bodies (408); "
        f"all closed after {elapsed:.1f}s; /health latencies (s) "
        f"{[round(latency, 3) for latency in latencies]}"
    )
    for sock in everyone:
        sock.close()
    assert max(latencies) < 0.5
    assert closed_headers == len(slow_headers)
    assert closed_silent == len(silent)
    assert timed_out_bodies == len(slow_bodies)
    # Nothing of that hurt the gateway.
    assert gateway.post("/generate", json={"inputs": "hello"}).status_code == 200


def test_responses_may_take_longer_than_the_header_deadline(launch) -> None:
    gateway = launch(THAW_HEADER_READ_TIMEOUT_S="1", STUB_TOKEN_DELAY_S="0.05", STUB_TOKENS="1000")
    gateway.wait_ready()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 50}}
    started = time.monotonic()
    with requests.Session() as session:
        streamed = session.post(f"{gateway.url}/generate_stream", json=body, timeout=30)
        events = [line for line in streamed.text.splitlines() if line.startswith("data:")]
        # The same keep-alive connection serves a second long request.
        unary = session.post(f"{gateway.url}/generate", json=body, timeout=30)
    elapsed = time.monotonic() - started
    print(f"two 50-token responses over one connection in {elapsed:.1f}s (header deadline 1 s)")
    assert streamed.status_code == 200 and len(events) == 50
    assert unary.status_code == 200
    assert unary.json()["generated_text"]
    assert elapsed > 2


def test_connections_over_the_cap_wait_for_a_free_one(launch) -> None:
    gateway = launch(THAW_MAX_CONNECTIONS="8", THAW_HEADER_READ_TIMEOUT_S="2")
    gateway.wait_ready()
    time.sleep(2.5)  # the probes' keep-alive connections closed by now
    idle = [socket.create_connection((LOOPBACK, gateway.port), timeout=5) for _ in range(8)]
    time.sleep(0.3)
    started = time.monotonic()
    response = gateway.get("/health", timeout=10)
    waited = time.monotonic() - started
    print(f"/health behind 8 idle connections (cap 8, header timeout 2 s): waited {waited:.2f}s")
    assert response.status_code == 200
    # It was served once the idle connections timed out, not before.
    assert 1.0 < waited < 8
    for sock in idle:
        sock.close()
    started = time.monotonic()
    assert gateway.get("/health").status_code == 200
    assert time.monotonic() - started < 0.5


def test_a_full_queue_refuses_before_tokenizing(launch) -> None:
    # The worker runs one slow request at a time; a second one fills the queue's only place.
    gateway = launch(
        THAW_QUEUE_CAPACITY="1",
        STUB_MAX_RUNNING="1",
        STUB_TOKEN_DELAY_S="0.05",
        STUB_TOKENS="1000",
        THAW_SHUTDOWN_GRACE_S="1",
    )
    gateway.wait_ready()
    huge = {"inputs": "The quick brown fox jumps over the lazy dog. " * 40_000}
    # Baseline, queue empty: the prompt is tokenized and refused as too long.
    started = time.monotonic()
    too_long = gateway.post("/generate", json=huge)
    tokenized_s = time.monotonic() - started
    assert too_long.status_code == 422, too_long.text

    def occupy() -> None:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 200}}
        try:
            requests.post(f"{gateway.url}/generate", json=body, timeout=60)
        except requests.RequestException:
            pass  # the gateway stops at the end of the test with these still running

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 10
        while line not in gateway.get("/metrics").text:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)

    # One after the other: sent together, the second could find the first still queued (the
    # queue's one place taken) and be refused, leaving the queue empty.
    threading.Thread(target=occupy, daemon=True).start()
    wait_for("thaw_running_requests 1")
    threading.Thread(target=occupy, daemon=True).start()
    wait_for("thaw_queue_size 1")
    started = time.monotonic()
    full = gateway.post("/generate", json=huge)
    refused_s = time.monotonic() - started
    print(f"huge prompt: tokenized and refused in {tokenized_s:.3f}s; 429 in {refused_s:.3f}s")
    assert full.status_code == 429
    assert full.headers["Retry-After"] == "1"
    assert refused_s < tokenized_s / 3
    tokenize = gateway.post("/tokenize", json=huge)
    assert tokenize.status_code == 429
    completion = gateway.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert completion.status_code == 429
