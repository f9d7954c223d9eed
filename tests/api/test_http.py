"""HTTP/1.1 behaviour: keep-alive, pipelining, chunked watches, disconnects, HTTP/1.0."""

from __future__ import annotations

import json
import time
import urllib.request

from .conftest import connect, read_responses, read_until_closed, status_of

FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


def body_of(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                return out
            out, rest = out + rest[:n], rest[n + 2 :]
    return body


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def test_keep_alive_serves_many_requests_on_one_connection(server):
    with connect(server.url) as sock:
        for i in range(20):
            sock.sendall(b"PUT /v2/keys/k HTTP/1.1\r\nHost: x\r\n" + FORM +
                         b"Content-Length: %d\r\n\r\nvalue=%d" % (len(b"value=%d" % i), i))
            (answer,) = read_responses(sock, 1)
            assert status_of(answer) in (200, 201)
    assert server.store.index == 20


def test_pipelined_requests_are_answered_in_order(server):
    requests = b"".join(
        b"PUT /v2/keys/p/%d HTTP/1.1\r\nHost: x\r\n" % i + FORM + b"Content-Length: 7\r\n\r\n"
        + b"value=%d" % i
        for i in range(10)
    ) + b"GET /v2/keys/p?sorted=true HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server.url) as sock:
        sock.sendall(requests)
        answers = read_responses(sock, 11)
    keys = [json.loads(body_of(a))["node"]["key"] for a in answers[:10]]
    assert keys == [f"/p/{i}" for i in range(10)]
    listing = json.loads(body_of(answers[10]))["node"]["nodes"]
    assert [n["value"] for n in listing] == [str(i) for i in range(10)]


def test_a_pipelined_watch_is_registered_before_the_next_request_runs(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET /v2/keys/w?wait=true HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"PUT /v2/keys/w HTTP/1.1\r\nHost: x\r\n" + FORM +
                     b"Content-Length: 7\r\n\r\nvalue=1")
        watch, write = read_responses(sock, 2)
    assert status_of(watch) == 200 and status_of(write) == 201
    event = json.loads(body_of(watch))
    assert event["action"] == "set" and event["node"]["value"] == "1"


def test_streaming_watch_and_disconnect_release_the_watcher(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET /v2/keys/s?wait=true&stream=true HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: server.sync(lambda: server.store.watcher_count) == 1)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert b"Transfer-Encoding: chunked" in head
        for v in range(3):
            urllib.request.urlopen(urllib.request.Request(
                f"{server.url}/v2/keys/s", data=b"value=%d" % v, method="PUT"), timeout=5)
        got = head
        while got.count(b'"action":"set"') < 3:
            got += sock.recv(4096)
    wait_for(lambda: server.sync(lambda: server.store.watcher_count) == 0)
    wait_for(lambda: sum(c.watchers for c in server.app.http.connections) == 0)


def test_stopping_the_server_ends_watches(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET /v2/keys/w?wait=true HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: server.sync(lambda: server.store.watcher_count) == 1)
        server.call(server.app.stop)
        read_until_closed(sock)
    assert server.sync(lambda: server.store.watcher_count) == 0


def test_http_1_0_closes_after_the_answer(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET /v2/keys/ HTTP/1.0\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in answer


def test_expect_continue_and_chunked_request_body(server):
    with connect(server.url) as sock:
        sock.sendall(b"PUT /v2/keys/c HTTP/1.1\r\nHost: x\r\n" + FORM +
                     b"Expect: 100-continue\r\nContent-Length: 7\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"value=1")
        assert status_of(read_responses(sock, 1)[0]) == 201
        sock.sendall(b"PUT /v2/keys/c HTTP/1.1\r\nHost: x\r\n" + FORM +
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nval\r\n4\r\nue=2\r\n0\r\n\r\n")
        (answer,) = read_responses(sock, 1)
    assert json.loads(body_of(answer))["node"]["value"] == "2"


def test_absolute_form_target_and_head(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET http://example/v2/keys/?recursive=true HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_responses(sock, 1)[0]) == 200
        sock.sendall(b"HEAD /v2/keys/ HTTP/1.1\r\nHost: x\r\n\r\n")
        # HEAD has a Content-Length but no body.
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert status_of(head) == 200 and b"Content-Length: 37" in head and rest == b""
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        (answer,) = read_responses(sock, 1)
    assert b"etcdcluster" in answer


def test_upgrade_requests_are_served_as_plain_http(server):
    with connect(server.url) as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings"
                     b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        (answer,) = read_responses(sock, 1)
    assert status_of(answer) == 200 and b"etcdserver" in answer


def test_deep_pipelines_are_throttled_not_refused(tight):
    requests = b"".join(b"GET /v2/keys/?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(60))
    with connect(tight.url) as sock:
        sock.sendall(requests)
        answers = read_responses(sock, 60)
    assert [status_of(a) for a in answers] == [200] * 60


def test_one_app_can_listen_on_several_addresses():
    import asyncio

    from grozd.api import LocalBackend, make_app
    from grozd.store import Store

    async def main() -> list[bytes]:
        store = Store()
        app = make_app(store, LocalBackend(store))
        await app.start("127.0.0.1", 0)
        await app.start("127.0.0.1", 0)
        answers = []
        for sock in app.http.sockets:
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(b"GET /version HTTP/1.0\r\n\r\n")
            answers.append(await reader.read())
            writer.close()
        await app.stop()
        assert app.http.sockets == []
        return answers

    answers = asyncio.run(main())
    assert len(answers) == 2 and all(a.startswith(b"HTTP/1.0 200") for a in answers)
