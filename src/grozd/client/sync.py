"""A blocking facade over `Client`, for code that is not async.

The async client runs on a private event loop in a daemon thread; each call is handed to
that loop and the calling thread blocks on the result. Because the caller's thread never
runs that loop, this also works from synchronous code called inside a running event loop
(at the price of blocking that loop for the duration of the call).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import uvloop

from grozd.client.client import DEFAULT_ENDPOINT, Client
from grozd.client.models import Member, Response

T = TypeVar("T")


class SyncClient:
    """Blocking etcd v2 client; same methods and arguments as `Client`."""

    def __init__(
        self,
        endpoints: Sequence[str] | str = (DEFAULT_ENDPOINT,),
        timeout: float = 5.0,
        **options: Any,
    ) -> None:
        self._client = Client(endpoints, timeout, **options)
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grozd-etcd-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def client(self) -> Client:
        """The underlying async client (only usable on this wrapper's loop)."""
        return self._client

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncClient is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncClient called from its own loop thread; use .client instead")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the caller must not leave the request running on the private loop.
            future.cancel()
            raise

    def close(self) -> None:
        """Close the connections and stop the private loop."""
        if self._closed:
            return
        self._run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def endpoints(self) -> list[str]:
        """The endpoint URLs, in configured order."""
        return self._client.endpoints

    def get(
        self, key: str, recursive: bool = False, sorted: bool = False, quorum: bool = False
    ) -> Response:
        """See `Client.get`."""
        return self._run(self._client.get(key, recursive, sorted, quorum))

    def set(
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
        """See `Client.set`."""
        return self._run(
            self._client.set(key, value, ttl, prev_value, prev_index, prev_exist, refresh, dir)
        )

    def create(self, key: str, value: str, ttl: int | None = None) -> Response:
        """See `Client.create`."""
        return self._run(self._client.create(key, value, ttl))

    def update(self, key: str, value: str, ttl: int | None = None) -> Response:
        """See `Client.update`."""
        return self._run(self._client.update(key, value, ttl))

    def mkdir(self, key: str, ttl: int | None = None) -> Response:
        """See `Client.mkdir`."""
        return self._run(self._client.mkdir(key, ttl))

    def append(self, dir: str, value: str, ttl: int | None = None) -> Response:
        """See `Client.append`."""
        return self._run(self._client.append(dir, value, ttl))

    def delete(
        self,
        key: str,
        recursive: bool = False,
        dir: bool = False,
        prev_value: str | None = None,
        prev_index: int | None = None,
    ) -> Response:
        """See `Client.delete`."""
        return self._run(self._client.delete(key, recursive, dir, prev_value, prev_index))

    def compare_and_swap(
        self,
        key: str,
        value: str,
        prev_value: str | None = None,
        prev_index: int | None = None,
        ttl: int | None = None,
    ) -> Response:
        """See `Client.compare_and_swap`."""
        return self._run(self._client.compare_and_swap(key, value, prev_value, prev_index, ttl))

    def compare_and_delete(
        self, key: str, prev_value: str | None = None, prev_index: int | None = None
    ) -> Response:
        """See `Client.compare_and_delete`."""
        return self._run(self._client.compare_and_delete(key, prev_value, prev_index))

    def watch(
        self,
        key: str,
        index: int | None = None,
        recursive: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """See `Client.watch`."""
        return self._run(self._client.watch(key, index, recursive, timeout))

    def watch_iter(
        self,
        key: str,
        index: int | None = None,
        recursive: bool = False,
        *,
        give_up_after: float | None = 30.0,
    ) -> Iterator[Response]:
        """See `Client.watch_iter`; closing this iterator stops the watch."""
        agen = self._client.watch_iter(key, index, recursive, give_up_after=give_up_after)
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                try:
                    self._run(agen.aclose())
                except RuntimeError:
                    # Still unwinding from a cancelled __anext__ (e.g. after Ctrl-C).
                    pass

    def members(self) -> list[Member]:
        """See `Client.members`."""
        return self._run(self._client.members())

    def version(self) -> dict[str, str]:
        """See `Client.version`."""
        return self._run(self._client.version())

    def health(self) -> bool:
        """See `Client.health`."""
        return self._run(self._client.health())

    def leader_stats(self) -> dict[str, Any]:
        """See `Client.leader_stats`."""
        return self._run(self._client.leader_stats())

    def self_stats(self) -> dict[str, Any]:
        """See `Client.self_stats`."""
        return self._run(self._client.self_stats())

    def store_stats(self) -> dict[str, Any]:
        """See `Client.store_stats`."""
        return self._run(self._client.store_stats())


async def _anext(it: AsyncIterator[T]) -> T:
    # run_coroutine_threadsafe needs a coroutine; an async generator's __anext__ is not one.
    return await it.__anext__()
