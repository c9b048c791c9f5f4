"""A guard for the whole test session: sockets of the test process may connect to loopback
(127.0.0.0/8, ::1) and Unix sockets only. A test whose code under test is broken, or that loses
its local endpoint setting, fails with an error instead of sending traffic anywhere else.

Child processes (the gateway, the worker) are not covered: their traffic is kept local by each
suite's own settings, and address rules are tested as pure functions."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class NonLoopbackConnection(ConnectionRefusedError):
    """A test tried to connect outside loopback."""


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        raise NonLoopbackConnection(f"tests connect to IP addresses only, got {host!r}") from None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise NonLoopbackConnection(f"tests may only connect to loopback, not {ip}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    return _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _original_connect_ex(self, address)


def install() -> None:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
