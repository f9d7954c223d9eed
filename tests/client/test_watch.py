"""Watches against a real etcd: single long-polls, the resuming iterator, 401, drops."""

from __future__ import annotations

import asyncio

import pytest

from grozd.client import Client, EtcdUnavailable, Response

from .fakeservers import Proxy, closed_port_url


async def watchers(c: Client) -> int:
    """How many watches etcd has registered right now."""
    return (await c.store_stats())["watchers"]


async def wait_for_watchers(c: Client, more_than: int) -> None:
    """Until etcd has more than ``more_than`` watches, i.e. a new watch is really in place.

    An index-less watch only sees changes made after etcd registered it.
    """
    for _ in range(500):
        if await watchers(c) > more_than:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("watch was never registered")


async def collect(it, count: int, timeout: float = 5.0) -> list[Response]:
    async def take():
        out = []
        async for item in it:
            out.append(item)
            if len(out) == count:
                break
        return out

    return await asyncio.wait_for(take(), timeout)


async def make_noise(c: Client, prefix: str, count: int) -> None:
    """Write ``count`` events (in concurrent batches, which is quicker)."""
    for start in range(0, count, 100):
        batch = range(start, min(start + 100, count))
        await asyncio.gather(*(c.set(f"{prefix}/noise/{i}", "x") for i in batch))


def test_watch_returns_the_next_event(run, prefix):
    async def body(c: Client):
        before = await watchers(c)
        task = asyncio.create_task(c.watch(f"{prefix}/k", timeout=5))
        await wait_for_watchers(c, before)
        put = await c.set(f"{prefix}/k", "v")
        return put, await task

    put, event = run(body)
    assert event.action == "set" and event.node.value == "v"
    assert event.node.modified_index == put.node.modified_index
    # The head is sent when the watch is registered, before the event.
    assert event.etcd_index < event.node.modified_index


def test_watch_from_a_past_index_answers_from_history(run, prefix):
    async def body(c: Client):
        first = await c.set(f"{prefix}/k", "1")
        await c.set(f"{prefix}/k", "2")
        return await c.watch(f"{prefix}/k", index=first.node.modified_index, timeout=5)

    assert run(body).node.value == "1"


def test_recursive_watch_sees_children(run, prefix):
    async def body(c: Client):
        await c.mkdir(f"{prefix}/d")
        before = await watchers(c)
        task = asyncio.create_task(c.watch(f"{prefix}/d", recursive=True, timeout=5))
        await wait_for_watchers(c, before)
        await c.set(f"{prefix}/d/child/deep", "x")
        return await task

    assert run(body).node.key.endswith("/d/child/deep")


def test_watch_timeout(run, prefix):
    async def body(c: Client):
        with pytest.raises(TimeoutError):
            await c.watch(f"{prefix}/never", timeout=0.2)
        # The cancelled long-poll's connection is discarded, not reused mid-response.
        return (await c.set(f"{prefix}/after", "ok")).node.value

    assert run(body) == "ok"


def test_watch_iter_resumes_across_events(run, prefix):
    async def body(c: Client):
        start = await c.set(f"{prefix}/d/seed", "0")
        it = c.watch_iter(f"{prefix}/d", index=start.node.modified_index + 1, recursive=True)
        # A burst written before iterating: each watch resumes at the last index + 1,
        # so every event arrives once, in order, even though they were all missed live.
        for i in range(1, 6):
            await c.set(f"{prefix}/d/k{i % 2}", str(i))
        first = await collect(it, 5)
        # ...and then events that happen while the iterator is waiting.
        task = asyncio.create_task(collect(it, 3))
        await c.delete(f"{prefix}/d/k0")
        await c.set(f"{prefix}/d/k1", "last")
        await c.append(f"{prefix}/d", "queued")
        second = await task
        await it.aclose()
        return first, second

    first, second = run(body)
    assert [e.node.value for e in first] == ["1", "2", "3", "4", "5"]
    indexes = [e.node.modified_index for e in first + second]
    assert indexes == sorted(set(indexes))
    assert [e.action for e in second] == ["delete", "set", "create"]


def test_watch_iter_resyncs_after_event_index_cleared(run, prefix):
    key = f"{prefix}/watched"

    async def body(c: Client):
        before = await c.set(key, "before")
        await c.set(key, "after")
        # etcd keeps the last 1000 events; push the watched index out of that history.
        await make_noise(c, prefix, 1100)
        with pytest.raises(Exception) as cleared:
            await c.watch(key, index=before.node.modified_index + 1)
        it = c.watch_iter(key, index=before.node.modified_index + 1)
        resync = await collect(it, 1)
        task = asyncio.create_task(collect(it, 1))
        later = await c.set(key, "later")
        (event,) = await task
        await it.aclose()
        return cleared.value, resync[0], event, later

    cleared, resync, event, later = run(body, max_idle=100)
    assert cleared.error_code == 401
    # Instead of the lost events the iterator yields the key as it is now...
    assert resync.action == "get" and resync.node.value == "after"
    assert resync.etcd_index >= 1100
    # ...and carries on from there.
    assert event.action == "set" and event.node.value == "later"
    assert event.node.modified_index == later.node.modified_index


def test_watch_iter_resync_of_a_deleted_key(run, prefix):
    key = f"{prefix}/gone"

    async def body(c: Client):
        put = await c.set(key, "v")
        await c.delete(key)
        await make_noise(c, prefix, 1100)
        it = c.watch_iter(key, index=put.node.modified_index + 1)
        (resync,) = await collect(it, 1)
        await it.aclose()
        return resync

    resync = run(body, max_idle=100)
    assert resync.action == "get" and resync.node is None and resync.etcd_index > 1000


def test_watch_resumes_after_dropped_connection(run, prefix, etcd_url):
    key = f"{prefix}/k"

    async def body(c: Client):
        proxy = Proxy(etcd_url)
        await proxy.start()
        async with Client([proxy.url, etcd_url]) as via_proxy:
            # An index-less watch: resuming correctly needs the X-Etcd-Index of its head.
            before = await watchers(c)
            task = asyncio.create_task(via_proxy.watch(key, timeout=5))
            await wait_for_watchers(c, before)
            # The event is sent by etcd but swallowed, then the connection dies and the
            # proxy goes away: the watch must fail over to etcd and fetch it from history.
            proxy.frozen = True
            put = await c.set(key, "while-down")
            await asyncio.sleep(0.05)
            proxy.drop()
            proxy.stop()
            event = await task
        return put, event

    put, event = run(body)
    assert event.node.value == "while-down"
    assert event.node.modified_index == put.node.modified_index


def test_watch_iter_reconnects_to_the_same_endpoint(run, prefix, etcd_url):
    key = f"{prefix}/k"

    async def body(c: Client):
        proxy = Proxy(etcd_url)
        await proxy.start()
        async with Client([proxy.url]) as via_proxy:
            it = via_proxy.watch_iter(key)
            before = await watchers(c)
            task = asyncio.create_task(collect(it, 2))
            await wait_for_watchers(c, before)
            # Endpoint down for a while (the iterator retries with backoff), events meanwhile.
            proxy.drop()
            proxy.stop()
            await c.set(key, "one")
            await c.set(key, "two")
            await asyncio.sleep(0.2)
            await proxy.start()
            events = await task
            await it.aclose()
        proxy.stop()
        return events

    assert [e.node.value for e in run(body)] == ["one", "two"]


def test_watch_iter_gives_up_when_nothing_answers():
    async def body():
        async with Client([closed_port_url()], timeout=0.5) as c:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(EtcdUnavailable):
                async for _ in c.watch_iter("/k", give_up_after=0.3):
                    pass
            return loop.time() - start

    assert asyncio.run(body()) < 2.0
