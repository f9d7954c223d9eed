"""Small misbehaving HTTP servers for failover tests, run on the test's own event loop."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

Handler = Callable[["Request", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Request:
    method: str = ""
    target: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    done: bool = False

    def on_url(self, url: bytes) -> None:
        self.target += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the stream, or None at EOF."""
    req = Request()
    parser = httptools.HttpRequestParser(req)
    while not req.done:
        data = await reader.read(65536)
        if not data:
            return None
        parser.feed_data(data)
    req.method = parser.get_method().decode()
    return req


def respond(writer: asyncio.StreamWriter, status: int, body: bytes = b"", **headers: str) -> None:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN, like a crashed peer."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FakeServer:
    """Serves each request on a connection with ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while (req := await read_request(reader)) is not None:
                self.requests.append(req)
                await self.handler(req, reader, writer)
                if writer.transport.is_closing():
                    return
        except (ConnectionError, httptools.HttpParserError):
            pass
        finally:
            writer.close()


async def reset_handler(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter):
    reset(w)


async def hang_handler(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter):
    await asyncio.sleep(3600)


def status_handler(status: int, body: bytes) -> Handler:
    async def handler(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter):
        respond(w, status, body, Content_Type="application/json")

    return handler


def redirect_handler(to_url: str) -> Handler:
    """Answers 307 to the same path on ``to_url``, as an etcd 2 follower did for writes."""

    async def handler(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter):
        respond(w, 307, b"", Location=to_url + req.target)

    return handler


class Proxy:
    """A TCP proxy to etcd whose client connections the test can cut or freeze."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.port = 0
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after a `stop`)."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop accepting; new connections are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def drop(self) -> None:
        """Cut every proxied connection, both sides."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool):
            try:
                while data := await src.read(65536):
                    # Frozen: swallow what etcd sends, as if the network ate it.
                    if not (down and self.frozen):
                        dst.write(data)
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
