"""SyncClient: the blocking wrapper, from plain code and from inside a running loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from grozd.client import KeyNotFoundError, NodeExistError, SyncClient, TestFailedError


def test_sync_client_keys_api(etcd_url, prefix):
    with SyncClient([etcd_url]) as c:
        assert c.endpoints == [etcd_url]
        put = c.set(f"{prefix}/k", "v", ttl=60)
        assert c.get(f"{prefix}/k").value == "v"
        assert c.update(f"{prefix}/k", "w").prev_node.value == "v"
        with pytest.raises(NodeExistError):
            c.create(f"{prefix}/k", "x")
        c.compare_and_swap(f"{prefix}/k", "y", prev_value="w")
        with pytest.raises(TestFailedError):
            c.compare_and_delete(f"{prefix}/k", prev_index=put.node.modified_index)
        c.compare_and_delete(f"{prefix}/k", prev_value="y")
        with pytest.raises(KeyNotFoundError) as info:
            c.get(f"{prefix}/k")
        assert info.value.error_code == 100
        c.mkdir(f"{prefix}/d")
        c.append(f"{prefix}/d", "a")
        assert [n.value for n in c.get(f"{prefix}/d", sorted=True).node.nodes] == ["a"]
        c.delete(f"{prefix}/d", recursive=True)
        assert c.health() and c.version()["etcdserver"] and c.members()
        assert c.leader_stats()["leader"] and c.self_stats()["id"] and c.store_stats()


def test_sync_watch_and_watch_iter(etcd_url, prefix):
    with SyncClient([etcd_url]) as c:
        start = c.set(f"{prefix}/k", "0")
        for i in range(1, 4):
            c.set(f"{prefix}/k", str(i))
        assert c.watch(f"{prefix}/k", index=start.node.modified_index, timeout=5).value == "0"
        values = []
        for event in c.watch_iter(f"{prefix}/k", index=start.node.modified_index + 1):
            values.append(event.value)
            if len(values) == 3:
                break
        assert values == ["1", "2", "3"]

        def write_live() -> None:
            with SyncClient([etcd_url]) as other:
                other.set(f"{prefix}/k", "live")

        # A live event, written from another thread while this one blocks in the iterator.
        writer = threading.Timer(0.2, write_live)
        writer.start()
        it = c.watch_iter(f"{prefix}/k")
        assert next(it).value == "live"
        it.close()
        writer.join()


def test_sync_client_inside_a_running_loop(etcd_url, prefix):
    async def main() -> str:
        # Synchronous code called from a coroutine: no "loop already running" error,
        # because the wrapper never runs its loop in this thread.
        with SyncClient([etcd_url]) as c:
            c.set(f"{prefix}/k", "from inside")
            return c.get(f"{prefix}/k").value

    assert asyncio.run(main()) == "from inside"


def test_sync_client_closed():
    c = SyncClient(["http://127.0.0.1:1"])
    c.close()
    c.close()
    with pytest.raises(RuntimeError):
        c.get("/k")
