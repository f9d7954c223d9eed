"""Watchers and the event history: delivery rules, hidden keys, 401, cost of idle watchers."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import pytest

from grozd.store import EtcdError, Store

from .test_store import Driver


@pytest.fixture
def do() -> Driver:
    return Driver()


def test_long_poll_gets_the_next_change_and_leaves(do):
    watcher = do.store.watch("/k")
    assert watcher.start_index == 0 and do.store.watcher_count == 1
    do("set", "/other", value="x")
    assert watcher.pending == 0
    do("set", "/k", value="1")
    assert watcher.take().node["value"] == "1"
    assert watcher.closed and do.store.watcher_count == 0
    do("set", "/k", value="2")
    assert watcher.take() is None


def test_awaiting_a_watcher(do):
    async def main():
        watcher = do.store.watch("/k")
        waiting = asyncio.ensure_future(watcher.next())
        await asyncio.sleep(0)
        assert not waiting.done()
        do("set", "/k", value="1")
        event = await asyncio.wait_for(waiting, 1)
        assert event.action == "set"
        assert await watcher is None  # a long-poll watcher is done after one event

    asyncio.run(main())


def test_streaming_watcher_keeps_going_until_removed(do):
    async def main():
        watcher = do.store.watch("/k", stream=True)
        for v in "abc":
            do("set", "/k", value=v)
        got = [await watcher.next() for _ in range(3)]
        assert [e.node["value"] for e in got] == ["a", "b", "c"]
        watcher.remove()
        assert await watcher.next() is None
        assert do.store.watcher_count == 0

    asyncio.run(main())


def test_recursive_and_hidden(do):
    flat = do.store.watch("/d")
    deep = do.store.watch("/d", recursive=True)
    do("set", "/d/_hidden", value="h")
    do("set", "/d/x/_h", value="h")
    assert deep.pending == 0 and flat.pending == 0
    do("set", "/d/a", value="1")
    assert deep.take().node["key"] == "/d/a"
    assert flat.pending == 0 and not flat.closed
    direct = do.store.watch("/d/_hidden")
    inside = do.store.watch("/d/_hdir", recursive=True)
    do("set", "/d/_hidden", value="h2")
    do("set", "/d/_hdir/y", value="1")
    assert direct.take().node["value"] == "h2"
    assert inside.take().node["key"] == "/d/_hdir/y"


def test_deleting_a_directory_reaches_watchers_below_it(do):
    do("set", "/d/a/b", value="1")
    below = do.store.watch("/d/a/b")
    on_dir = do.store.watch("/d")
    stream = do.store.watch("/d", recursive=True, stream=True)
    do("delete", "/d", recursive=True)
    assert below.take().node["key"] == "/d"
    assert on_dir.take().action == "delete"
    # etcd tells a streaming watcher on the deleted path twice; kept for fidelity.
    assert [stream.take().index, stream.take().index] == [2, 2]


def test_wait_index_replays_the_history(do):
    do("set", "/k", value="1")
    do("set", "/k", value="2")
    do("set", "/other", value="x")
    past = do.store.watch("/k", wait_index=2)
    assert past.take().node["value"] == "2" and past.closed
    assert past.start_index == 3
    replay = do.store.watch("/", recursive=True, wait_index=1, stream=True)
    assert [replay.take().index for _ in range(3)] == [1, 2, 3]
    do("set", "/k", value="3")
    assert replay.take().index == 4  # then it goes on live
    future = do.store.watch("/k", wait_index=10)
    for _ in range(6):
        do("set", "/k", value="x")
    assert future.take().index == 10


def test_history_quirks_match_etcd(do):
    do("set", "/a/x", value="1")
    do("set", "/ab", value="1")
    do("set", "/a/_h", value="1")
    do("delete", "/a", recursive=True)
    # etcd's history scan compares the deleted directory as a bare prefix: /ab hears of /a.
    assert do.store.watch("/ab", wait_index=3).take().action == "delete"
    # ...and does not filter hidden keys.
    assert do.store.watch("/a", recursive=True, wait_index=3).take().node["key"] == "/a/_h"


def test_event_index_cleared_after_1000_events(do):
    for i in range(1005):
        do("set", f"/k{i % 3}", value="x")
    with pytest.raises(EtcdError) as cleared:
        do.store.watch("/k0", wait_index=5)
    assert cleared.value.code == 401 and cleared.value.status == 400
    assert cleared.value.cause == "the requested history has been cleared [6/5]"
    assert cleared.value.index == 1005
    assert do.store.watch("/k0", wait_index=6).take().index == 7  # still remembered


def test_slow_stream_watcher_is_dropped_after_100_events(do):
    watcher = do.store.watch("/k", stream=True)
    for i in range(150):
        do("set", "/k", value=str(i))
    assert watcher.closed and watcher.pending == 100
    assert do.store.watcher_count == 0


def test_idle_watchers_are_cheap_and_untouched(do):
    do("set", "/busy", value="0")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    watchers = [do.store.watch(f"/idle/{i}") for i in range(5000)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert used / len(watchers) < 1000, f"{used / len(watchers):.0f} bytes per watcher"
    # A write elsewhere touches only its own ancestors' watchers, not all 5000.
    started = time.perf_counter()
    for i in range(2000):
        do("set", "/busy", value=str(i))
    assert time.perf_counter() - started < 1.0
    assert all(w.pending == 0 for w in watchers)


def test_restore_rechecks_long_polls_and_ends_streams(do):
    other = Driver(Store())
    other("set", "/k", value="1")
    other("set", "/k", value="2")
    waiting = do.store.watch("/k", wait_index=2)
    streaming = do.store.watch("/k", stream=True)
    do.store.restore(other.store.snapshot())
    assert waiting.take().node["value"] == "2"
    assert streaming.closed and streaming.take() is None
    assert do.store.watcher_count == 0
