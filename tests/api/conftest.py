"""Fixtures: a grozd API server on a free loopback port, and raw-socket helpers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from grozd.api import ApiConfig

from .grozdserver import GrozdServer


@pytest.fixture
def server() -> Iterator[GrozdServer]:
    """A fresh server with default limits."""
    with GrozdServer() as srv:
        yield srv


@pytest.fixture
def tight() -> Iterator[GrozdServer]:
    """A server with small limits and short timeouts, to test them quickly."""
    config = ApiConfig(
        max_body_bytes=4096,
        max_header_bytes=2048,
        idle_timeout=0.5,
        header_timeout=0.4,
        body_timeout=0.4,
        write_timeout=0.5,
        max_watchers_per_connection=3,
        max_pipeline=8,
        max_connections=50,
    )
    with GrozdServer(config) as srv:
        yield srv


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """``count`` complete responses (head + body) from a keep-alive connection."""
    sock.settimeout(timeout)
    buffer = b""
    out: list[bytes] = []
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses: {buffer!r}")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        headers = head.lower()
        if b"transfer-encoding: chunked" in headers:
            while b"\r\n0\r\n\r\n" not in b"\r\n" + rest:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed inside a chunked body")
                rest += chunk
            end = (b"\r\n" + rest).index(b"\r\n0\r\n\r\n") + 5 - 2
            out.append(head + b"\r\n\r\n" + rest[:end])
            buffer = rest[end:]
            continue
        length = 0
        for line in headers.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a body")
            rest += chunk
        out.append(head + b"\r\n\r\n" + rest[:length])
        buffer = rest[length:]
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
