"""Answers given later through a Pending: in order, at once or after, never to a client
that has gone, and never raising into whoever answers."""

from __future__ import annotations

import asyncio

from grozd.http.config import ApiConfig
from grozd.http.server import HttpServer, Pending, Request, Response


async def exchange(port: int, requests: bytes, answers: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    out = []
    for _ in range(answers):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append(await reader.readexactly(length))
    writer.close()
    return out


def test_pending_answers_keep_request_order_and_survive_gone_clients() -> None:
    answered_late: list[Pending] = []

    def handler(request: Request) -> Response | Pending:
        pending = Pending()
        name = request.path.rsplit(b"/", 1)[1]
        if name == b"now":
            pending.answer(Response(200, body=b"now"))  # before the server takes it
        elif name == b"later":
            asyncio.get_running_loop().call_later(0.05, pending.answer,
                                                  Response(200, body=b"later"))
        elif name == b"never":
            answered_late.append(pending)
        else:
            return Response(200, body=name)
        return pending

    async def main() -> None:
        server = HttpServer(handler, ApiConfig(cors=False))
        await server.start("127.0.0.1", 0)
        try:
            requests = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p
                                for p in (b"later", b"plain", b"now", b"later"))
            assert await exchange(server.port, requests, 4) == [b"later", b"plain", b"now",
                                                                b"later"]
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
            while not answered_late:
                await asyncio.sleep(0.01)
            writer.close()
            await asyncio.sleep(0.05)
            answered_late[0].answer(Response(200, body=b"too late"))  # dropped, no error
            assert answered_late[0].cancelled
        finally:
            await server.stop()

    asyncio.run(main())
