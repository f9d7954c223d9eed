"""Seeded simulations of 3- and 5-node clusters: Raft's safety properties after every event,
and progress once the faults stop. A failure names the seed and the command that replays it."""

import pytest

from grozd.raft.sim import (
    Faults,
    LivenessFailure,
    SafetyViolation,
    Simulation,
    replay_command,
)

SEEDS_PER_CHUNK = 100
CHUNKS = 10  # 1,000 seeds per cluster size, 2,000 in all


def run_seeds(nodes: int, first: int, count: int) -> None:
    for seed in range(first, first + count):
        try:
            Simulation(seed, nodes=nodes).run()
        except (SafetyViolation, LivenessFailure) as e:
            pytest.fail(f"seed {seed}: {e}\nreplay: {replay_command(seed, nodes)}", pytrace=False)


@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_seeded_clusters_stay_safe_and_recover(nodes: int, chunk: int) -> None:
    run_seeds(nodes, 1 + chunk * SEEDS_PER_CHUNK, SEEDS_PER_CHUNK)


def test_same_seed_replays_exactly() -> None:
    a, b = Simulation(42, nodes=5), Simulation(42, nodes=5)
    a.run()
    b.run()
    assert a.stats == b.stats
    assert a.checker.applied == b.checker.applied


def test_faults_are_really_injected() -> None:
    """The sweep only proves something if the faults happen: count them over a few seeds."""
    totals: dict[str, int] = {}
    for seed in range(1, 60):
        sim = Simulation(seed, nodes=5)
        sim.run()
        for key, value in sim.stats.items():
            totals[key] = totals.get(key, 0) + value
    for key in ("dropped", "duplicated", "crashes", "partitions", "snapshots_sent", "reads",
                "conf_changes"):
        assert totals[key] > 0, f"no {key} in 59 seeds: {totals}"
    assert totals["elections"] > 59


def test_mutation_committing_previous_term_entries_is_caught() -> None:
    """Breaking the figure-8 rule must make the simulator fail: the checkers have teeth.

    The violation needs a precise history (a leader re-elected after a rival appended in a
    higher term, one entry per message), so the search uses a churny fault mix.
    """
    churn = Faults(drop=0.1, duplicate=0.0, max_delay=8, partition_every=10, crash_every=10,
                   compact_every=0, small_messages=True)
    for seed in range(1, 1500):
        sim = Simulation(seed, nodes=3, faults=Faults(**vars(churn)),
                         unsafe_commit_previous_term=True)
        try:
            sim.run(safety_ticks=600)
        except SafetyViolation:
            return
        except LivenessFailure:
            continue
    pytest.fail("no seed caught a leader committing entries of a previous term by counting")


def test_the_churny_mix_is_safe_with_the_rule_in_place() -> None:
    churn = Faults(drop=0.1, duplicate=0.0, max_delay=8, partition_every=10, crash_every=10,
                   compact_every=0, small_messages=True)
    for seed in range(1, 150):
        Simulation(seed, nodes=3, faults=Faults(**vars(churn))).run(safety_ticks=600)
