"""Members on loopback with real WALs and TCP: election, replication, restart, group commit,
linearizable reads, membership, snapshots, and refusals of foreign clusters and data dirs."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest

from grozd.raft import node as node_module
from grozd.raft.core import Message, MessageType
from grozd.raft.node import DataDirMismatchError, NodeConfig, RaftNode
from tests.node.cluster import KV, LocalCluster, put


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_three_members_replicate_through_any_member(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            await c.leader()
            last = 0
            for i, node in enumerate(c.nodes.values()):
                last = await node.propose(put(f"k{i}", f"v{i}"))
            await c.converge(last)
            for node in c.nodes.values():
                assert node.fsm.data == {"k0": "v0", "k1": "v1", "k2": "v2"}
        finally:
            await c.stop_all()

    run(main())


def test_group_commit_batches_concurrent_proposals(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            leader = await c.leader()
            before = leader.stats["fsyncs"]
            results = await asyncio.gather(*(leader.propose(put(f"k{i}", "v"))
                                             for i in range(500)))
            fsyncs = leader.stats["fsyncs"] - before
            assert len(set(results)) == 500
            assert fsyncs < 100, f"{fsyncs} fsyncs for 500 concurrent proposals"
        finally:
            await c.stop_all()

    run(main())


def test_followers_sync_on_the_loop_while_their_disk_is_quick(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Followers fdatasync on their loop while syncs are quick; the leader always on its sync
    thread (native code, which os.fdatasync below never sees), and so do followers while
    their syncs are slow."""
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            leader = await c.leader()
            followers = [m for m in c.nodes.values() if m is not leader]
            await leader.propose(put("first", "v"))
            synced.clear()  # the WALs' own creation and the election synced directly
            for i in range(10):
                await leader.propose(put(f"k{i}", "v"))
            assert set(synced) == {f.wal._fd for f in followers}
            assert leader.syncer is not None and all(f.syncer is None for f in followers)
            for f in followers:
                f.sync_average = 1.0  # a disk that took a second per sync lately
            before = len(synced)
            last = 0
            for i in range(3):
                last = await leader.propose(put(f"slow{i}", "v"))
            await c.converge(last)
            assert len(synced) == before
            assert all(f.syncer is not None for f in followers)
            assert all(f.sync_average < 1.0 for f in followers)  # quick syncs count too
        finally:
            await c.stop_all()

    run(main())


def test_a_follower_whose_inline_sync_fails_retries_and_loses_nothing(tmp_path: Path,
                                                                      monkeypatch) -> None:
    failures = 1
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(errno.EIO, "injected")
        real(fd)

    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            leader = await c.leader()
            await leader.propose(put("before", "v"))
            monkeypatch.setattr(os, "fdatasync", fdatasync)
            last = await leader.propose(put("during", "v"))
            await c.converge(last)
            assert failures == 0
            for m in c.nodes.values():
                assert m.fsm.data["during"] == "v" and m.storage_error is None
        finally:
            await c.stop_all()

    run(main())


def test_restart_resumes_from_the_wal(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            leader = await c.leader()
            for i in range(20):
                last = await leader.propose(put(f"k{i}", str(i)))
            await c.converge(last)
            await c.stop_all()
            await c.start_all()
            leader = await c.leader()
            last = await leader.propose(put("after", "restart"))
            await c.converge(last)
            for node in c.nodes.values():
                assert node.fsm.data["k19"] == "19" and node.fsm.data["after"] == "restart"
        finally:
            await c.stop_all()

    run(main())


def test_new_leader_after_the_leader_stops(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            old = await c.leader()
            acked = await old.propose(put("before", "x"))
            name = next(n for n, node in c.nodes.items() if node is old)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await c.stop(name)
            new = await c.leader()
            elected_in = loop.time() - t0
            assert new is not old
            assert elected_in < 2 * 0.2 + 0.3  # two election timeouts, plus scheduling slack
            last = await new.propose(put("after", "y"))
            assert last > acked
            await c.converge(last)
            assert all(n.fsm.data["before"] == "x" for n in c.nodes.values())
        finally:
            await c.stop_all()

    run(main())


def test_quorum_read_sees_every_acknowledged_write(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path)
        await c.start_all()
        try:
            leader = await c.leader()
            follower = next(n for n in c.nodes.values() if n is not leader)
            for i in range(10):
                index = await leader.propose(put("x", str(i)))
                read = await follower.read_index()
                assert read >= index
                assert follower.fsm.data["x"] == str(i)
        finally:
            await c.stop_all()

    run(main())


def test_member_added_at_runtime_catches_up_by_snapshot(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path, size=4, snapshot_count=20, snapshot_catchup_entries=5)
        founders = {n: [u] for n, u in list(c.urls.items())[:3]}
        for name in founders:
            await c.start(name, cluster=founders)
        try:
            leader = await c.leader()
            for i in range(60):
                last = await leader.propose(put(f"k{i}", str(i)))
            assert leader.stats["snapshots"] >= 2
            assert list((tmp_path / leader.config.name / "member" / "snap").glob("*.snap"))
            await leader.add_member([c.urls["m4"]], name="m4")
            joined = await c.start("m4", state="existing",
                                   cluster={**founders, "m4": [c.urls["m4"]]})
            last = await leader.propose(put("late", "yes"))
            await c.converge(last)
            assert joined.fsm.data["k59"] == "59" and joined.fsm.data["late"] == "yes"
            assert joined.snapshot_index > 0  # it got there through a snapshot
            assert len(leader.core.conf_state().voters) == 4
            await leader.remove_member(joined.id)
            assert len(leader.core.conf_state().voters) == 3
        finally:
            await c.stop_all()

    run(main())


def test_log_is_compacted_after_a_snapshot_in_steps(tmp_path: Path, monkeypatch) -> None:
    """The entries a snapshot covers are freed a few per loop turn, down to the catch-up
    margin, and the log still serves every entry after it."""
    monkeypatch.setattr(node_module, "COMPACT_STEP", 3)

    async def main() -> None:
        c = LocalCluster(tmp_path, size=1, snapshot_count=20, snapshot_catchup_entries=5)
        await c.start_all()
        try:
            leader = await c.leader()
            for i in range(25):
                await leader.propose(put(f"k{i}", str(i)))
            while leader.stats["snapshots"] < 1:
                await asyncio.sleep(0.01)
            first = leader.storage.first_index()
            assert first == leader.snapshot_index - 5 + 1
            kept = leader.storage.entries(first, leader.applied + 1, 1 << 62)
            assert [e.index for e in kept] == list(range(first, leader.applied + 1))
        finally:
            await c.stop_all()

    run(main())


def test_member_of_another_cluster_is_refused(tmp_path: Path, caplog) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path / "a", size=1, token="cluster-a")
        await c.start_all()
        other = LocalCluster(tmp_path / "b", size=1, token="cluster-b")
        other.urls = {"m1": other.urls["m1"]}
        await other.start_all()
        try:
            a, b = await c.leader(), await other.leader()
            # Point b at a's listener as if it were a peer of b's cluster.
            b.transport.set_peer(a.id, [c.urls["m1"]])
            b.transport.send([Message(MessageType.HEARTBEAT, to=a.id, frm=b.id, term=5)])
            for _ in range(100):
                if "belongs to cluster" in caplog.text:
                    break
                await asyncio.sleep(0.02)
        finally:
            await c.stop_all()
            await other.stop_all()

    with caplog.at_level(logging.WARNING, logger="grozd.raft.transport"):
        run(main())
    assert "a different --initial-cluster-token?" in caplog.text


def test_flags_that_contradict_the_data_dir_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        c = LocalCluster(tmp_path, size=1)
        await c.start_all()
        await c.stop_all()
        cfg: NodeConfig = c.config("m1")
        cfg.initial_cluster_token = "another-token"
        with pytest.raises(DataDirMismatchError, match="belongs to member .* give member"):
            await RaftNode(cfg, KV()).start()

    run(main())
