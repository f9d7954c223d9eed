"""A minimal HTTP/1.1 client over asyncio streams, parsed with httptools.

Only what the etcd v2 API needs: one request at a time per connection, keep-alive,
Content-Length and chunked responses, and a small idle pool per endpoint. Errors are
reported as `ConnectFailed` (nothing was sent, so any request may be retried elsewhere)
or `RequestFailed` (the request may have reached the server).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

USER_AGENT = "grozd-etcd-client"
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Origin:
    """scheme://host:port of an endpoint (http only)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Parse an endpoint URL such as ``http://127.0.0.1:2379``."""
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http":
            raise ValueError(f"unsupported endpoint scheme in {url!r}: only http:// is supported")
        if not parts.hostname:
            raise ValueError(f"endpoint {url!r} has no host")
        return cls(parts.hostname, parts.port or 80)

    @property
    def netloc(self) -> str:
        """host:port as written in a URL or a Host header (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint as a URL without a path."""
        return f"http://{self.netloc}"

    def __str__(self) -> str:
        return self.url


class ConnectFailed(ConnectionError):
    """The TCP connection could not be opened; the request was never sent."""


class RequestFailed(ConnectionError):
    """The connection failed after the request was (possibly) sent.

    ``head`` is the (status, headers) pair when the response head had already arrived,
    which is how a dropped long-poll watch is told apart from an unreachable server.
    """

    def __init__(
        self,
        message: str,
        *,
        received: bool,
        head: tuple[int, dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.received = received
        self.head = head


@dataclass(slots=True)
class HTTPResponse:
    """A complete response; header names are lower-cased."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class _Message:
    """httptools callback target for one response."""

    parser: httptools.HttpResponseParser | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    head_done: bool = False
    done: bool = False
    keep_alive: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.parser is not None:
            self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # Read it now: llhttp resets its state (keep-alive included) once the message ends.
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()
        self.done = True


class Connection:
    """One keep-alive TCP connection to an origin."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = False
        self.uses = 0
        self.idle_since = time.monotonic()

    def alive(self) -> bool:
        """False once the peer closed or reset the connection while it sat idle."""
        return not (
            self.writer.transport.is_closing()
            or self.reader.at_eof()
            or self.reader.exception() is not None
        )

    def close(self) -> None:
        """Close without waiting; safe to call twice."""
        self.reusable = False
        self.writer.close()

    async def request(
        self,
        method: str,
        target: str,
        host: str,
        body: bytes | None = None,
        content_type: str | None = None,
        head_deadline: float | None = None,
        body_deadline: float | None = None,
    ) -> HTTPResponse:
        """Send one request and read its response.

        The head must arrive before ``head_deadline`` and the whole body before
        ``body_deadline`` (loop times; None waits forever, as a watch does).
        """
        self.uses += 1
        self.reusable = False
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json",
        ]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
            if content_type:
                lines.append(f"Content-Type: {content_type}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        msg = _Message()
        parser = msg.parser = httptools.HttpResponseParser(msg)
        received = False
        try:
            async with asyncio.timeout_at(head_deadline):
                self.writer.write(head + body if body else head)
                await self.writer.drain()
                while not msg.head_done:
                    received |= await self._feed(parser, msg)
            async with asyncio.timeout_at(body_deadline):
                while not msg.done:
                    await self._feed(parser, msg)
        except (OSError, TimeoutError, EOFError, httptools.HttpParserError) as exc:
            self.close()
            what = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise RequestFailed(
                f"{method} {target} failed: {what}",
                received=received,
                head=(msg.status, msg.headers) if msg.head_done else None,
            ) from exc
        self.reusable = msg.keep_alive and not self.reader.at_eof()
        return HTTPResponse(msg.status, msg.headers, b"".join(msg.body))

    async def _feed(self, parser: httptools.HttpResponseParser, msg: _Message) -> bool:
        data = await self.reader.read(READ_CHUNK)
        if not data:
            # A response delimited by the end of the connection (no length, not chunked)
            # is complete at EOF; anything else means the server went away mid-response.
            framed = "content-length" in msg.headers or "transfer-encoding" in msg.headers
            if msg.head_done and not framed:
                msg.done = True
                return False
            raise EOFError("connection closed by server")
        parser.feed_data(data)
        return True


class Pool:
    """Idle keep-alive connections to one origin.

    Active connections are not counted or limited: a long-poll watch holds one for as
    long as it waits, and must not starve ordinary requests.
    """

    def __init__(self, origin: Origin, max_idle: int = 4, idle_ttl: float = 60.0) -> None:
        self.origin = origin
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self._idle: deque[Connection] = deque()
        self._closed = False

    def take_idle(self) -> Connection | None:
        """The most recently used live idle connection, if any."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.alive() and now - conn.idle_since < self.idle_ttl:
                return conn
            conn.close()
        return None

    async def connect(self, deadline: float | None) -> Connection:
        """Open a new connection, or raise `ConnectFailed`."""
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(
                    self.origin.host, self.origin.port, limit=READ_CHUNK * 4
                )
        except (OSError, TimeoutError) as exc:
            what = "connect timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise ConnectFailed(f"{self.origin}: {what}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # A long-poll watch sits silent for hours; keepalive probes notice a dead peer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return Connection(reader, writer)

    def release(self, conn: Connection) -> None:
        """Return a connection after a complete response, or close it."""
        if self._closed or not conn.reusable or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection; later releases close instead of pooling."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
