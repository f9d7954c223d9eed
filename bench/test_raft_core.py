"""Committed entries per second through an in-process 3-node cluster, and CPU per entry.

Run: .venv/bin/python -m pytest bench -q --benchmark-columns=mean,ops
"""

import time

import pytest

from bench.cluster import MemoryCluster

PAYLOAD = b"x" * 100
ROUNDS = 200  # proposals per measured run


@pytest.mark.parametrize("codec", [False, True], ids=["in-memory", "wire-codec"])
@pytest.mark.parametrize("batch", [1, 64])
def test_commit_throughput(benchmark, batch: int, codec: bool) -> None:
    cluster = MemoryCluster(3, codec=codec)
    entries = [PAYLOAD] * batch

    def run() -> None:
        leader = cluster.leader
        for _ in range(ROUNDS):
            leader.propose_many(entries)
            cluster.settle()

    cpu0, before = time.process_time(), cluster.applied[3]
    benchmark(run)
    cpu = time.process_time() - cpu0
    committed = cluster.applied[3] - before
    assert committed >= ROUNDS * batch
    per_entry_us = cpu / committed * 1e6
    benchmark.extra_info["cpu_us_per_committed_entry"] = round(per_entry_us, 2)
    benchmark.extra_info["committed_entries_per_s"] = round(committed / cpu)
    how = " with codec" if codec else ""
    print(f"\nbatch {batch}{how}: {committed / cpu:,.0f} committed entries/s,"
          f" {per_entry_us:.2f} us CPU per committed entry (3 nodes, whole cluster)")
    if batch == 64 and not codec:
        # The budget: at most 5 us of CPU per committed entry with batches of 64.
        assert per_entry_us < 5.0
