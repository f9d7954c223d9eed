"""The asyncio etcd v2 client.

Requests go to the pinned endpoint (the last one that answered). When an endpoint is
unreachable the request moves to the next one if that is safe: a connection that could
not be opened never carried the request, so any request may move; a request that was
sent and then lost its connection (reset, timeout) moves only if it is a read (GET), since
a write may already have been applied. Writes interrupted that way raise `EtcdInterrupted`.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

from grozd.client.errors import (
    EtcdError,
    EtcdInterrupted,
    EtcdUnavailable,
    EventIndexClearedError,
    KeyNotFoundError,
    WatcherClearedError,
    error_from_response,
)
from grozd.client.http import ConnectFailed, HTTPResponse, Origin, Pool, RequestFailed
from grozd.client.models import Member, Response

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
KEYS_PREFIX = "/v2/keys"
FORM_TYPE = "application/x-www-form-urlencoded"
REDIRECT_STATUSES = (307, 308)


def key_path(key: str) -> str:
    """The request path for a key: normalised like etcd's store, then percent-encoded.

    etcd cleans keys itself, but Go's HTTP mux answers ``//`` or ``..`` in a path with a
    301 to the cleaned path, so cleaning here saves a round trip and keeps writes as PUT.
    """
    cleaned = posixpath.normpath(re.sub("/+", "/", "/" + key))
    return KEYS_PREFIX + quote(cleaned, safe="/")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _json(resp: HTTPResponse) -> Any:
    try:
        return json.loads(resp.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EtcdError(f"invalid JSON from etcd: {resp.body[:200]!r}", status=resp.status) from exc


def _keys_response(resp: HTTPResponse) -> Response:
    if resp.status >= 300:
        raise error_from_response(resp.status, resp.body)
    return Response.from_json(_json(resp), resp.headers)


def _plain_json(resp: HTTPResponse) -> Any:
    if resp.status >= 300:
        raise error_from_response(resp.status, resp.body)
    return _json(resp)


def _resume_index(head: tuple[int, dict[str, str]] | None) -> int | None:
    """The waitIndex that continues a watch whose head said X-Etcd-Index: N.

    etcd registers an index-less watch for events after its current index N and reports
    N in the head, so resuming at N+1 loses nothing that happened in between.
    """
    if head is None:
        return None
    try:
        return int(head[1]["x-etcd-index"]) + 1
    except (KeyError, ValueError):
        return None


@dataclass(slots=True)
class _Cursor:
    """Where a watch resumes: the waitIndex of its next request (None: from now)."""

    index: int | None


class Client:
    """An asyncio client for etcd's v2 HTTP API.

    One instance belongs to one event loop (its pooled connections do). ``timeout`` bounds
    each attempt on one endpoint: connecting, sending and reading the answer (so a request
    may take up to ``timeout`` per endpoint); a watch is only bounded until etcd
    acknowledges it, then waits as long as it takes. ``max_idle`` keep-alive connections
    are kept per endpoint; at most ``max_redirects`` 307/308 hops are followed.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str = (DEFAULT_ENDPOINT,),
        timeout: float = 5.0,
        *,
        max_idle: int = 4,
        max_redirects: int = 10,
    ) -> None:
        if isinstance(endpoints, str):
            # Same form as ETCDCTL_ENDPOINT: a comma-separated list.
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        origins: list[Origin] = []
        for url in endpoints:
            origin = Origin.parse(url.strip())
            if origin not in origins:
                origins.append(origin)
        if not origins:
            raise ValueError("at least one endpoint is required")
        self._origins = origins
        self.timeout = timeout
        self.max_idle = max_idle
        self.max_redirects = max_redirects
        self._pools: dict[Origin, Pool] = {}
        self._pinned = 0
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        """The endpoint URLs, in configured order."""
        return [o.url for o in self._origins]

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close pooled connections; the client cannot be used afterwards."""
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        # Let the transports run their close callbacks before the loop may go away.
        await asyncio.sleep(0)

    # -- transport -------------------------------------------------------------------------

    def _pool(self, origin: Origin) -> Pool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = Pool(origin, max_idle=self.max_idle)
        return pool

    async def _exchange(
        self,
        origin: Origin,
        method: str,
        target: str,
        body: bytes | None,
        safe: bool,
        head_deadline: float | None,
        body_deadline: float | None,
    ) -> HTTPResponse:
        pool = self._pool(origin)
        conn = pool.take_idle()
        if conn is None:
            conn = await pool.connect(head_deadline)
        ctype = FORM_TYPE if body is not None else None
        host = origin.netloc
        try:
            return await conn.request(
                method, target, host, body, ctype, head_deadline, body_deadline
            )
        except RequestFailed as exc:
            # A pooled connection the server closed while idle fails before any answer.
            # Reads may simply go again on a fresh connection; writes may not, since an
            # early failure cannot be told apart from a server that died mid-request.
            if not (safe and conn.uses > 1 and not exc.received):
                raise
        finally:
            pool.release(conn)
        fresh = await pool.connect(head_deadline)
        try:
            return await fresh.request(
                method, target, host, body, ctype, head_deadline, body_deadline
            )
        finally:
            pool.release(fresh)

    async def _attempt(
        self,
        origin: Origin,
        method: str,
        target: str,
        body: bytes | None,
        safe: bool,
        watch: bool,
    ) -> HTTPResponse:
        """One endpoint: send, following 307/308 redirects as etcd's own clients do."""
        head_deadline = asyncio.get_running_loop().time() + self.timeout
        body_deadline = None if watch else head_deadline
        for _ in range(self.max_redirects + 1):
            resp = await self._exchange(
                origin, method, target, body, safe, head_deadline, body_deadline
            )
            location = resp.headers.get("location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            # 307/308 keep the method and body, so a redirected write is resent as is.
            url = urlsplit(urljoin(origin.url + target, location))
            try:
                origin = Origin.parse(f"{url.scheme}://{url.netloc}")
            except ValueError as exc:
                raise EtcdError(f"cannot follow redirect to {location!r}: {exc}") from exc
            target = url.path + (f"?{url.query}" if url.query else "")
        raise EtcdError(f"more than {self.max_redirects} redirects for {method} {target}")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        watch: bool = False,
    ) -> HTTPResponse:
        """Send to the pinned endpoint, failing over to the others when that is safe.

        With ``watch=True`` a connection that drops after etcd acknowledged the watch
        raises `RequestFailed` (with its head) so the caller can resume at the right index.
        """
        if self._closed:
            raise RuntimeError("Client is closed")
        target = path + (f"?{urlencode(query)}" if query else "")
        body = urlencode(form).encode() if form is not None else None
        safe = method == "GET"
        errors: list[tuple[str, BaseException]] = []
        server_error: HTTPResponse | None = None
        count = len(self._origins)
        for i in range(count):
            index = (self._pinned + i) % count
            origin = self._origins[index]
            try:
                resp = await self._attempt(origin, method, target, body, safe, watch)
            except ConnectFailed as exc:
                errors.append((origin.url, exc))
                continue
            except RequestFailed as exc:
                if watch and exc.head is not None:
                    raise
                if not safe:
                    raise EtcdInterrupted(
                        f"{method} {path} was interrupted and may or may not have been applied",
                        [(origin.url, exc)],
                    ) from exc
                errors.append((origin.url, exc))
                continue
            if resp.status >= 500 and safe:
                # A member without a leader answers 5xx; another member may do better.
                server_error = resp
                errors.append((origin.url, error_from_response(resp.status, resp.body)))
                continue
            self._pinned = index
            return resp
        if server_error is not None:
            return server_error
        raise EtcdUnavailable(f"no etcd endpoint answered {method} {path}", errors)

    # -- keys API --------------------------------------------------------------------------

    async def get(
        self, key: str, recursive: bool = False, sorted: bool = False, quorum: bool = False
    ) -> Response:
        """Read a key or directory (``recursive`` for the whole subtree)."""
        query = {}
        if recursive:
            query["recursive"] = "true"
        if sorted:
            query["sorted"] = "true"
        if quorum:
            query["quorum"] = "true"
        return _keys_response(await self._request("GET", key_path(key), query=query))

    async def set(
        self,
        key: str,
        value: str | None = None,
        ttl: int | None = None,
        prev_value: str | None = None,
        prev_index: int | None = None,
        prev_exist: bool | None = None,
        refresh: bool = False,
        dir: bool = False,
    ) -> Response:
        """PUT a key (or a directory with ``dir=True``), optionally conditional.

        ``ttl=None`` makes the key permanent. ``refresh=True`` only resets the TTL of an
        existing key and must not carry a value.
        """
        form: dict[str, str] = {}
        if dir or refresh:
            if value is not None:
                what = "a directory" if dir else "a refresh"
                raise ValueError(f"{what} takes no value")
        elif value is None:
            raise ValueError("value is required (use dir=True for a directory)")
        else:
            form["value"] = value
        if dir:
            form["dir"] = "true"
        if refresh:
            form["refresh"] = "true"
        if ttl is not None:
            form["ttl"] = str(ttl)
        if prev_value is not None:
            form["prevValue"] = prev_value
        if prev_index is not None:
            form["prevIndex"] = str(prev_index)
        if prev_exist is not None:
            form["prevExist"] = _flag(prev_exist)
        return _keys_response(await self._request("PUT", key_path(key), form=form))

    async def create(self, key: str, value: str, ttl: int | None = None) -> Response:
        """Set a key that must not exist yet (raises `NodeExistError` otherwise)."""
        return await self.set(key, value, ttl=ttl, prev_exist=False)

    async def update(self, key: str, value: str, ttl: int | None = None) -> Response:
        """Set a key that must already exist (raises `KeyNotFoundError` otherwise)."""
        return await self.set(key, value, ttl=ttl, prev_exist=True)

    async def mkdir(self, key: str, ttl: int | None = None) -> Response:
        """Create a directory that must not exist yet."""
        return await self.set(key, ttl=ttl, dir=True, prev_exist=False)

    async def append(self, dir: str, value: str, ttl: int | None = None) -> Response:
        """POST an in-order key into ``dir``; etcd names it after the new index."""
        form = {"value": value}
        if ttl is not None:
            form["ttl"] = str(ttl)
        return _keys_response(await self._request("POST", key_path(dir), form=form))

    async def delete(
        self,
        key: str,
        recursive: bool = False,
        dir: bool = False,
        prev_value: str | None = None,
        prev_index: int | None = None,
    ) -> Response:
        """Delete a key, an empty directory (``dir=True``) or a subtree (``recursive``)."""
        query: dict[str, str] = {}
        if recursive:
            query["recursive"] = "true"
        if dir:
            query["dir"] = "true"
        if prev_value is not None:
            query["prevValue"] = prev_value
        if prev_index is not None:
            query["prevIndex"] = str(prev_index)
        # Go only parses a request body for POST/PUT/PATCH: DELETE options go in the query.
        return _keys_response(await self._request("DELETE", key_path(key), query=query))

    async def compare_and_swap(
        self,
        key: str,
        value: str,
        prev_value: str | None = None,
        prev_index: int | None = None,
        ttl: int | None = None,
    ) -> Response:
        """Set only if the current value and/or modifiedIndex match (else `TestFailedError`)."""
        if prev_value is None and prev_index is None:
            raise ValueError("compare_and_swap needs prev_value and/or prev_index")
        return await self.set(key, value, ttl=ttl, prev_value=prev_value, prev_index=prev_index)

    async def compare_and_delete(
        self, key: str, prev_value: str | None = None, prev_index: int | None = None
    ) -> Response:
        """Delete only if the current value and/or modifiedIndex match."""
        if prev_value is None and prev_index is None:
            raise ValueError("compare_and_delete needs prev_value and/or prev_index")
        return await self.delete(key, prev_value=prev_value, prev_index=prev_index)

    # -- watches ---------------------------------------------------------------------------

    async def watch(
        self,
        key: str,
        index: int | None = None,
        recursive: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Wait for the next change of ``key`` (from ``index`` when given) and return it.

        A connection that drops while waiting is re-established, on another endpoint if
        need be, without losing events. ``timeout`` (None: forever) raises `TimeoutError`.
        """
        async with asyncio.timeout(timeout):
            return await self._watch(key, _Cursor(index), recursive)

    async def _watch(self, key: str, cursor: _Cursor, recursive: bool) -> Response:
        path = key_path(key)
        drops = 0
        while True:
            query = {"wait": "true"}
            if cursor.index is not None:
                query["waitIndex"] = str(cursor.index)
            if recursive:
                query["recursive"] = "true"
            try:
                resp = await self._request("GET", path, query=query, watch=True)
            except RequestFailed as exc:
                head = exc.head
            else:
                if resp.status >= 300 or resp.body.strip():
                    return _keys_response(resp)
                # etcd ends a watch with an empty body when the watcher falls behind.
                head = (resp.status, resp.headers)
            if cursor.index is None:
                # Kept in the cursor so that a caller retrying after EtcdUnavailable
                # (watch_iter) also resumes from here.
                cursor.index = _resume_index(head)
            drops += 1
            if drops > 1:
                # Back off only when drops repeat, so a one-off reconnect is immediate.
                await asyncio.sleep(min(0.05 * 2 ** (drops - 2), 1.0))

    async def watch_iter(
        self,
        key: str,
        index: int | None = None,
        recursive: bool = False,
        *,
        give_up_after: float | None = 30.0,
    ) -> AsyncIterator[Response]:
        """Watch forever, yielding each event in order.

        Each watch resumes at the previous event's modifiedIndex + 1. When etcd has
        already discarded that index (error 401, more than 1000 events behind) the key is
        re-read and that "get" response is yielded, so the caller sees the current state
        in place of the lost events, and watching resumes after it. While no endpoint
        answers the iterator retries with backoff, raising `EtcdUnavailable` after
        ``give_up_after`` seconds (None: never).
        """
        loop = asyncio.get_running_loop()
        cursor = _Cursor(index)
        down_since: float | None = None
        failures = 0
        while True:
            try:
                try:
                    item = await self._watch(key, cursor, recursive)
                    if item.node is not None:
                        cursor.index = item.node.modified_index + 1
                except EventIndexClearedError:
                    item = await self._resync(key, recursive)
                    cursor.index = (item.etcd_index or 0) + 1
            except WatcherClearedError:
                continue
            except EtcdUnavailable:
                now = loop.time()
                if down_since is None:
                    down_since = now
                if give_up_after is not None and now - down_since >= give_up_after:
                    raise
                failures += 1
                await asyncio.sleep(min(0.1 * 2 ** (failures - 1), 2.0))
                continue
            down_since, failures = None, 0
            yield item

    async def _resync(self, key: str, recursive: bool) -> Response:
        try:
            resp = await self.get(key, recursive=recursive)
        except KeyNotFoundError as exc:
            return Response(action="get", node=None, etcd_index=exc.index)
        if resp.etcd_index is None:
            raise EtcdError("etcd answered a get without X-Etcd-Index; cannot resume watch")
        return resp

    # -- cluster ---------------------------------------------------------------------------

    async def members(self) -> list[Member]:
        """The cluster members (``/v2/members``)."""
        data = _plain_json(await self._request("GET", "/v2/members"))
        return [Member.from_json(m) for m in data.get("members") or ()]

    async def version(self) -> dict[str, str]:
        """Server and cluster versions, e.g. ``{"etcdserver": "3.4.23", "etcdcluster": ...}``."""
        return _plain_json(await self._request("GET", "/version"))

    async def health(self) -> bool:
        """True when the answering member reports itself healthy."""
        resp = await self._request("GET", "/health")
        try:
            data = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError):
            return False
        return resp.status == 200 and isinstance(data, dict) and data.get("health") == "true"

    async def leader_stats(self) -> dict[str, Any]:
        """Leader statistics; only the leader answers, others raise `EtcdError` (403)."""
        return _plain_json(await self._request("GET", "/v2/stats/leader"))

    async def self_stats(self) -> dict[str, Any]:
        """Statistics of the answering member."""
        return _plain_json(await self._request("GET", "/v2/stats/self"))

    async def store_stats(self) -> dict[str, Any]:
        """Operation counters of the answering member's v2 store."""
        return _plain_json(await self._request("GET", "/v2/stats/store"))
