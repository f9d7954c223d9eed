"""Leader election (Raft paper section 5.2, 5.4.1) with pre-vote and check-quorum (section 9.6)."""

from __future__ import annotations

import pytest

from grozd.raft.core import MemoryStorage, MessageType, Role

from .harness import ELECTION_TICK, Network, preload, vote_request


@pytest.mark.parametrize("size", [3, 5])
def test_one_leader_is_elected_and_everyone_follows_it(size: int) -> None:
    net = Network(range(1, size + 1))
    net.elect(1)
    leader = net.core(1)
    assert leader.role == Role.LEADER
    assert leader.term == 1
    for nid in range(2, size + 1):
        core = net.core(nid)
        assert core.role == Role.FOLLOWER
        assert (core.term, core.lead, core.vote) == (1, 1, 1)
    # The leader's empty entry of its term is committed and applied everywhere.
    for nid in range(1, size + 1):
        assert net.core(nid).committed == 1
        assert [(e.index, e.term) for e in net.node(nid).applied] == [(1, 1)]


@pytest.mark.parametrize("pre_vote", [True, False])
def test_candidate_with_a_stale_log_loses(pre_vote: bool) -> None:
    """Voters refuse a candidate whose log is less up-to-date than theirs (section 5.4.1)."""
    storages = {i: MemoryStorage() for i in (1, 2, 3)}
    preload(storages[1], [1, 1], term=1)
    preload(storages[2], [1, 1], term=1)
    preload(storages[3], [1], term=1)  # misses entry 2
    net = Network([1, 2, 3], storages=storages, pre_vote=pre_vote)
    net.campaign(3)
    net.deliver_all()
    stale = net.core(3)
    assert stale.role == Role.FOLLOWER
    rejections = [m for m in net.delivered if m.to == 3 and m.reject]
    assert {m.frm for m in rejections} == {1, 2}
    # With pre-vote the failed attempt leaves every term alone; without it the candidate
    # burnt a term (and the voters followed it there).
    expected_term = 1 if pre_vote else 2
    assert {net.core(i).term for i in (1, 2, 3)} == {expected_term}
    # A node with the longer log wins, and node 3 votes for it.
    net.elect(1)
    assert net.core(3).lead == 1


def test_split_vote_resolves_with_randomized_timeouts() -> None:
    """Two candidates split a 4-node cluster's votes 2-2; the randomized election timeouts make
    one of them time out first and win the next term."""
    net = Network([1, 2, 3, 4], pre_vote=False)
    net.cut(1, 4)
    net.cut(2, 3)
    net.campaign(1)
    net.campaign(2)
    net.deliver_all()
    assert [net.core(i).role for i in (1, 2)] == [Role.CANDIDATE, Role.CANDIDATE]
    assert net.core(3).vote == 1 and net.core(4).vote == 2
    assert net.leader() is None
    net.heal()
    for _ in range(4 * ELECTION_TICK):
        net.tick(1, deliver=True)
        if net.leader() is not None:
            break
    winner = net.leader()
    assert winner is not None
    term = net.core(winner).term
    assert term >= 2
    for nid in (1, 2, 3, 4):
        assert net.core(nid).term == term
        assert net.core(nid).lead == winner


def settle(net: Network, leader: int) -> None:
    """Elect leader, then let heartbeats flow for a couple of election timeouts."""
    net.elect(leader)
    net.run(2 * ELECTION_TICK)
    assert net.leader() == leader


def test_pre_vote_keeps_a_rejoining_node_from_disrupting_the_leader() -> None:
    net = Network([1, 2, 3])
    settle(net, 1)
    term = net.core(1).term
    net.isolate(3)
    net.run(5 * ELECTION_TICK)  # node 3 times out again and again, alone
    assert net.count_sent(frm=3, type=MessageType.PRE_VOTE) > 0
    assert net.count_sent(frm=3, type=MessageType.VOTE) == 0
    assert net.core(3).term == term  # a pre-election never bumps the term
    net.heal()
    net.run(3 * ELECTION_TICK)
    assert net.leader() == 1
    assert [net.core(i).term for i in (1, 2, 3)] == [term, term, term]
    assert net.core(3).lead == 1


def test_without_pre_vote_a_rejoining_node_deposes_the_leader() -> None:
    """The contrast that shows what pre-vote buys: the isolated node's term runs ahead, and
    its first answer after healing makes the leader step down."""
    net = Network([1, 2, 3], pre_vote=False)
    settle(net, 1)
    term = net.core(1).term
    net.isolate(3)
    net.run(5 * ELECTION_TICK)
    assert net.core(3).term > term
    net.heal()
    net.run(1)
    old = net.core(1)
    assert old.role == Role.FOLLOWER
    assert old.term == net.core(3).term > term


def test_check_quorum_leader_cut_off_from_the_majority_steps_down() -> None:
    net = Network([1, 2, 3])
    settle(net, 1)
    term = net.core(1).term
    net.isolate(1)
    # The first quorum check after the cut still counts the answers to the heartbeats sent
    # just before it: the leader stays...
    net.tick(ELECTION_TICK, ids=[1])
    assert net.core(1).role == Role.LEADER
    # ... the second finds no one: it steps down, within two election timeouts of the cut.
    net.tick(ELECTION_TICK - 1, ids=[1])
    assert net.core(1).role == Role.LEADER
    net.tick(1, ids=[1])
    old = net.core(1)
    assert old.role == Role.FOLLOWER
    assert old.lead == 0
    assert old.term == term  # stepping down does not need a new term


def test_follower_in_lease_ignores_a_higher_term_vote_request() -> None:
    net = Network([1, 2, 3])
    settle(net, 1)
    follower = net.core(2)
    term = follower.term
    last = follower.log_entries()[-1]
    sent = len(net.sent)
    net.step(2, vote_request(3, 2, term + 5, last.index, last.term))
    assert follower.term == term
    assert follower.lead == 1
    assert follower.vote == 1
    assert net.count_sent(since=sent) == 0  # not even a rejection
    # A leadership transfer's request is the one exception: it may not be ignored.
    net.step(2, vote_request(3, 2, term + 5, last.index, last.term, context=b"transfer"))
    assert follower.term == term + 5
    assert follower.vote == 3
    # Once the lease has run out (no word from the leader for an election timeout), a
    # higher-term request is heard and granted.
    net.isolate(3)
    net.tick(ELECTION_TICK, ids=[3])
    lone = net.core(3)
    net.heal()
    net.step(3, vote_request(2, 3, lone.term + 1, last.index, last.term))
    assert lone.vote == 2
