"""Watchers and the event history (the last 1000 events), as in etcd's v2 store.

Watchers are indexed by the exact path they watch; an event walks only the ancestors of
its key (and, for a deleted directory, the paths removed under it), so idle watchers cost
one small object each and no CPU. A watcher is awaited from asyncio: nothing polls.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Generator
from typing import Any

from grozd.store.errors import EVENT_INDEX_CLEARED, EtcdError
from grozd.store.event import DELETE, EXPIRE, Event
from grozd.store.gojson import clean_path

DEFAULT_HISTORY = 1000
# etcd gives each watcher a 100-event buffer; one that falls further behind is dropped.
DEFAULT_QUEUE = 100


def is_hidden(watch_path: str, key_path: str) -> bool:
    """True when ``key_path`` is hidden from a watcher on ``watch_path`` (a ``_`` name below)."""
    # When a directory is deleted, watchers below it are told too; they are deeper.
    if len(watch_path) > len(key_path):
        return False
    after = clean_path("/" + key_path[len(watch_path) :])
    return "/_" in after


class EventHistory:
    """The most recent events, for watches that start at an index in the past."""

    __slots__ = ("events", "start_index", "last_index")

    def __init__(self, capacity: int = DEFAULT_HISTORY) -> None:
        self.events: deque[Event] = deque(maxlen=capacity)
        self.start_index = 0
        self.last_index = 0

    def add(self, event: Event) -> None:
        """Remember an event (the oldest is forgotten once full)."""
        self.events.append(event)
        self.last_index = event.index
        self.start_index = self.events[0].index

    def scan(self, key: str, recursive: bool, index: int) -> list[Event]:
        """Remembered events at or after ``index`` that a watcher on ``key`` would see.

        Raises `EtcdError` 401 (index 0; the caller fills in the store index) when
        ``index`` is older than the history.
        """
        if index < self.start_index:
            raise EtcdError(
                EVENT_INDEX_CLEARED,
                f"the requested history has been cleared [{self.start_index}/{index}]",
            )
        if index > self.last_index or not self.events:
            return []
        prefix = key if key.endswith("/") else key + "/"
        found: list[Event] = []
        # Indices are contiguous: every index the store hands out is exactly one event.
        for event in itertools.islice(self.events, index - self.start_index, None):
            if event.refresh:
                continue
            event_key = event.key
            ok = event_key == key or (recursive and event_key.startswith(prefix))
            # Deleting or expiring a directory reaches watchers on keys under it. etcd
            # compares without a trailing slash, so /ab hears of /a; kept for fidelity.
            if not ok and event.action in (DELETE, EXPIRE):
                prev = event.prev_node
                if prev is not None and prev.get("dir") and key.startswith(prev.get("key", "/")):
                    ok = True
            if ok:
                found.append(event)
        return found

    def to_wire(self) -> list[Any]:
        """Compact form for snapshots."""
        return [e.to_wire() for e in self.events]

    def load(self, wire: list[Any]) -> None:
        """Replace the contents with a `to_wire` result."""
        self.events.clear()
        self.start_index = self.last_index = 0
        for item in wire:
            self.add(Event.from_wire(item))


class Watcher:
    """One watch: await it (or `next`) for the next event; None means it was closed.

    ``start_index`` is the store index when the watch began (etcd's X-Etcd-Index for a
    watch). A long-poll watcher (``stream=False``) delivers one event; a streaming one
    keeps going until `remove` is called or it falls ``queue_size`` events behind, when
    the pending events are still delivered and then None.
    """

    __slots__ = (
        "key",
        "recursive",
        "stream",
        "since_index",
        "start_index",
        "_hub",
        "_pending",
        "_waiter",
        "_closed",
        "_registered",
        "_queue_size",
    )

    def __init__(
        self,
        hub: WatcherHub | None,
        key: str,
        recursive: bool,
        stream: bool,
        since_index: int,
        start_index: int,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        self.key = key
        self.recursive = recursive
        self.stream = stream
        self.since_index = since_index
        self.start_index = start_index
        self._hub = hub
        # A list, not a deque: an empty deque costs ~600 bytes, and most watchers hold
        # nothing or one event.
        self._pending: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._registered = False
        self._queue_size = queue_size

    @property
    def closed(self) -> bool:
        """True once no further events will arrive (pending ones may remain)."""
        return self._closed

    @property
    def pending(self) -> int:
        """Events received and not yet taken."""
        return len(self._pending)

    def _deliver(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._pending) >= self._queue_size:
            # The reader fell behind: drop the watch rather than buffer without bound.
            self._close()
            return
        self._pending.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self) -> None:
        if self._registered and self._hub is not None:
            self._hub._unregister(self)
        self._closed = True
        self._wake()

    def _finish(self) -> None:
        """A long-poll watcher got its event: it leaves the hub, the event stays pending."""
        if self._registered and self._hub is not None:
            self._hub._unregister(self)
        self._closed = True

    def remove(self) -> None:
        """Stop watching (idempotent); a pending `next` returns what is queued, then None."""
        self._close()

    def take(self) -> Event | None:
        """The next queued event without waiting, or None."""
        return self._pending.pop(0) if self._pending else None

    async def next(self) -> Event | None:
        """The next event, waiting as long as it takes; None once the watch is closed."""
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._closed:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def __await__(self) -> Generator[Any, None, Event | None]:
        return self.next().__await__()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next()
            if event is None:
                return
            yield event

    def __repr__(self) -> str:
        return (
            f"Watcher(key={self.key!r}, recursive={self.recursive}, stream={self.stream}, "
            f"since={self.since_index}, closed={self._closed})"
        )


class WatcherHub:
    """All live watchers, indexed by watched path, plus the event history."""

    def __init__(self, history_size: int = DEFAULT_HISTORY, queue_size: int = DEFAULT_QUEUE):
        self.history = EventHistory(history_size)
        self.queue_size = queue_size
        self._by_path: dict[str, dict[Watcher, None]] = {}
        self.count = 0

    def watch(
        self, key: str, recursive: bool, stream: bool, since_index: int, store_index: int
    ) -> Watcher:
        """Start a watch on ``key`` for events from ``since_index`` on.

        Events still in the history are delivered at once: a long-poll watch gets the
        first and is done; a streaming one gets them all and then stays registered.
        """
        try:
            found = self.history.scan(key, recursive, since_index)
        except EtcdError as exc:
            exc.index = store_index
            raise
        watcher = Watcher(
            self, key, recursive, stream, since_index, store_index, self.queue_size
        )
        if found:
            if not stream:
                watcher._pending.append(found[0])
                watcher._closed = True
                return watcher
            for event in found[: self.queue_size]:
                watcher._pending.append(event)
            if len(found) > self.queue_size:
                watcher._closed = True
                return watcher
            watcher.since_index = store_index + 1
        self._register(watcher)
        return watcher

    def _register(self, watcher: Watcher) -> None:
        self._by_path.setdefault(watcher.key, {})[watcher] = None
        watcher._registered = True
        self.count += 1

    def _unregister(self, watcher: Watcher) -> None:
        if not watcher._registered:
            return
        watcher._registered = False
        self.count -= 1
        group = self._by_path.get(watcher.key)
        if group is not None:
            group.pop(watcher, None)
            if not group:
                del self._by_path[watcher.key]

    def add(self, event: Event) -> None:
        """Record an event without telling watchers (TTL refreshes)."""
        self.history.add(event)

    def notify(self, event: Event) -> None:
        """Record an event and tell the watchers on its key and on every ancestor."""
        self.history.add(event)
        if not self._by_path:
            return
        key = event.key
        self.notify_path(event, "/", False)
        if key == "/":
            return
        end = 0
        while True:
            end = key.find("/", end + 1)
            if end == -1:
                self.notify_path(event, key, False)
                return
            self.notify_path(event, key[:end], False)

    def notify_path(self, event: Event, path: str, deleted: bool) -> None:
        """Tell the watchers on exactly ``path`` (``deleted``: it was removed by the event)."""
        group = self._by_path.get(path)
        if not group:
            return
        key = event.key
        original = key == path
        if not original and is_hidden(path, key):
            return
        index = event.index
        for watcher in list(group):
            if (watcher.recursive or original or deleted) and index >= watcher.since_index:
                watcher._deliver(event)
                if not watcher.stream:
                    watcher._finish()

    def watchers(self) -> list[Watcher]:
        """Every registered watcher (for recovery and tests)."""
        return [w for group in self._by_path.values() for w in group]
