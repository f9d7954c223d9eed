"""The v2 API on a 3-member grozd cluster of real processes in network namespaces: writes
through any member, quorum reads across a leader kill, TTL expiry once cluster-wide, a watch
that outlives its member; and `grozd etcdctl` against the whole cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from grozd.client import Client, EtcdError, EtcdUnavailable, KeyNotFoundError, Response
from tests.integration.members import Members
from tests.integration.netns import Lab, skip_unless_possible
from tests.integration.test_cluster import serving, wait_leader

FAILURES = (EtcdError, EtcdUnavailable, OSError, TimeoutError)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Lab, Members]]:
    skip_unless_possible()
    with Lab(3) as lab:
        members = Members(lab, tmp_path)
        members.start_all()
        try:
            lab.run(wait_leader(members, {1, 2, 3}), 30)
            lab.run(serving(members, {1, 2, 3}), 30)
            yield lab, members
        finally:
            members.stop_all()


def etcdctl(lab: Lab, endpoints: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`grozd etcdctl` as a process on the lab's switch (where every member is reachable)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(["ip", "netns", "exec", lab.switch, sys.executable, "-m",
                           "grozd.cli.etcdctl", "--endpoints", ",".join(endpoints), *args],
                          capture_output=True, text=True, env=env, timeout=30)


async def published(members: Members, timeout: float = 10) -> None:
    """Until every member's client URLs are listed in /v2/members."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            async with Client(members.endpoints, timeout=1) as c:
                if all(m.client_urls for m in await c.members()):
                    return
        except FAILURES:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("client URLs not published")


def test_a_member_serves_clients_only_once_its_client_urls_are_published(
        tmp_path: Path) -> None:
    skip_unless_possible()
    with Lab(3) as lab:
        members = Members(lab, tmp_path)
        members.start_all()
        try:
            async def first_answer(i: int) -> list:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while loop.time() < deadline:
                    try:
                        async with Client([members.client_url(i)], timeout=0.5) as c:
                            return await c.members()
                    except FAILURES:
                        await asyncio.sleep(0.02)
                raise AssertionError(f"member {i} never answered")

            async def main() -> None:
                for i in (1, 2, 3):
                    listed = await first_answer(i)
                    me = next(m for m in listed if m.name == f"m{i}")
                    assert me.client_urls == (members.client_url(i),), (i, listed)

            lab.run(main(), 60)
        finally:
            members.stop_all()


def test_writes_through_any_member_are_read_everywhere(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        for i in (1, 2, 3):
            async with Client([members.client_url(i)], timeout=3) as c:
                await c.set(f"/any/k{i}", f"from-m{i}")
                await c.mkdir(f"/any/d{i}")
                await c.append("/any/queue", f"job-m{i}")
        for i in (1, 2, 3):
            async with Client([members.client_url(i)], timeout=3) as c:
                r = await c.get("/any", recursive=True, sorted=True, quorum=True)
                values = {n.key: n.value for n in r.node.leaves()}
                assert {k: v for k, v in values.items() if "/k" in k} == {
                    f"/any/k{j}": f"from-m{j}" for j in (1, 2, 3)}
                assert sorted(v for k, v in values.items() if "queue" in k) == [
                    "job-m1", "job-m2", "job-m3"]

        await published(members)

    lab.run(main(), 60)
    # etcdctl through the whole cluster: members, health, a write and a read.
    listed = etcdctl(lab, members.endpoints, "member", "list")
    assert listed.returncode == 0, listed.stderr
    lines = sorted(listed.stdout.splitlines())
    assert [line.split(" name=")[1].split(" ")[0] for line in lines] == ["m1", "m2", "m3"]
    assert sum("isLeader=true" in line for line in lines) == 1
    health = etcdctl(lab, members.endpoints, "cluster-health")
    assert health.returncode == 0 and health.stdout.endswith("cluster is healthy\n")
    assert health.stdout.count(" is healthy: got healthy result from ") == 3
    wrote = etcdctl(lab, [members.client_url(2)], "set", "/ctl", "v", "--ttl", "60")
    assert (wrote.stdout, wrote.returncode) == ("v\n", 0)
    read = etcdctl(lab, [members.client_url(3)], "get", "--quorum", "/ctl")
    assert (read.stdout, read.returncode) == ("v\n", 0)


def test_quorum_reads_are_never_stale_across_a_leader_kill(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        live = {1, 2, 3}
        clients = {i: Client([members.client_url(i)], timeout=1.0) for i in live}
        acked = 0
        n = 0
        reads = 0
        loop = asyncio.get_running_loop()
        killed = False
        start = loop.time()
        try:
            while loop.time() - start < 4.0:
                if not killed and loop.time() - start > 1.0:
                    leader = await wait_leader(members, live)
                    await asyncio.to_thread(members.kill, leader, signal.SIGKILL)
                    live.discard(leader)
                    await clients.pop(leader).close()
                    killed = True
                n += 1
                via = sorted(live)[n % len(live)]
                try:
                    await clients[via].set("/x", str(n))
                    acked = n
                except FAILURES:
                    await asyncio.sleep(0.05)
                    continue
                for i in sorted(live):
                    try:
                        r = await clients[i].get("/x", quorum=True)
                    except FAILURES:
                        continue  # no leader yet: an error, never an old value
                    reads += 1
                    assert int(r.value) >= acked, (
                        f"member {i} answered x={r.value} to a quorum read after x={acked}"
                        f" was acknowledged")
        finally:
            for c in clients.values():
                await c.close()
        assert killed and acked > 20 and reads > 40, (acked, reads)

    lab.run(main(), 60)


def test_ttl_key_expires_exactly_once_cluster_wide(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        keys = [f"/ttl/k{j}" for j in range(5)]
        events: list[Response] = []
        async with Client(members.endpoints, timeout=3) as c:
            first = await c.mkdir("/ttl")
            start = first.node.modified_index + 1

            async def watch() -> None:
                async for event in c.watch_iter("/ttl", index=start, recursive=True):
                    events.append(event)

            watcher = asyncio.ensure_future(watch())
            try:
                for j, key in enumerate(keys):
                    async with Client([members.client_url(j % 3 + 1)], timeout=3) as w:
                        await w.set(key, "v", ttl=1)
                await asyncio.sleep(3.5)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        for key in keys:
            expired = [e for e in events if e.action == "expire" and e.node.key == key]
            assert len(expired) == 1, (key, [(e.action, e.node.key) for e in events])
        for i in (1, 2, 3):
            async with Client([members.client_url(i)], timeout=3) as c:
                for quorum in (False, True):
                    for key in keys:
                        with pytest.raises(KeyNotFoundError):
                            await c.get(key, quorum=quorum)

    lab.run(main(), 60)


def test_watch_resumes_on_another_member_when_its_member_dies(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        leader = await wait_leader(members, {1, 2, 3})
        victim = next(i for i in (1, 2, 3) if i != leader)
        others = [i for i in (1, 2, 3) if i != victim]
        order = [victim, *others]
        seen: list[Response] = []
        acked: dict[str, int] = {}
        async with Client([members.client_url(i) for i in order], timeout=1.0) as watcher, \
                Client([members.client_url(leader)], timeout=2.0) as writer:
            start = (await writer.mkdir("/w")).node.modified_index + 1

            async def watch() -> None:
                async for event in watcher.watch_iter("/w", index=start, recursive=True,
                                                      give_up_after=20):
                    seen.append(event)

            task = asyncio.ensure_future(watch())
            try:
                for n in range(60):
                    if n == 20:
                        await asyncio.sleep(0.3)  # the watch is waiting on the victim
                        await asyncio.to_thread(members.kill, victim, signal.SIGKILL)
                    try:
                        r = await writer.set(f"/w/k{n}", str(n))
                        acked[r.node.key] = r.node.modified_index
                    except FAILURES:
                        pass
                    await asyncio.sleep(0.02)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while loop.time() < deadline and not set(acked) <= {
                        e.node.key for e in seen if e.node is not None}:
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        got = [(e.node.key, e.node.modified_index) for e in seen if e.node is not None]
        assert all(e.action == "set" for e in seen), [e.action for e in seen]
        assert len(got) == len(set(got)), "an event was delivered twice"
        assert [i for _, i in got] == sorted(i for _, i in got), "events out of order"
        missing = set(acked.items()) - set(got)
        assert not missing, f"events lost across the member's death: {sorted(missing)[:5]}"
        assert len(acked) >= 55, len(acked)

    lab.run(main(), 60)
