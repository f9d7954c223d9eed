"""Run one scenario (a list of HTTP steps) against a server and normalise the answers.

The same scenario runs against real etcd and against grozd; the normalised results must be
equal. Normalising makes indices relative to the scenario's starting index (etcd has
internal writes of its own), replaces expiration timestamps once they are checked to be
sane, and records JSON key order (Go's struct order) as well as values.
"""

from __future__ import annotations

import calendar
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

TIMEOUT = 10.0
COMPARED_HEADERS = (
    "content-type",
    "allow",
    "location",
    "x-content-type-options",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "transfer-encoding",
)
PRESENT_HEADERS = ("x-raft-index", "x-raft-term", "x-etcd-cluster-id")
EXPIRATION = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
IN_ORDER = re.compile(r"(?<=/)\d{20}(?=/|$|\")")
NUMBER = re.compile(r"\d+")
RAW_INDEX = re.compile(r'("(?:modifiedIndex|createdIndex|index)":)(\d+)')
RAW_EXPIRATION = re.compile(r'"expiration":"[^"]*"')
RAW_CAUSE = re.compile(r'"cause":"(?:[^"\\]|\\.)*"')
PLACEHOLDER = re.compile(r"\{(\w+)([+-]\d+)?\}")


# -- steps ---------------------------------------------------------------------------------


@dataclass
class Step:
    """One request. ``path`` and params may hold placeholders: ``{p}`` (the scenario's key
    prefix), ``{i+N}`` (starting index + N) and ``{name+N}`` (a saved index + N)."""

    method: str
    path: str
    params: dict[str, str] | None = None  # form body for PUT/POST, query otherwise
    query: str | None = None  # raw query string (appended)
    body: str | None = None  # raw body
    ctype: str | None = "application/x-www-form-urlencoded"
    save: str | None = None  # remember node.modifiedIndex under this name
    kind: str = "request"  # request | watch | stream | collect | race | noise | wait_watchers
    name: str = ""  # watch/stream handle
    count: int = 0  # stream: events to read; race: parallel requests; noise: writes
    sorted: bool = False  # keep node order (the request asked for sorted=true)
    shape: bool = False  # compare only the JSON structure (member IDs, URLs, times differ)
    extra: dict[str, Any] = field(default_factory=dict)


def _key_path(prefix: str, key: str) -> str:
    if key.startswith("/v2/") or key.startswith("/version") or key in ("/health", "/metrics"):
        return key
    return "/v2/keys" + prefix + ("/" + key if key and not key.startswith("/") else key)


def put(key: str, save: str | None = None, **params: str) -> Step:
    return Step("PUT", key, dict(params), save=save)


def post(key: str, save: str | None = None, **params: str) -> Step:
    return Step("POST", key, dict(params), save=save)


def get(key: str, **params: str) -> Step:
    return Step("GET", key, dict(params), sorted=params.get("sorted") == "true")


def head(key: str, **params: str) -> Step:
    return Step("HEAD", key, dict(params))


def delete(key: str, save: str | None = None, **params: str) -> Step:
    return Step("DELETE", key, dict(params), save=save)


def raw(method: str, key: str, query: str | None = None, body: str | None = None,
        ctype: str | None = "application/x-www-form-urlencoded") -> Step:
    return Step(method, key, None, query=query, body=body, ctype=ctype)


def watch(name: str, key: str, **params: str) -> Step:
    """Start a long-poll watch in the background (``wait=true`` is added)."""
    return Step("GET", key, {"wait": "true", **params}, kind="watch", name=name)


def stream(name: str, key: str, count: int, **params: str) -> Step:
    """Start a streaming watch that reads ``count`` events."""
    return Step("GET", key, {"wait": "true", "stream": "true", **params}, kind="stream",
                name=name, count=count)


def collect(name: str) -> Step:
    """Wait for a background watch and record what it got."""
    return Step("", "", kind="collect", name=name)


def race(count: int, method: str, key: str, **params: str) -> Step:
    """``count`` identical requests at once; records the sorted outcomes."""
    return Step(method, key, dict(params), kind="race", count=count)


def noise(count: int, key: str = "noise") -> Step:
    """``count`` quick writes (to push old events out of the history)."""
    return Step("PUT", key, None, kind="noise", count=count)


def wait_watchers(count: int) -> Step:
    """Until the server reports at least ``count`` more watchers than at the start."""
    return Step("", "", kind="wait_watchers", count=count)


@dataclass
class Scenario:
    name: str
    steps: list[Step]


# -- HTTP ----------------------------------------------------------------------------------


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)


def request(url: str, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    conn = _connect(url)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def current_index(url: str) -> int:
    """The server's X-Etcd-Index right now (from a read of a key that never exists)."""
    _, headers, _ = request(url, "GET", "/v2/keys/__compat_probe__/none")
    return int(headers["x-etcd-index"])


def watcher_count(url: str) -> int:
    _, _, body = request(url, "GET", "/v2/stats/store")
    return json.loads(body)["watchers"]


# -- normalising ---------------------------------------------------------------------------


class Normaliser:
    """Makes one server's answers comparable with another's."""

    def __init__(self, base: int) -> None:
        self.base = base

    def index(self, n: int) -> int | str:
        return f"i+{n - self.base}" if self.base <= n < self.base + 1_000_000 else n

    def text(self, s: str) -> str:
        return IN_ORDER.sub(lambda m: f"<seq {self.index(int(m.group()))}>", s)

    def node(self, obj: Any, keep_order: bool) -> Any:
        if isinstance(obj, dict):
            out = []
            for k, v in obj.items():
                if k in ("modifiedIndex", "createdIndex", "index") and isinstance(v, int):
                    v = self.index(v)
                elif k == "key" and isinstance(v, str):
                    v = self.text(v)
                elif k == "expiration" and isinstance(v, str):
                    assert EXPIRATION.match(v), f"bad expiration format {v!r}"
                    when = calendar.timegm(time.strptime(v[:19], "%Y-%m-%dT%H:%M:%S"))
                    assert abs(when - time.time()) < 7200, v
                    v = "<expiration>"
                elif k == "cause" and isinstance(v, str):
                    v = NUMBER.sub(lambda m: str(self.index(int(m.group()))), self.text(v))
                elif k == "nodes" and isinstance(v, list):
                    v = [self.node(n, keep_order) for n in v]
                    if not keep_order:
                        v.sort(key=repr)
                    out.append([k, v])
                    continue
                out.append([k, self.node(v, keep_order)])
            return out
        if isinstance(obj, list):
            return [self.node(x, keep_order) for x in obj]
        return obj

    def raw_bytes(self, body: bytes) -> str:
        text = body.decode("utf-8", "replace")
        text = RAW_INDEX.sub(lambda m: f"{m.group(1)}{self.index(int(m.group(2)))}", text)
        text = RAW_EXPIRATION.sub('"expiration":"<expiration>"', text)
        text = RAW_CAUSE.sub(lambda m: NUMBER.sub(
            lambda n: str(self.index(int(n.group()))), m.group()), text)
        return self.text(text)

    def response(self, status: int, headers: dict[str, str], body: bytes,
                 keep_order: bool = False, shape: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"status": status}
        for name in COMPARED_HEADERS:
            if name in headers:
                out[name] = headers[name]
        for name in PRESENT_HEADERS:
            out[name + "?"] = name in headers
        if "x-etcd-index" in headers:
            out["x-etcd-index"] = self.index(int(headers["x-etcd-index"]))
        if headers.get("content-type", "").startswith("application/json") and body.strip():
            out["json"] = [self.node(json.loads(line), keep_order)
                           for line in body.splitlines() if line.strip()]
            out["newline"] = body.endswith(b"\n")
            if keep_order or b'"nodes"' not in body:
                # Byte for byte too (Go's escaping, field order), indices made relative.
                out["bytes"] = self.raw_bytes(body)
        else:
            out["body"] = body.decode("utf-8", "replace")
        if shape:
            out.pop("body", None)
            out.pop("bytes", None)
            if "json" in out:
                out["json"] = _shape(out["json"])
        return out


def _shape(obj: Any) -> Any:
    """Only the structure: key names and value types."""
    if isinstance(obj, list):
        if obj and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                       for x in obj):
            return [[k, _shape(v)] for k, v in obj]
        return [_shape(x) for x in obj[:1]]
    return type(obj).__name__


# -- running -------------------------------------------------------------------------------


class Runner:
    """Runs a scenario against one server and returns the normalised results."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.base = current_index(url)
        self.norm = Normaliser(self.base)
        self.saved: dict[str, int] = {}
        self.threads: dict[str, tuple[threading.Thread, dict[str, Any]]] = {}
        self.watchers_at_start = watcher_count(url)

    def fill(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name, offset = m.group(1), int(m.group(2) or 0)
            if name == "p":
                return self.prefix
            if name == "i":
                return str(self.base + offset)
            return str(self.saved[name] + offset)

        return PLACEHOLDER.sub(sub, text)

    def target(self, step: Step, with_params: bool) -> str:
        path = quote(self.fill(_key_path("{p}", step.path)), safe="/%:@&=+$,;~")
        parts = []
        if with_params and step.params:
            parts.append(urlencode({k: self.fill(v) for k, v in step.params.items()}))
        if step.query is not None:
            parts.append(self.fill(step.query))
        return path + ("?" + "&".join(parts) if parts else "")

    def send(self, step: Step) -> tuple[int, dict[str, str], bytes]:
        in_body = step.method in ("PUT", "POST") and step.params is not None
        target = self.target(step, with_params=not in_body)
        body = None
        headers: dict[str, str] = {}
        if in_body:
            body = urlencode({k: self.fill(v) for k, v in (step.params or {}).items()}).encode()
        if step.body is not None:
            body = self.fill(step.body).encode()
        if body is not None and step.ctype:
            headers["Content-Type"] = step.ctype
        return request(self.url, step.method, target, body, headers)

    def run(self, steps: list[Step]) -> list[Any]:
        results: list[Any] = []
        for number, step in enumerate(steps):
            handler: Callable[[Step], Any] = getattr(self, "_" + step.kind)
            outcome = handler(step)
            if outcome is not None:
                results.append((number, step.kind, step.method, step.path, outcome))
        for thread, _ in self.threads.values():
            thread.join(TIMEOUT)
        return results

    def _request(self, step: Step) -> Any:
        status, headers, body = self.send(step)
        # A loaded machine can make etcd answer a read or a membership call with a
        # transient 5xx (it has its own timeouts); such steps are safe to ask again.
        retryable = step.method in ("GET", "HEAD") or step.path.startswith("/v2/members")
        for _ in range(2):
            if status < 500 or not retryable:
                break
            time.sleep(0.5)
            status, headers, body = self.send(step)
        if step.save:
            data = json.loads(body)
            self.saved[step.save] = data["node"]["modifiedIndex"]
        return self.norm.response(status, headers, body, keep_order=step.sorted,
                                  shape=step.shape)

    def _watch(self, step: Step) -> None:
        box: dict[str, Any] = {}
        target = self.target(step, with_params=True)

        def work() -> None:
            try:
                box["result"] = request(self.url, "GET", target)
            except Exception as exc:  # reported by collect
                box["error"] = repr(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self.threads[step.name] = (thread, box)

    def _stream(self, step: Step) -> None:
        box: dict[str, Any] = {}
        target = self.target(step, with_params=True)
        parts = urlsplit(self.url)

        def work() -> None:
            try:
                box["result"] = read_stream(parts.hostname or "", parts.port or 80, target,
                                            step.count)
            except Exception as exc:
                box["error"] = repr(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self.threads[step.name] = (thread, box)

    def _collect(self, step: Step) -> Any:
        thread, box = self.threads.pop(step.name)
        thread.join(TIMEOUT)
        if "error" in box or "result" not in box:
            return {"error": box.get("error", "timed out")}
        status, headers, body = box["result"]
        return self.norm.response(status, headers, body)

    def _wait_watchers(self, step: Step) -> None:
        deadline = time.monotonic() + TIMEOUT
        while watcher_count(self.url) < self.watchers_at_start + step.count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}: watches never registered")
            time.sleep(0.005)

    def _race(self, step: Step) -> Any:
        outcomes: list[Any] = []
        lock = threading.Lock()
        start = threading.Barrier(step.count)

        def work() -> None:
            start.wait()
            status, _, body = self.send(step)
            data = json.loads(body)
            with lock:
                outcomes.append((status, data.get("action"), data.get("errorCode")))

        threads = [threading.Thread(target=work) for _ in range(step.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        return sorted(outcomes, key=repr)

    def _noise(self, step: Step) -> None:
        conn = _connect(self.url)
        path = self.fill(_key_path("{p}", step.path))
        try:
            for i in range(step.count):
                conn.request("PUT", f"{path}/{i % 10}", body=b"value=x",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status in (200, 201), resp.status
        finally:
            conn.close()


def read_stream(host: str, port: int, target: str, count: int,
                timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read a streaming watch until ``count`` events (lines) arrived or ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:  # an error, not a stream
            length = int(headers["content-length"])
            while len(rest) < length:
                rest += sock.recv(65536)
            return status, headers, rest[:length]
        body = b""
        while True:
            body, rest = _dechunk(rest, body)
            if body.count(b"\n") >= count or time.monotonic() > deadline:
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            if not more:
                break
            rest += more
        # Exactly the first ``count`` events: more may already be in the last read.
        return status, headers, b"".join(body.splitlines(keepends=True)[:count])


def _dechunk(buffer: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Move complete chunks from ``buffer`` to ``body``."""
    while True:
        line, sep, tail = buffer.partition(b"\r\n")
        if not sep:
            return body, buffer
        size = int(line, 16)
        if size == 0 or len(tail) < size + 2:
            return body, buffer
        body += tail[:size]
        buffer = tail[size + 2 :]
