"""grozd's own etcd client (tested against real etcd elsewhere) works against grozd too."""

from __future__ import annotations

import asyncio

import pytest

from grozd.client import (
    Client,
    EventIndexClearedError,
    KeyNotFoundError,
    NodeExistError,
    TestFailedError,
)


def run(server, fn):
    async def main():
        async with Client([server.url], timeout=5) as client:
            return await fn(client)

    return asyncio.run(main())


def test_keys_round_trip(server):
    async def body(c: Client):
        put = await c.set("/a/b", "1", ttl=100)
        got = await c.get("/a", recursive=True)
        made = await c.create("/c", "x")
        with pytest.raises(NodeExistError):
            await c.create("/c", "y")
        swapped = await c.compare_and_swap("/c", "z", prev_value="x")
        with pytest.raises(TestFailedError):
            await c.compare_and_swap("/c", "w", prev_index=1)
        queued = await c.append("/q", "job")
        await c.delete("/a", recursive=True)
        with pytest.raises(KeyNotFoundError):
            await c.get("/a/b")
        return put, got, made, swapped, queued

    put, got, made, swapped, queued = run(server, body)
    assert put.node.ttl == 100 and put.etcd_index == 1 and put.raft_term == 1
    assert [n.key for n in got.node.leaves()] == ["/a/b"]
    assert made.action == "create" and swapped.prev_node.value == "x"
    assert queued.node.key == "/q/00000000000000000004"


def test_watch_and_resuming_iterator(server):
    async def body(c: Client):
        waiting = asyncio.create_task(c.watch("/w", timeout=5))
        await asyncio.sleep(0.1)
        await c.set("/w", "1")
        first = await waiting
        # Push the next event out of the history: the iterator re-reads instead.
        start = (await c.get("/")).etcd_index + 1
        await c.set("/w", "2")
        for i in range(1010):
            await c.set(f"/noise/{i % 5}", "x")
        seen = []
        async for item in c.watch_iter("/w", index=start):
            seen.append(item)
            if len(seen) == 2:
                break
            await c.set("/w", "3")
        with pytest.raises(EventIndexClearedError):
            await c.watch("/w", index=start, timeout=5)
        return first, seen

    first, seen = run(server, body)
    assert first.action == "set" and first.value == "1"
    assert [s.action for s in seen] == ["get", "set"]
    assert seen[0].value == "2" and seen[1].value == "3"


def test_cluster_calls(server):
    async def body(c: Client):
        return await c.members(), await c.version(), await c.health(), await c.self_stats()

    members, version, healthy, stats = run(server, body)
    assert len(members) == 1 and members[0].client_urls == ("http://127.0.0.1:2379",)
    assert version["etcdserver"] == "3.4.23" and healthy and stats["state"] == "StateLeader"
