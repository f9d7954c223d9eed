"""A small HTTP/1.1 server on asyncio (uvloop-friendly), parsed with httptools.

Keep-alive and pipelining: requests on a connection are handled one after another, in
order, like Go's server; a handler may answer with a stream (chunked), which lets the next
request start as soon as the stream is set up (a watch is registered), while its bytes
still go out in order. Every limit answers with a clear status and closes the connection:

* request line + headers over ``max_header_bytes``: 431
* body over ``max_body_bytes``: 413 (checked against Content-Length before reading)
* headers or body not arriving within ``header_timeout`` / ``body_timeout``: 408
* malformed HTTP: 400
* more than ``max_connections`` open: 503

A client that leaves our output unread for ``write_timeout`` is dropped, and a keep-alive
connection with nothing in flight is closed after ``idle_timeout``. A misbehaving client
only ever costs its own connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, cast

import httptools

from grozd.http.config import ApiConfig

log = logging.getLogger("grozd.http.server")

# A handler answers at once (a Response), later by calling back (a Pending), or later by a
# coroutine (an awaitable, run as a task). The first two spare a task and a loop turn per
# request: most of the cost of a small read, and most of the wait of a write.
Handler = Callable[["Request"], "Response | Pending | Awaitable[Response]"]

# Seconds a refused connection stays open (half-closed) so the client can read the answer.
LINGER = 1.0

_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class Request:
    """A parsed request. ``path`` and ``query`` are raw (still %-escaped) bytes; header
    names are lower-case."""

    __slots__ = ("method", "path", "query", "version", "headers", "body", "keep_alive", "conn",
                 "response")

    def __init__(
        self,
        method: str,
        path: bytes,
        query: bytes,
        version: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        conn: HttpConnection,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.conn = conn
        # Set when the request was refused while parsing: sent as is, in order.
        self.response: Response | None = None


class Response:
    """An answer: a complete ``body``, or a ``stream`` of chunks (sent chunked).

    ``on_close`` runs exactly once when the response is finished or abandoned (client gone)
    so resources behind a stream (a watcher) are released. ``close`` ends the connection
    after this response.
    """

    __slots__ = ("status", "headers", "body", "stream", "on_close", "close", "_encoded", "_wire")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        *,
        stream: AsyncIterator[bytes] | None = None,
        on_close: Callable[[], None] | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.stream = stream
        self.on_close = on_close
        self.close = close
        self._encoded: bytes | None = None
        # The whole answer as last sent, with what it depends on: (Date, keep-alive, HTTP/1.1).
        self._wire: tuple[bytes, bool, str, bytes] | None = None

    def encoded_headers(self) -> bytes:
        """``headers`` as header lines; kept, since an answer may be sent many times."""
        if self._encoded is None:
            self._encoded = "".join(f"{name}: {value}\r\n" for name, value in self.headers
                                    ).encode("latin-1", "replace")
        return self._encoded

    def release(self) -> None:
        callback, self.on_close = self.on_close, None
        if callback is not None:
            try:
                callback()
            except Exception:  # a cleanup failure must not take the connection down
                log.exception("event=response_cleanup_failed")


def plain(status: int, text: str, close: bool = False) -> Response:
    """A text/plain answer like Go's http.Error."""
    return Response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")],
        (text + "\n").encode(),
        close=close,
    )


class Pending:
    """An answer to come: a handler returns one, and whoever has the answer calls `answer`,
    which writes the response from that very call (or keeps it if the connection has not
    taken it yet). Answers to a client that has gone are dropped."""

    __slots__ = ("_deliver", "_response", "cancelled")

    def __init__(self) -> None:
        self._deliver: Callable[[Response], None] | None = None
        self._response: Response | None = None
        self.cancelled = False

    def answer(self, response: Response) -> None:
        if self.cancelled:
            response.release()
            return
        deliver, self._deliver = self._deliver, None
        if deliver is None:
            self._response = response
            return
        try:
            deliver(response)
        except Exception:  # the answering side (a state machine) must not see our failures
            log.exception("event=response_failed")

    def cancel(self) -> None:
        self.cancelled = True
        self._deliver = None

    def done(self) -> bool:
        return self.cancelled or (self._deliver is None and self._response is None)

    def _bind(self, deliver: Callable[[Response], None]) -> Response | None:
        """Deliver to ``deliver``; returns the answer instead if it came already."""
        response, self._response = self._response, None
        if response is None:
            self._deliver = deliver
        return response


class _Reject(Exception):
    """Raised from a parser callback to refuse the current request."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, run the handler in order, write in order.

    A request whose handler answers at once is answered from ``data_received`` itself; a
    handler that has to wait (a proposal, a quorum read) continues in a task, and the
    requests behind it wait their turn. Timeouts are deadlines checked by the server's
    sweep, not a timer per request.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.config = server.config
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.watchers = 0  # watches this connection holds (for the per-connection limit)
        self._requests: deque[Request] = deque()
        self._responses: deque[tuple[Request, Response]] = deque()
        # A handler that had to wait: its task, or the Pending it answered with.
        self._handling: asyncio.Task[None] | Pending | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._stop_reading = False
        self._paused = False
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer_kind = ""
        self._write_timer: asyncio.TimerHandle | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self._in_message = False
        self._url = b""
        self._head_size = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._expected = 0
        self._keep_alive = True

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        # Keep our output queued in user space small, so a slow reader is noticed.
        self.transport.set_write_buffer_limits(high=256 * 1024)
        if len(self.server.connections) > self.config.max_connections:
            self.server.rejected["connections"] += 1
            self._refuse(plain(503, "503 Service Unavailable: too many connections", close=True))
            return
        self._arm(self.config.idle_timeout, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
        for task in (self._handling, self._writer):
            if task is not None and not task.done():
                task.cancel()
        while self._responses:
            self._responses.popleft()[1].release()
        self._requests.clear()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(
                self.config.write_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        self._paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._stop_reading or self._closed:
            return
        if self._timer_kind == "idle":
            self._cancel_timer()
        try:
            self.parser.feed_data(data)
        except _Reject as exc:
            self._refuse(exc.response)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.response)
            else:
                log.debug("event=bad_request peer=%s error=%s", self.peer, exc)
                self.server.rejected["malformed"] += 1
                self._refuse(plain(400, "400 Bad Request", close=True))
        except httptools.HttpParserUpgrade as exc:
            # Upgrades (h2c, websocket) are not offered: the request was answered as plain
            # HTTP/1.1; anything after it starts a new message.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.parser = httptools.HttpRequestParser(self)
            self._reset_message()
            if offset < len(data):
                self.data_received(data[offset:])
        except httptools.HttpParserError as exc:
            log.debug("event=bad_request peer=%s error=%s", self.peer, exc)
            self.server.rejected["malformed"] += 1
            self._refuse(plain(400, "400 Bad Request", close=True))

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_message = True
        # Measured from the first byte, not reset by later ones: a client trickling a
        # byte at a time cannot hold the connection.
        self._arm(self.config.header_timeout, "header")

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.config.max_header_bytes:
            self.server.rejected["header_size"] += 1
            raise _Reject(_too_large_header(self.config.max_header_bytes))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.config.max_header_bytes:
            self.server.rejected["header_size"] += 1
            raise _Reject(_too_large_header(self.config.max_header_bytes))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()
        length = self._headers.get("content-length")
        if length is not None:
            try:
                self._expected = int(length)
            except ValueError:
                bad = plain(400, "400 Bad Request: bad Content-Length", close=True)
                raise _Reject(bad) from None
            if self._expected > self.config.max_body_bytes:
                self.server.rejected["body_size"] += 1
                raise _Reject(_too_large_body(self._expected, self.config.max_body_bytes))
        headers = self._headers
        if "expect" in headers and headers["expect"].lower() == "100-continue":
            # Only when nothing is ahead of it: an interim answer must not cut into another.
            busy = self._requests or self._responses or self._handling is not None
            if self.transport and not busy:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._expected or "transfer-encoding" in headers:
            self._arm(self.config.body_timeout, "body")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > self.config.max_body_bytes:
            self.server.rejected["body_size"] += 1
            raise _Reject(_too_large_body(self._body_size, self.config.max_body_bytes))

    def on_message_complete(self) -> None:
        self._cancel_timer()
        url = self._url
        if url.startswith(b"/"):
            path, _, query = url.partition(b"?")
            path = path.partition(b"#")[0]
        else:
            # Absolute form (a proxy-style target) or "*".
            try:
                parsed = httptools.parse_url(url)
                path, query = parsed.path or b"/", parsed.query or b""
            except httptools.HttpParserInvalidURLError:
                path, query = url, b""
        method = self.parser.get_method()
        request = Request(
            _METHODS.get(method) or method.decode("latin-1"),
            path,
            query,
            self.parser.get_http_version(),
            self._headers,
            b"".join(self._body),
            self._keep_alive,
            self,
        )
        self._in_message = False  # the next message begins with a reset
        self._enqueue(request)

    # -- request/response pumps ----------------------------------------------------------

    def _enqueue(self, request: Request) -> None:
        self._requests.append(request)
        if len(self._requests) >= self.config.max_pipeline and not self._reading_paused:
            # Pipelined too far ahead: stop reading until we catch up (TCP pushes back).
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        if self._handling is None:
            self._pump()

    def _pump(self) -> None:
        """Answer queued requests in order, until one has to wait or the output backs up."""
        while (
            self._requests
            and self._handling is None
            and not self._closed
            and len(self._responses) < self.config.max_pipeline
        ):
            request = self._requests.popleft()
            if self._reading_paused and len(self._requests) < self.config.max_pipeline // 2:
                self._reading_paused = False
                if self.transport is not None and not self._stop_reading:
                    self.transport.resume_reading()
            response = request.response
            if response is None:
                try:
                    answer = self.server.handler(request)
                except Exception:
                    answer = _handler_failed(request)
                if isinstance(answer, Pending):
                    early = answer._bind(partial(self._answered, request))
                    if early is None:
                        self._handling = answer
                        return
                    answer = early
                if not isinstance(answer, Response):
                    self._handling = self._loop.create_task(self._await_handler(request, answer))
                    return
                response = answer
            self._respond(request, response)
        self._maybe_idle()

    async def _await_handler(self, request: Request, pending: Awaitable[Response]) -> None:
        try:
            response = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            response = _handler_failed(request)
        self._answered(request, response)

    def _answered(self, request: Request, response: Response) -> None:
        """The answer to the request being handled came (from a Pending or an awaited
        handler): send it, then go on with the queue."""
        self._handling = None
        if self._closed:
            response.release()
            return
        self._respond(request, response)
        self._pump()

    def _respond(self, request: Request, response: Response) -> None:
        """Send at once when nothing is ahead and it is a plain body; else queue it."""
        if (
            not self._responses
            and response.stream is None
            and not self._paused
            and (self._writer is None or self._writer.done())
        ):
            try:
                keep = self._write_body(request, response)
            finally:
                response.release()
            if not keep:
                self._stop_reading = True
                self._finish(linger=response.close and request.response is response)
            return
        self._responses.append((request, response))
        if self._writer is None or self._writer.done():
            self._writer = self._loop.create_task(self._write_responses())

    async def _write_responses(self) -> None:
        while self._responses and not self._closed:
            request, response = self._responses[0]
            try:
                keep = await self._write(request, response)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                log.exception("event=response_failed peer=%s", self.peer)
                keep = False
            finally:
                if self._responses and self._responses[0][1] is response:
                    self._responses.popleft()
                response.release()
            if not keep:
                self._stop_reading = True
                self._finish(linger=response.close and request.response is response)
                return
            if self._handling is None and self._requests:
                self._pump()  # there is room again for answers held back
        self._maybe_idle()

    def _head(self, request: Request, response: Response, keep: bool) -> bytes:
        http11 = request.version != "1.0"
        streaming = response.stream is not None
        head = [_status_line(http11, response.status), response.encoded_headers(),
                b"Date: ", http_date(), b"\r\n"]
        if not keep:
            head.append(b"Connection: close\r\n")
        elif not http11:
            head.append(b"Connection: keep-alive\r\n")
        if streaming:
            if http11:
                head.append(b"Transfer-Encoding: chunked\r\n")
        elif response.status >= 200 and response.status not in (204, 304):
            head.append(b"Content-Length: %d\r\n" % len(response.body))
        head.append(b"\r\n")
        return b"".join(head)

    def _write_body(self, request: Request, response: Response) -> bool:
        """Send a response with a complete body; returns whether the connection stays open."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        keep = request.keep_alive and not response.close and not self._stop_reading
        if request.method == "HEAD":
            transport.write(self._head(request, response, keep))
            return keep
        # An answer sent again (a kept read) within the same second is the same bytes.
        wire, date = response._wire, http_date()
        if wire is None or wire[0] is not date or wire[1] != keep or wire[2] != request.version:
            data = self._head(request, response, keep) + response.body
            wire = response._wire = (date, keep, request.version, data)
        transport.write(wire[3])
        return keep

    async def _write(self, request: Request, response: Response) -> bool:
        """Send one response, waiting for the client to read; whether the connection stays."""
        if response.stream is None:
            keep = self._write_body(request, response)
            await self._drain()
            return keep
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        http11 = request.version != "1.0"
        # HTTP/1.0 has no chunking: the end of the stream is the close.
        keep = http11 and request.keep_alive and not response.close and not self._stop_reading
        transport.write(self._head(request, response, keep))
        async for chunk in response.stream:
            if self._closed or transport.is_closing():
                return False
            if chunk:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if http11 else chunk)
                await self._drain()
        if http11 and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
            await self._drain()
        return keep

    async def _drain(self) -> None:
        if not self._paused or self._closed:
            return
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def _finish(self, linger: bool) -> None:
        """Close after the last response. A refused request may still be arriving (a body
        too large): closing with it unread would reset the connection and could destroy our
        answer before the client reads it, so send FIN first and close a little later."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            self._loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    # -- refusals and timers -------------------------------------------------------------

    def _refuse(self, response: Response) -> None:
        """Answer a request that could not be parsed or accepted, after what precedes it."""
        response.close = True
        self._stop_reading = True
        self._cancel_timer()
        request = Request("GET", b"/", b"", "1.1", {}, b"", False, self)
        request.response = response
        self._enqueue(request)

    def _arm(self, delay: float, kind: str) -> None:
        self._deadline = self._loop.time() + delay
        self._timer_kind = kind
        self.server.armed.add(self)

    def _cancel_timer(self) -> None:
        if self._timer_kind:
            self._timer_kind = ""
            self.server.armed.discard(self)

    def _maybe_idle(self) -> None:
        busy = self._in_message or self._requests or self._responses or self._handling
        if not busy and not self._closed and not self._timer_kind:
            self._arm(self.config.idle_timeout, "idle")

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: act on a deadline that has passed."""
        if self._timer_kind and now >= self._deadline:
            kind = self._timer_kind
            if self._reading_paused and kind in ("header", "body"):
                # We stopped reading (answers backed up), not the client: the rest of the
                # request cannot arrive, so its clock starts again when we read again.
                self._deadline = now + (self.config.header_timeout if kind == "header"
                                        else self.config.body_timeout)
                return
            self._cancel_timer()
            self._timed_out(kind)

    def _timed_out(self, kind: str) -> None:
        if self._closed or self.transport is None:
            return
        if kind == "idle":
            if self._requests or self._responses:
                return
            log.debug("event=idle_close peer=%s", self.peer)
            self.transport.close()
            return
        self.server.rejected[f"{kind}_timeout"] += 1
        log.debug("event=request_timeout kind=%s peer=%s", kind, self.peer)
        if self._responses or self._requests or self._handling is not None:
            self.transport.abort()  # mid-pipeline: nothing sensible to answer
            return
        self._refuse(plain(408, f"408 Request Timeout: {kind} not received in time", close=True))

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if self.transport is not None and not self._closed:
            self.server.rejected["write_timeout"] += 1
            log.debug("event=write_timeout peer=%s", self.peer)
            self.transport.abort()


def _handler_failed(request: Request) -> Response:
    log.exception("event=handler_failed method=%s path=%r", request.method, request.path)
    return Response(500, [("Content-Type", "application/json")],
                    b'{"message":"Internal Server Error"}')


_METHODS = {m.encode(): m for m in ("GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS")}
_status_lines: dict[tuple[bool, int], bytes] = {}


def _status_line(http11: bool, status: int) -> bytes:
    line = _status_lines.get((http11, status))
    if line is None:
        line = f"HTTP/{'1.1' if http11 else '1.0'} {status} {reason(status)}\r\n".encode()
        _status_lines[(http11, status)] = line
    return line


def _too_large_header(limit: int) -> Response:
    return plain(431, f"431 Request Header Fields Too Large (limit {limit} bytes)", close=True)


def _too_large_body(size: int, limit: int) -> Response:
    body = (
        f'{{"message":"request body too large: {size} bytes, limit {limit} bytes"}}'
    ).encode()
    return Response(413, [("Content-Type", "application/json")], body, close=True)


class HttpServer:
    """Listens and hands each parsed request to ``handler``."""

    def __init__(self, handler: Handler, config: ApiConfig) -> None:
        self.handler = handler
        self.config = config
        self.connections: set[HttpConnection] = set()
        self.rejected: dict[str, int] = {
            k: 0
            for k in (
                "malformed",
                "header_size",
                "body_size",
                "header_timeout",
                "body_timeout",
                "write_timeout",
                "connections",
            )
        }
        self._servers: list[asyncio.AbstractServer] = []
        # Connections with a deadline (idle, header, body), checked by one periodic sweep.
        self.armed: set[HttpConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        timeouts = (config.idle_timeout, config.header_timeout, config.body_timeout)
        self._sweep_every = min(0.5, max(0.005, min(timeouts) / 8))

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self.armed if c._deadline <= now]:
            conn.check_deadline(now)
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0 picks a free one; see `port`). May be called again
        to listen on more addresses."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    @property
    def port(self) -> int:
        """The port of the first address listened on."""
        sockets = self.sockets
        if not sockets:
            raise RuntimeError("server not started")
        return sockets[0].getsockname()[1]

    @property
    def sockets(self) -> list[Any]:
        """Every listening socket."""
        return [sock for server in self._servers for sock in server.sockets]

    async def stop(self) -> None:
        """Stop listening and close every connection (watches end)."""
        servers, self._servers = self._servers, []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for server in servers:
            await server.wait_closed()
        await asyncio.sleep(0)
