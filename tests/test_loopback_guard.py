"""The session's loopback guard refuses other addresses before any packet leaves."""

from __future__ import annotations

import socket

import pytest

from tests.support.loopback_guard import NonLoopbackConnection


@pytest.mark.parametrize(
    "address",
    [("192.0.2.1", 80), ("169.254.169.254", 80), ("10.0.0.1", 443), ("8.8.8.8", 53)],
)
def test_other_addresses_are_refused(address: tuple[str, int]) -> None:
    with socket.socket() as sock, pytest.raises(NonLoopbackConnection):
        sock.connect(address)


def test_ipv6_and_mapped_addresses() -> None:
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(NonLoopbackConnection):
        sock.connect(("2001:db8::1", 80, 0, 0))
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(NonLoopbackConnection):
        sock.connect_ex(("::ffff:192.0.2.1", 80, 0, 0))


def test_loopback_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket() as client:
            client.connect(server.getsockname())
