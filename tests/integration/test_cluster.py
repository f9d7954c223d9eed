"""A 3-member grozd cluster of real processes in network namespaces: kill -9 the leader under
load, restart it, partition the leader away, wipe a follower and re-add it, tear its WAL."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
from pathlib import Path

import pytest

from grozd.client import Client, EtcdError, EtcdUnavailable, KeyNotFoundError
from tests.integration.members import Members
from tests.integration.netns import Lab, skip_unless_possible

ELECTION = 0.5  # --election-timeout 500


@pytest.fixture
def cluster(tmp_path: Path):
    skip_unless_possible()
    with Lab(3) as lab:
        members = Members(lab, tmp_path)
        members.start_all()
        try:
            lab.run(wait_leader(members, set(range(1, 4))), 30)
            lab.run(serving(members, set(range(1, 4))), 30)
            yield lab, members
        finally:
            members.stop_all()


async def role(url: str) -> str | None:
    try:
        async with Client([url], timeout=0.5) as c:
            return (await c.self_stats())["state"]
    except (EtcdUnavailable, EtcdError, OSError, TimeoutError):
        return None


async def wait_leader(members: Members, among: set[int], timeout: float = 15) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for i in sorted(among):
            if await role(members.client_url(i)) == "StateLeader":
                return i
        await asyncio.sleep(0.05)
    raise AssertionError(f"no leader among {sorted(among)}")


async def serving(members: Members, among: set[int], timeout: float = 15) -> None:
    """Until every member in `among` answers clients (a member serves once it has published
    its client URLs through the cluster, as etcd does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    waiting = set(among)
    while waiting and loop.time() < deadline:
        waiting = {i for i in waiting if await role(members.client_url(i)) is None}
        if waiting:
            await asyncio.sleep(0.05)
    assert not waiting, f"members {sorted(waiting)} do not serve clients"


async def writer(endpoints: list[str], acked: list[str], stop: asyncio.Event) -> None:
    """Writes keys one after another, recording those acknowledged."""
    n = 0
    async with Client(endpoints, timeout=1.0) as c:
        while not stop.is_set():
            n += 1
            try:
                await c.set(f"/load/k{n}", str(n))
                acked.append(f"k{n}")
            except (EtcdError, EtcdUnavailable, OSError, TimeoutError):
                await asyncio.sleep(0.02)


async def keys_on(url: str) -> dict[str, str]:
    async with Client([url], timeout=2.0) as c:
        try:
            r = await c.get("/load", recursive=True)
        except KeyNotFoundError:
            return {}
        return {n.key.rsplit("/", 1)[1]: n.value for n in r.node.nodes}


async def converged(members: Members, ids: list[int], acked: list[str],
                    timeout: float = 20) -> None:
    """Every acknowledged key is on every member, read locally from each."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    missing: dict[int, list[str]] = {}
    while loop.time() < deadline:
        missing = {}
        for i in ids:
            try:
                have = await keys_on(members.client_url(i))
            except (EtcdError, EtcdUnavailable, OSError, TimeoutError):
                have = {}
            lost = [k for k in acked if k not in have]
            if lost:
                missing[i] = lost[:5]
        if not missing:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"acknowledged writes missing: {missing}")


def test_kill_leader_under_load_then_restart_it(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        acked: list[str] = []
        stop = asyncio.Event()
        load = asyncio.ensure_future(writer(members.endpoints, acked, stop))
        await asyncio.sleep(1.0)
        leader = await wait_leader(members, {1, 2, 3})
        before = len(acked)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.to_thread(members.kill, leader, signal.SIGKILL)
        others = {1, 2, 3} - {leader}
        new = await wait_leader(members, others)
        elected = loop.time() - t0
        await asyncio.sleep(1.0)
        stop.set()
        await load
        assert before > 10 and len(acked) > before, (before, len(acked))
        # Two election timeouts, plus the time this test takes to poll three members.
        assert elected < 2 * ELECTION + 1.0, f"new leader {new} after {elected:.2f}s"
        await converged(members, sorted(others), acked)
        await asyncio.to_thread(members.start, leader)
        await converged(members, [1, 2, 3], acked)

    lab.run(main(), 90)


def test_partitioned_leader_makes_no_progress_and_loses_nothing(cluster) -> None:
    lab, members = cluster

    async def main() -> None:
        leader = await wait_leader(members, {1, 2, 3})
        acked: list[str] = []
        async with Client(members.endpoints, timeout=2) as c:
            for n in range(20):
                await c.set(f"/load/a{n}", "x")
                acked.append(f"a{n}")
        lab.cut(leader)
        async with Client([members.client_url(leader)], timeout=2.0) as old:
            with pytest.raises((EtcdError, EtcdUnavailable, TimeoutError)):
                await old.set("/load/minority", "never")
        majority = {1, 2, 3} - {leader}
        await wait_leader(members, majority)
        async with Client([members.client_url(i) for i in majority], timeout=2) as c:
            for n in range(20):
                await c.set(f"/load/b{n}", "y")
                acked.append(f"b{n}")
        lab.heal(leader)
        await converged(members, [1, 2, 3], acked)
        # The minority's write was never acknowledged, and never applied anywhere.
        for i in (1, 2, 3):
            assert "minority" not in await keys_on(members.client_url(i))

    lab.run(main(), 90)


def test_wiped_follower_is_re_added_and_catches_up_by_snapshot(tmp_path: Path) -> None:
    skip_unless_possible()
    with Lab(3) as lab:
        members = Members(lab, tmp_path, extra=("--snapshot-count", "50",
                                                    "--experimental-snapshot-catchup-entries",
                                                    "10"))
        members.start_all()
        try:
            async def main() -> None:
                leader = await wait_leader(members, {1, 2, 3})
                victim = next(i for i in (1, 2, 3) if i != leader)
                acked = []
                async with Client(members.endpoints, timeout=2) as c:
                    for n in range(150):
                        await c.set(f"/load/k{n}", str(n))
                        acked.append(f"k{n}")
                await asyncio.to_thread(members.kill, victim)
                await remove_and_add(members, leader, victim)
                shutil.rmtree(members.data_dir(victim))
                cluster = ",".join(f"m{j}={members.peer_url(j)}" for j in (1, 2, 3))
                await asyncio.to_thread(members.start, victim, "existing", cluster)
                await converged(members, [1, 2, 3], acked)
                assert "snapshot_restored" in members.log(victim)

            lab.run(main(), 90)
        finally:
            members.stop_all()


async def remove_and_add(members: Members, leader: int, victim: int) -> None:
    """Through the members API, as `etcdctl member remove/add` would."""
    import json
    import urllib.request

    def call(method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(members.client_url(leader) + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            data = resp.read()
            return json.loads(data) if data else {}

    listing = await asyncio.to_thread(call, "GET", "/v2/members")
    old = next(m for m in listing["members"] if m["name"] == f"m{victim}")
    await asyncio.to_thread(call, "DELETE", f"/v2/members/{old['id']}")
    added = await asyncio.to_thread(call, "POST", "/v2/members",
                                    {"peerURLs": [members.peer_url(victim)]})
    assert added["id"] != old["id"]


def test_torn_wal_recovers_or_refuses_never_wrong_data(tmp_path: Path) -> None:
    skip_unless_possible()
    rng = random.Random(7)
    with Lab(3) as lab:
        members = Members(lab, tmp_path)
        members.start_all()
        try:
            async def main() -> None:
                await wait_leader(members, {1, 2, 3})
                acked = []
                async with Client(members.endpoints, timeout=2) as c:
                    for n in range(60):
                        await c.set(f"/load/k{n}", str(n))
                        acked.append(f"k{n}")
                await converged(members, [1, 2, 3], acked)
                await asyncio.to_thread(members.kill, 3)
                wal = sorted((members.data_dir(3) / "member" / "wal").glob("*.wal"))[-1]
                size = wal.stat().st_size
                cut = rng.randrange(size - 400, size)
                with open(wal, "r+b") as f:
                    f.truncate(cut)
                await asyncio.to_thread(members.start, 3)
                await asyncio.sleep(1.5)
                if 3 in members.procs and members.procs[3].poll() is None:
                    # Recovered: it catches up and holds exactly what the others hold.
                    await converged(members, [1, 2, 3], acked)
                    assert await keys_on(members.client_url(3)) == await keys_on(
                        members.client_url(1))
                else:
                    log = members.log(3)
                    assert "wal" in log.lower() and "offset" in log.lower(), log[-2000:]

            lab.run(main(), 90)
        finally:
            members.stop_all()
