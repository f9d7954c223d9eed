"""`grozd sim`: run seeded Raft clusters under faults and report what happened."""

from __future__ import annotations

import argparse
import sys
import time

from grozd.cli.exit import ExitCode
from grozd.raft.sim import LivenessFailure, SafetyViolation, Simulation, replay_command


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="grozd sim",
        description="Run a simulated Raft cluster (the real compiled core, a seeded faulty"
        " network, crashes and restarts) and check Raft's safety properties after every event.",
    )
    p.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    p.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds to run")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--ticks", type=int, default=300, help="ticks of the faulty phase")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.seeds < 1 or args.ticks < 0:
        p.error("--nodes and --seeds must be at least 1, --ticks at least 0")

    failed = 0
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        sim = Simulation(seed, nodes=args.nodes)
        try:
            heal_ticks = sim.run(safety_ticks=args.ticks)
        except (SafetyViolation, LivenessFailure) as e:
            failed += 1
            print(f"seed {seed}: FAILED: {e}\n  replay: {replay_command(seed, args.nodes)}",
                  file=sys.stderr)
            continue
        leader = sim.leader()
        s = sim.stats
        print(f"seed {seed}: {args.nodes} nodes, {args.ticks} faulty ticks: {s['elections']}"
              f" elections, {len(sim.checker.applied)} entries committed, {s['delivered']}"
              f" messages delivered, {s['dropped']} dropped, {s['duplicated']} duplicated,"
              f" {s['partitions']} partitions, {s['crashes']} crashes,"
              f" {s['snapshots_sent']} snapshots sent, {s['reads']} linearizable reads;"
              f" healed: leader {leader.id} (term {leader.core.term}) committed within"
              f" {heal_ticks} ticks; all safety checks held")
    took = time.perf_counter() - started
    print(f"{args.seeds - failed} passed, {failed} failed ({took:.1f}s)")
    return ExitCode.FAILURE if failed else ExitCode.OK
