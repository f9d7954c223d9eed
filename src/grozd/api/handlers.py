"""The etcd v2 HTTP API: routing and one handler per endpoint, answering as etcd 3.4 does.

Status codes, JSON bodies (byte for byte, trailing newlines included), headers
(X-Etcd-Index, X-Raft-Index, X-Raft-Term, X-Etcd-Cluster-Id, CORS) and parameter parsing
follow etcd, including Go's ServeMux redirecting unclean paths with 301.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import urlsplit

from grozd.api.backend import Backend, MemberError
from grozd.api.forms import (
    Form,
    FormError,
    clean_url_path,
    escape_path,
    html_escape,
    parse_bool,
    parse_query,
    parse_uint,
    unescape,
)
from grozd.api.metrics import CONTENT_TYPE, HttpMetrics, gauge, labelled
from grozd.http.config import ApiConfig
from grozd.http.server import HttpServer, Pending, Request, Response, plain
from grozd.store import Event, Store
from grozd.store.commands import CommandError, request_command
from grozd.store.errors import (
    INDEX_NAN,
    INVALID_FIELD,
    INVALID_FORM,
    PREV_VALUE_REQUIRED,
    RAFT_INTERNAL,
    REFRESH_TTL_REQUIRED,
    REFRESH_VALUE,
    TTL_NAN,
    EtcdError,
)
from grozd.store.gojson import go_dumps

log = logging.getLogger("grozd.api")

KEYS_PREFIX = "/v2/keys"
MEMBERS_PREFIX = "/v2/members"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
CORS_HEADERS = [
    ("Access-Control-Allow-Headers", "accept, content-type, authorization"),
    ("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE"),
    ("Access-Control-Allow-Origin", "*"),
]
KEYS_METHODS = ("HEAD", "GET", "PUT", "POST", "DELETE")
FORM_METHODS = ("POST", "PUT", "PATCH")
URL_SCHEMES = ("http", "https", "unix", "unixs")


def method_not_allowed(allowed: str) -> Response:
    response = plain(405, "Method Not Allowed")
    response.headers.insert(0, ("Allow", allowed))
    return response


def json_message(status: int, message: str) -> Response:
    """etcd's {"message": ...} answer for non-keys errors (no trailing newline)."""
    return Response(status, [("Content-Type", JSON)], go_dumps({"message": message}).encode())


def backend_error(exc: BaseException) -> EtcdError:
    """How etcd answers a proposal or read that failed below the store."""
    if isinstance(exc, TimeoutError):
        return EtcdError(RAFT_INTERNAL, "etcdserver: request timed out", 0)
    code = getattr(exc, "etcd_code", RAFT_INTERNAL)
    return EtcdError(code if isinstance(code, int) else RAFT_INTERNAL, str(exc) or repr(exc), 0)


def member_json(member: dict[str, Any]) -> dict[str, Any]:
    """A member as etcd lists it (ID in lowercase hex)."""
    ident = member.get("id", 0)
    return {
        "id": f"{ident:x}" if isinstance(ident, int) else str(ident),
        "name": member.get("name", ""),
        "peerURLs": list(member.get("peerURLs") or []),
        "clientURLs": list(member.get("clientURLs") or []),
    }


def check_urls(urls: Any) -> list[str]:
    """Validate peer URLs like etcd's types.NewURLs; returns them sorted."""
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError("json: cannot unmarshal peerURLs: expected an array of strings")
    if not urls:
        raise ValueError("peerURLs must not be empty")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in URL_SCHEMES:
            raise ValueError(f"URL scheme must be http, https, unix, or unixs: {url}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme in ("http", "https") and (not parts.hostname or port is None):
            raise ValueError(f'URL address does not have the form "host:port": {url}')
        if parts.path not in ("", "/"):
            raise ValueError(f"URL must not contain a path: {url}")
    return sorted(urls)


_VALUE_ONLY = frozenset({"value"})


class KeysRequest:
    """The parsed parameters of a /v2/keys request (etcd's parseKeyRequest)."""

    # What a request that names none of the parameters asks for.
    value = prev_value = ""
    prev_index = wait_index = 0
    recursive = sorted = wait = dir = quorum = stream = no_value = refresh = False
    ttl: int | None = None
    prev_exist: bool | None = None

    def __init__(self, method: str, key: str, form: Form) -> None:
        self.method = method
        self.key = key
        if form.keys() <= _VALUE_ONLY:  # most requests: every default holds
            if form:
                self.value = form["value"][0]
            return

        def first(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        def uint(name: str, code: int, cause: str) -> int:
            text = first(name)
            if text is None:
                return 0
            try:
                return parse_uint(text)
            except ValueError:
                raise EtcdError(code, cause) from None

        def flag(name: str, cause: str | None = None) -> bool:
            text = first(name)
            if text is None:
                return False
            try:
                return parse_bool(text)
            except ValueError:
                raise EtcdError(INVALID_FIELD, cause or f'invalid value for "{name}"') from None

        # Checked in etcd's order: the first failure is the one reported.
        self.prev_index = uint("prevIndex", INDEX_NAN, 'invalid value for "prevIndex"')
        self.wait_index = uint("waitIndex", INDEX_NAN, 'invalid value for "waitIndex"')
        self.recursive = flag("recursive")
        self.sorted = flag("sorted")
        self.wait = flag("wait")
        self.dir = flag("dir")
        self.quorum = flag("quorum")
        self.stream = flag("stream")
        if self.wait and method != "GET":
            raise EtcdError(INVALID_FIELD, '"wait" can only be used with GET requests')
        prev_value = first("prevValue")
        if prev_value == "":
            raise EtcdError(PREV_VALUE_REQUIRED, '"prevValue" cannot be empty')
        self.prev_value = prev_value or ""
        self.no_value = flag("noValueOnSuccess")
        if first("ttl"):
            self.ttl = uint("ttl", TTL_NAN, 'invalid value for "ttl"')
        if "prevExist" in form:
            self.prev_exist = flag("prevExist", "invalid value for prevExist")
        if "refresh" in form:
            self.refresh = flag("refresh", "invalid value for refresh")
            if self.refresh:
                if first("value"):
                    raise EtcdError(REFRESH_VALUE, "A value was provided on a refresh")
                if self.ttl is None:
                    raise EtcdError(REFRESH_TTL_REQUIRED, "No TTL value set")
        self.value = first("value") or ""


class ReadCache:
    """Answers to plain reads, kept while what they depend on (``version``) is unchanged:
    a repeated read of an unchanged key costs a dictionary lookup."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._version: tuple[int, ...] | None = None
        self._answers: dict[tuple[bytes, bytes], Response] = {}

    def get(self, path: bytes, query: bytes, version: tuple[int, ...]) -> Response | None:
        if version != self._version:
            return None
        return self._answers.get((path, query))

    def put(self, path: bytes, query: bytes, version: tuple[int, ...], answer: Response) -> None:
        if version != self._version or len(self._answers) >= self.size:
            self._answers.clear()
            self._version = version
        self._answers[(path, query)] = answer


class Api:
    """The request handler given to `HttpServer`."""

    def __init__(self, store: Store, backend: Backend, config: ApiConfig) -> None:
        self.store = store
        self.backend = backend
        self.config = config
        self.metrics = HttpMetrics()
        self.server: HttpServer | None = None
        self._reads = ReadCache()  # plain (local) reads
        self._quorum_reads = ReadCache()  # quorum reads, used only after their read point
        self._exact = {
            "/v2/stats/store": self.stats_store,
            "/v2/stats/self": self.stats_self,
            "/v2/stats/leader": self.stats_leader,
            "/version": self.version,
            "/health": self.health,
            "/v2/machines": self.machines,
            "/metrics": self.metrics_page,
        }

    def __call__(self, request: Request) -> Response | Pending | Awaitable[Response]:
        if request.method == "GET":
            cached = self._reads.get(request.path, request.query, self._read_version())
            if cached is not None:
                self.store.counters["getsSuccess"] += 1
                self.metrics.observe("GET", cached.status, 0.0)
                return cached
        response = self._route(request)
        if not self.config.cors or isinstance(response, Pending):
            return response  # answered later, with its CORS headers
        if isinstance(response, Response):
            response.headers[:0] = CORS_HEADERS
            return response
        return self._with_cors(response)

    async def _with_cors(self, pending: Awaitable[Response]) -> Response:
        response = await pending
        response.headers[:0] = CORS_HEADERS
        return response

    def _route(self, request: Request) -> Response | Pending | Awaitable[Response]:
        if request.method == "OPTIONS" and self.config.cors:
            # etcd's CORS layer answers every preflight itself.
            return Response(200)
        try:
            path = unescape(request.path, False)
        except FormError:
            return plain(400, "400 Bad Request", close=True)
        cleaned = clean_url_path(path)
        if cleaned != path:
            return self._redirect(request, cleaned)
        if path == KEYS_PREFIX or path.startswith(KEYS_PREFIX + "/"):
            return self.keys(request, path[len(KEYS_PREFIX) :])
        if path == MEMBERS_PREFIX or path.startswith(MEMBERS_PREFIX + "/"):
            return self.members(request, path[len(MEMBERS_PREFIX) :].lstrip("/"))
        simple = self._exact.get(path)
        if simple is not None:
            return simple(request)
        return plain(404, "404 page not found")

    def _redirect(self, request: Request, path: str) -> Response:
        """Go's ServeMux answer to a path with //, . or ..: 301 to the clean one."""
        location = escape_path(path)
        if request.query:
            location += "?" + request.query.decode("latin-1")
        headers = [("Location", location)]
        body = b""
        if request.method in ("GET", "HEAD"):
            headers.insert(0, ("Content-Type", "text/html; charset=utf-8"))
        if request.method == "GET":
            body = f'<a href="{html_escape(location)}">Moved Permanently</a>.\n\n'.encode()
        return Response(301, headers, body)

    # -- /v2/keys ------------------------------------------------------------------------

    def _cluster_header(self) -> tuple[str, str]:
        return ("X-Etcd-Cluster-Id", f"{self.backend.cluster_id:x}")

    def _error(self, error: EtcdError) -> Response:
        return Response(
            error.status,
            [("Content-Type", JSON), self._cluster_header(), ("X-Etcd-Index", str(error.index))],
            error.to_json(),
        )

    def _event(self, event: Event, no_value: bool = False) -> Response:
        return Response(
            201 if event.is_created else 200,
            [
                ("Content-Type", JSON),
                self._cluster_header(),
                ("X-Etcd-Index", str(event.etcd_index)),
                ("X-Raft-Index", str(self.backend.raft_index)),
                ("X-Raft-Term", str(self.backend.raft_term)),
            ],
            event.to_json(no_value),
        )

    def _form(self, request: Request) -> Form:
        """Go's Request.ParseForm: the form body first, then the query string."""
        form: Form = {}
        error: str | None = None
        if request.method in FORM_METHODS:
            ctype = request.headers.get("content-type", "")
            if ctype.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
                form, error = parse_query(request.body, form)
        form, query_error = parse_query(request.query, form)
        error = error or query_error
        if error is not None:
            raise EtcdError(INVALID_FORM, error)
        return form

    def keys(self, request: Request, key: str) -> Response | Pending:
        method = request.method
        if method not in KEYS_METHODS:
            return method_not_allowed(",".join(KEYS_METHODS))
        started = time.perf_counter()
        try:
            params = KeysRequest(method, key or "/", self._form(request))
        except EtcdError as error:
            return self._observed(method, started, self._error(error))
        if method == "GET" and params.wait:
            return self._watch(request, params)
        if method in ("GET", "HEAD") and not (params.quorum and method == "GET"):
            # A local read answers at once (no task): most requests are these.
            try:
                response = self._local_read(params)
            except EtcdError as error:
                return self._observed(method, started, self._error(error))
            if method == "GET":
                self._remember(request, response)
            return self._observed(method, started, response)
        if method == "GET":
            return self._quorum_read(request, started, params)
        try:
            return self._write(started, params)
        except EtcdError as error:
            return self._observed(method, started, self._error(error))

    def _quorum_read(
        self, request: Request, started: float, params: KeysRequest
    ) -> Response | Pending:
        """A linearizable read: answered once the member has applied a read point confirmed
        by a quorum (from the member's callback, like writes)."""
        pending = Pending()

        def answered(_: object, exc: BaseException | None) -> None:
            try:
                if exc is not None:
                    log.debug("event=read_index_failed error=%r", exc)
                    raise exc if isinstance(exc, EtcdError) else backend_error(exc)
                # Kept apart from plain reads: those are answered before any routing, and a
                # quorum read must never skip its read point.
                cache = self._quorum_reads
                kept = cache.get(request.path, request.query, self._read_version())
                if kept is not None:  # unchanged since the same read was last answered
                    self.store.counters["getsSuccess"] += 1
                    pending.answer(self._observed("GET", started, kept))
                    return
                response = self._local_read(params)
                self._remember(request, response, cache)
            except EtcdError as error:
                response = self._error(error)
            pending.answer(self._answered_later("GET", started, response))

        try:
            self.backend.read_submit(answered)
        except Exception as exc:
            log.debug("event=read_index_failed error=%r", exc)
            return self._observed("GET", started, self._error(backend_error(exc)))
        return pending

    def _observed(self, method: str, started: float, response: Response) -> Response:
        self.metrics.observe(method, response.status, time.perf_counter() - started)
        return response

    def _answered_later(self, method: str, started: float, response: Response) -> Response:
        """A fresh answer given through a Pending: what `__call__` adds to one given at once."""
        if self.config.cors:
            response.headers[:0] = CORS_HEADERS
        return self._observed(method, started, response)

    def _local_read(self, params: KeysRequest) -> Response:
        event = self.store.get(
            params.key, params.recursive, params.sorted, now=self.config.clock()
        )
        return self._event(event)

    def _read_version(self) -> tuple[int, int, int]:
        """What a read's answer depends on besides time: the store and the Raft position."""
        return (self.store.index, self.backend.raft_index, self.backend.raft_term)

    def _remember(self, request: Request, response: Response, cache: ReadCache | None = None
                  ) -> None:
        """Keep a read's answer for repeats until the store changes. Answers with a TTL
        count down with time and are never kept."""
        if b'"ttl":' in response.body:
            return
        headers = CORS_HEADERS + response.headers if self.config.cors else response.headers
        kept = Response(response.status, headers, response.body)
        cache = self._reads if cache is None else cache
        cache.put(request.path, request.query, self._read_version(), kept)

    def _write(self, started: float, params: KeysRequest) -> Pending:
        """Propose the write; it is answered from the callback the member calls when it has
        applied it (no task, no loop turn: writes are the hot path)."""
        try:
            command = request_command(
                params.method,
                params.key,
                now=self.config.clock(),
                value=params.value,
                dir=params.dir,
                ttl=params.ttl,
                refresh=params.refresh,
                prev_value=params.prev_value,
                prev_index=params.prev_index,
                prev_exist=params.prev_exist,
                recursive=params.recursive,
            )
        except CommandError:
            # Only a TTL too large to represent gets here.
            raise EtcdError(TTL_NAN, 'invalid value for "ttl"') from None
        pending = Pending()

        def answered(result: object, exc: BaseException | None) -> None:
            if exc is not None:
                log.debug("event=propose_failed error=%r", exc)
                response = self._error(backend_error(exc))
            elif isinstance(result, EtcdError):
                response = self._error(result)
            elif isinstance(result, Event):
                response = self._event(result, params.no_value)
            else:
                response = self._error(EtcdError(
                    RAFT_INTERNAL, "received response with no Event/Watcher!", 0))
            pending.answer(self._answered_later(params.method, started, response))

        try:
            self.backend.submit(command, self.config.request_timeout, answered)
        except Exception as exc:
            log.debug("event=propose_failed error=%r", exc)
            raise backend_error(exc) from None
        return pending

    def _watch(self, request: Request, params: KeysRequest) -> Response:
        conn = request.conn
        limit = self.config.max_watchers_per_connection
        if conn.watchers >= limit:
            return json_message(
                429, f"too many watches on one connection (limit {limit}); open another"
            )
        try:
            watcher = self.store.watch(
                params.key, params.recursive, params.wait_index, stream=params.stream
            )
        except EtcdError as error:
            return self._error(error)
        conn.watchers += 1

        def release() -> None:
            watcher.remove()
            conn.watchers -= 1

        async def chunks() -> AsyncIterator[bytes]:
            if params.stream:
                async for event in watcher:
                    yield event.to_json()
            else:
                event = await watcher
                if event is not None:
                    yield event.to_json()

        headers = [
            ("Content-Type", JSON),
            self._cluster_header(),
            ("X-Etcd-Index", str(watcher.start_index)),
            ("X-Raft-Index", str(self.backend.raft_index)),
            ("X-Raft-Term", str(self.backend.raft_term)),
        ]
        return Response(200, headers, stream=chunks(), on_close=release)

    # -- /v2/members ---------------------------------------------------------------------

    async def members(self, request: Request, sub: str) -> Response:
        method = request.method
        if method not in ("GET", "POST", "DELETE", "PUT"):
            return method_not_allowed("GET,POST,DELETE,PUT")
        response = await self._members(request, method, sub)
        response.headers.append(self._cluster_header())
        return response

    async def _members(self, request: Request, method: str, sub: str) -> Response:
        if method == "GET":
            if sub == "":
                body = {"members": [member_json(m) for m in self.backend.members()]}
                return Response(200, [("Content-Type", JSON)], go_dumps(body).encode() + b"\n")
            if sub == "leader":
                leader = self.backend.leader_id
                ids = (leader, f"{leader:x}")
                found = [m for m in self.backend.members() if m.get("id") in ids]
                if not leader or not found:
                    return json_message(503, "During election")
                body_bytes = go_dumps(member_json(found[0])).encode() + b"\n"
                return Response(200, [("Content-Type", JSON)], body_bytes)
            return json_message(404, "Not found")
        if method == "POST":
            data = self._json_body(request)
            if isinstance(data, Response):
                return data
            try:
                urls = check_urls(data.get("peerURLs", []) if isinstance(data, dict) else None)
            except ValueError as exc:
                return json_message(400, str(exc))
            try:
                member = await self.backend.add_member(urls)
            except Exception as exc:
                return self._member_failure(exc)
            body_bytes = go_dumps(member_json(member)).encode() + b"\n"
            return Response(201, [("Content-Type", JSON)], body_bytes)
        # DELETE and PUT name a member.
        if sub == "":
            return plain(405, "Method Not Allowed")
        try:
            ident = int(sub, 16)
            if ident < 0 or ident >= 2**64 or not sub.isalnum():
                raise ValueError(sub)
        except ValueError:
            return json_message(404, f"No such member: {sub}")
        if method == "DELETE":
            try:
                await self.backend.remove_member(ident)
            except Exception as exc:
                return self._member_failure(exc)
            return Response(204)
        data = self._json_body(request)
        if isinstance(data, Response):
            return data
        try:
            urls = check_urls(data.get("peerURLs", []) if isinstance(data, dict) else None)
        except ValueError as exc:
            return json_message(400, str(exc))
        try:
            await self.backend.update_member(ident, urls)
        except Exception as exc:
            return self._member_failure(exc)
        return Response(204)

    @staticmethod
    def _json_body(request: Request) -> Any:
        ctype = request.headers.get("content-type", "")
        main = ctype.split(";", 1)[0].strip().lower() if ";" in ctype else ctype
        if main != JSON:
            return json_message(415, f"Bad Content-Type {main}, accept application/json")
        try:
            return json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            return json_message(400, str(exc))

    @staticmethod
    def _member_failure(exc: Exception) -> Response:
        if isinstance(exc, MemberError):
            return json_message(exc.status, str(exc))
        log.warning("event=member_change_failed error=%r", exc)
        return json_message(500, "Internal Server Error")

    # -- stats, version, health, machines, metrics ---------------------------------------

    def stats_store(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        return Response(200, [("Content-Type", JSON)], go_dumps(self.store.stats()).encode())

    def stats_self(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        body = go_dumps(self.backend.stats().get("self") or {}).encode()
        return Response(200, [("Content-Type", JSON)], body)

    def stats_leader(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        leader = self.backend.stats().get("leader")
        if leader is None:
            return json_message(403, "not current leader")
        return Response(200, [("Content-Type", JSON)], go_dumps(leader).encode())

    def version(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        body = go_dumps(
            {"etcdserver": self.config.server_version, "etcdcluster": self.config.cluster_version}
        ).encode()
        return Response(200, [("Content-Type", JSON)], body)

    def health(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        if self.backend.leader_id:
            return Response(200, [("Content-Type", TEXT)], b'{"health":"true"}')
        return Response(503, [("Content-Type", TEXT)], b'{"health":"false"}')

    def machines(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed("GET,HEAD")
        urls = [u for m in self.backend.members() for u in m.get("clientURLs") or []]
        return Response(200, [("Content-Type", TEXT)], ", ".join(urls).encode())

    def raft_metrics(self, out: list[str]) -> None:
        """The member's own counters, when the backend keeps them (a Raft member does)."""
        raft = self.backend.stats().get("raft")
        if not raft:
            return
        for name, key, text in (
            ("etcd_server_proposals_total", "proposals", "Proposals made on this member."),
            ("etcd_server_proposals_applied_total", "entries_applied", "Entries applied."),
            ("etcd_server_leader_changes_seen_total", "leader_changes",
             "Leader or role changes seen by this member."),
            ("etcd_disk_wal_fsync_total", "fsyncs", "WAL fdatasync calls (one per batch)."),
            ("etcd_server_snapshots_total", "snapshots", "Snapshots taken."),
        ):
            gauge(out, name, text, raft[key], kind="counter")
        hist = raft.get("fsync_seconds")
        if hist is not None:
            name = "etcd_disk_wal_fsync_duration_seconds"
            out.append(f"# HELP {name} The latency distributions of WAL batch writes with fsync.")
            out.append(f"# TYPE {name} histogram")
            for bound, count in hist.buckets():
                out.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
            out.append(f'{name}_bucket{{le="+Inf"}} {hist.count}')
            out.append(f"{name}_sum {hist.total:.6f}")
            out.append(f"{name}_count {hist.count}")

    def metrics_page(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed("GET,HEAD")
        out: list[str] = []
        backend = self.backend
        leader = backend.leader_id
        gauge(out, "etcd_cluster_version", "Which version is running.", 1,
              {"cluster_version": ".".join(self.config.cluster_version.split(".")[:2])})
        gauge(out, "etcd_server_has_leader", "Whether or not a leader exists. 1 is existence,"
              " 0 is not.", 1 if leader else 0)
        gauge(out, "etcd_server_is_leader", "Whether or not this member is a leader. 1 if is,"
              " 0 otherwise.", 1 if leader and leader == backend.member_id else 0)
        gauge(out, "etcd_server_version", "Which version is running. 1 for 'server_version'"
              " label with current version.", 1, {"server_version": self.config.server_version})
        gauge(out, "grozd_raft_index", "The committed Raft index.", backend.raft_index)
        gauge(out, "grozd_raft_term", "The current Raft term.", backend.raft_term)
        gauge(out, "grozd_store_index", "The store's etcd index.", self.store.index)
        stats = self.store.stats()
        gauge(out, "etcd_debugging_store_watchers", "Count of currently active watchers.",
              stats["watchers"])
        gauge(out, "etcd_debugging_store_expires_total", "Total number of expired keys.",
              stats["expireCount"], kind="counter")
        labelled(out, "etcd_debugging_store_reads_total", "Total number of reads action by"
                 " (get/getRecursive), local to this member.", "action",
                 {"get": stats["getsSuccess"]})
        labelled(out, "etcd_debugging_store_writes_total", "Total number of writes by action,"
                 " successful ones only.", "action",
                 {"set": stats["setsSuccess"], "create": stats["createSuccess"],
                  "update": stats["updateSuccess"], "delete": stats["deleteSuccess"],
                  "compareAndSwap": stats["compareAndSwapSuccess"],
                  "compareAndDelete": stats["compareAndDeleteSuccess"]})
        self.metrics.render(out)
        self.raft_metrics(out)
        if self.server is not None:
            conns = self.server.connections
            gauge(out, "grozd_http_connections", "Open client connections.", len(conns))
            gauge(out, "grozd_http_watches", "Watches held open on client connections.",
                  sum(c.watchers for c in conns))
            labelled(out, "grozd_http_rejected_total", "Requests or connections refused by a"
                     " limit, by reason.", "reason", dict(self.server.rejected))
        return Response(200, [("Content-Type", CONTENT_TYPE)], ("\n".join(out) + "\n").encode())
