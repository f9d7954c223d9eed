"""Proposals per second through a 3-member cluster on loopback (real WAL with fdatasync, real
TCP between members, a trivial state machine), at 1, 16 and 64 concurrent proposers, with the
fsyncs per second beside it so the group commit is visible.

Run: .venv/bin/python -m pytest bench/test_member.py -q -s
"""

import asyncio
import time
from pathlib import Path

import pytest
import uvloop

from tests.node.cluster import LocalCluster, put

DURATION = 3.0


async def measure(root: Path, proposers: int) -> dict:
    c = LocalCluster(root, heartbeat_interval_ms=100, election_timeout_ms=1000)
    await c.start_all()
    try:
        leader = await c.leader()
        loop = asyncio.get_running_loop()
        done = 0
        stop_at = loop.time() + DURATION

        async def proposer(n: int) -> None:
            nonlocal done
            i = 0
            while loop.time() < stop_at:
                await leader.propose(put(f"p{n}", str(i)))
                i += 1
                done += 1

        fsyncs0 = {name: node.wal.fsyncs for name, node in c.nodes.items()}
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(proposer(n) for n in range(proposers)))
        took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        fsyncs = sum(node.wal.fsyncs - fsyncs0[name] for name, node in c.nodes.items())
        return {"proposals_per_s": done / took, "fsyncs_per_s": fsyncs / took,
                "cpu_us_per_proposal": cpu / done * 1e6, "leader_fsyncs_per_s":
                (leader.wal.fsyncs - fsyncs0[leader.config.name]) / took}
    finally:
        await c.stop_all()


@pytest.mark.parametrize("proposers", [1, 16, 64])
def test_member_proposals(tmp_path: Path, proposers: int) -> None:
    r = uvloop.run(measure(tmp_path, proposers))
    print(f"\n{proposers:>3} proposers: {r['proposals_per_s']:8,.0f} proposals/s,"
          f" {r['fsyncs_per_s']:7,.0f} fsyncs/s (all 3 members), leader"
          f" {r['leader_fsyncs_per_s']:6,.0f} fsyncs/s, {r['cpu_us_per_proposal']:.0f} us CPU"
          " per proposal (whole cluster, one process)")
    assert r["proposals_per_s"] > 0
