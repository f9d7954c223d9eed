"""Limits: oversized and malformed requests, slow clients, idle connections, floods."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

from .conftest import connect, read_responses, read_until_closed, status_of


def put(url: str, key: str, value: str) -> int:
    req = urllib.request.Request(
        f"{url}/v2/keys{key}", data=f"value={value}".encode(), method="PUT",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status


def get_value(url: str, key: str) -> str:
    with urllib.request.urlopen(f"{url}/v2/keys{key}", timeout=5) as resp:
        return json.loads(resp.read())["node"]["value"]


def test_body_over_the_limit_is_refused_before_it_is_read(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"PUT /v2/keys/big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\nvalue=")
        answer = read_until_closed(sock)
    assert status_of(answer) == 413
    assert b"connection: close" in answer.lower()
    assert b"request body too large: 100000 bytes, limit 4096 bytes" in answer
    assert tight.store.index == 0


def test_chunked_body_over_the_limit_is_refused(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"PUT /v2/keys/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
        for _ in range(3):
            sock.sendall(b"800\r\n" + b"v" * 0x800 + b"\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 413


def test_body_at_the_limit_is_fine(tight):
    value = "x" * (4096 - len("value="))
    assert put(tight.url, "/edge", value) == 201
    assert get_value(tight.url, "/edge") == value


def test_default_limit_is_one_and_a_half_mebibytes(server):
    assert put(server.url, "/big", "x" * (1536 * 1024 - 100)) == 201
    with connect(server.url) as sock:
        sock.sendall(b"PUT /v2/keys/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1572865\r\n\r\n")
        assert status_of(read_until_closed(sock)) == 413


def test_headers_over_the_limit(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"GET /v2/keys/ HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 5000 + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 431
    with connect(tight.url) as sock:
        sock.sendall(b"GET /v2/keys/" + b"k" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_until_closed(sock)) == 431


def test_malformed_request_gets_400_and_close(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 400


def test_slow_headers_time_out_even_when_trickling(tight):
    with connect(tight.url) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v2/keys/ HTTP/1.1\r\n")
        answer = b""
        for _ in range(20):  # one header byte every 50 ms must not keep it alive
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.05)
        answer = read_until_closed(sock)
    assert status_of(answer) == 408
    assert time.monotonic() - started < 2


def test_slow_body_times_out(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"PUT /v2/keys/k HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nval")
        answer = read_until_closed(sock)
    assert status_of(answer) == 408
    assert tight.store.index == 0


def test_idle_keep_alive_connection_is_closed(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"GET /v2/keys/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_responses(sock, 1)[0]) == 200
        started = time.monotonic()
        assert read_until_closed(sock, timeout=5) == b""
        assert 0.3 < time.monotonic() - started < 3


def test_a_waiting_watch_is_not_idle(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"GET /v2/keys/w?wait=true HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)  # twice the idle timeout
        put(tight.url, "/w", "1")
        (answer,) = read_responses(sock, 1)
    assert b'"value":"1"' in answer


def test_too_many_watches_on_one_connection(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"".join(b"GET /v2/keys/w%d?wait=true HTTP/1.1\r\nHost: x\r\n\r\n" % i
                              for i in range(4)))
        deadline = time.monotonic() + 5
        while tight.sync(lambda: tight.store.watcher_count) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for i in range(4):
            put(tight.url, f"/w{i}", "x")
        answers = read_responses(sock, 4)
    assert [status_of(a) for a in answers] == [200, 200, 200, 429]
    assert b"too many watches on one connection (limit 3)" in answers[3]


def test_too_many_connections(tight):
    socks = [connect(tight.url) for _ in range(50)]
    try:
        deadline = time.monotonic() + 5
        while len(tight.app.http.connections) < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with connect(tight.url) as extra:
            assert status_of(read_until_closed(extra)) == 503
    finally:
        for s in socks:
            s.close()
    time.sleep(0.1)
    assert put(tight.url, "/after", "1") == 201


def test_unread_output_is_dropped_after_the_write_timeout(tight):
    # A value just under the body limit, read back many times without reading answers.
    put(tight.url, "/fat", "x" * 4000)
    with connect(tight.url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b"GET /v2/keys/fat HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            for _ in range(2000):
                sock.sendall(request)
        except OSError:
            pass
        deadline = time.monotonic() + 5
        while tight.app.http.rejected["write_timeout"] == 0:
            assert time.monotonic() < deadline, "slow reader was never dropped"
            time.sleep(0.05)
    assert put(tight.url, "/after", "1") == 201


def test_flood_of_bad_requests_does_not_stop_good_ones(server):
    stop = threading.Event()
    bad_sent = [0]

    def flood() -> None:
        junk = [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                b"PUT /v2/keys/a HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                b"GET /v2/keys/%zz HTTP/1.1\r\n\r\n", b"\x00\xff" * 100]
        while not stop.is_set() and bad_sent[0] < 3000:
            try:
                with connect(server.url, timeout=2) as sock:
                    sock.sendall(junk[bad_sent[0] % len(junk)])
                    sock.recv(1024)
            except OSError:
                pass
            bad_sent[0] += 1

    floods = [threading.Thread(target=flood) for _ in range(4)]
    for t in floods:
        t.start()
    try:
        latencies = []
        for i in range(50):
            started = time.monotonic()
            assert put(server.url, f"/good/{i}", str(i)) == 201
            assert get_value(server.url, f"/good/{i}") == str(i)
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        for t in floods:
            t.join(10)
    assert bad_sent[0] > 100
    assert max(latencies) < 2.0
    assert server.app.http.rejected["malformed"] > 0


def test_refusal_reaches_a_client_still_sending_its_body(tight):
    with connect(tight.url) as sock:
        sock.sendall(b"PUT /v2/keys/big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")

        def keep_sending() -> None:
            try:
                for _ in range(200):
                    sock.sendall(b"v" * 10000)
            except OSError:
                pass

        sender = threading.Thread(target=keep_sending)
        sender.start()
        answer = read_until_closed(sock)
        sender.join(10)
    assert status_of(answer) == 413
