"""Restart: a core rebuilt from its MemoryStorage (hard state, entries, snapshot) resumes where
it stopped and re-applies the committed entries after its snapshot."""

from __future__ import annotations

import pytest

from grozd.raft.core import Role

from .harness import ELECTION_TICK, Network


@pytest.mark.parametrize("victim", [1, 2])
def test_restarted_node_resumes_from_storage(victim: int) -> None:
    """victim 1 is the leader, 2 a follower."""
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(5):
        net.propose(1, b"a%d" % i)
    net.deliver_all()
    net.compact(victim, 4)
    for i in range(2):
        net.propose(1, b"b%d" % i)
    net.deliver_all()
    node = net.node(victim)
    before = net.core(victim)
    hard = before.hard_state
    assert node.storage.hard_state == hard  # everything was persisted
    assert (hard.term, hard.vote, hard.commit) == (1, 1, 8)
    applied = list(node.applied)
    log = net.log(victim)
    net.crash(victim)

    node.start()
    core = net.core(victim)
    assert core.hard_state == hard
    assert (core.term, core.vote, core.committed) == (hard.term, hard.vote, hard.commit)
    assert core.role == Role.FOLLOWER
    assert core.applied == 4  # the snapshot's index
    assert [e.index for e in node.applied] == [1, 2, 3, 4]  # the state the snapshot carries
    assert net.log(victim) == log
    rd = core.ready()
    assert [e.index for e in rd.committed_entries] == [5, 6, 7, 8]
    assert rd.hard_state is None  # nothing new to persist
    core.advance()
    for e in rd.committed_entries:
        node.applied.append(e)
    assert node.applied == applied

    # It takes part again: an election if it led, then new entries.
    for _ in range(6 * ELECTION_TICK):
        net.tick(1, deliver=True)
        if net.leader() is not None:
            break
    leader = net.leader()
    assert leader is not None
    net.propose(leader, b"c")
    net.deliver_all()
    assert net.node(victim).applied_data()[-1] == b"c"
    assert net.node(victim).applied == net.node(leader).applied
