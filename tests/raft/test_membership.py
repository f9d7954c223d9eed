"""Membership changes, one server at a time (Raft thesis chapter 4): learners, promotion,
removal, the one-pending-change rule, and changes made while a minority is cut off."""

from __future__ import annotations

import pytest

from grozd.raft.core import (
    ConfChange,
    ConfChangeType,
    ConfState,
    MessageType,
    ProposalDroppedError,
    Role,
)

from .harness import ELECTION_TICK, Network

VOTE_TYPES = (MessageType.VOTE, MessageType.PRE_VOTE, MessageType.VOTE_RESP,
              MessageType.PRE_VOTE_RESP)


def add_learner(net: Network, leader: int, nid: int) -> None:
    """Start node nid and make it a learner through the leader; wait until applied."""
    net.add_node(nid)
    net.conf_change(leader, ConfChange(ConfChangeType.ADD_LEARNER, nid))
    net.deliver_all()


def votes_involving(net: Network, nid: int, since: int = 0) -> int:
    return sum(1 for m in net.sent[since:] if m.type in VOTE_TYPES and nid in (m.to, m.frm))


def test_learner_receives_entries_but_neither_votes_nor_counts_for_quorum() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    since = len(net.sent)
    add_learner(net, 1, 4)
    leader = net.core(1)
    assert leader.conf_state() == ConfState([1, 2, 3], [4])
    net.propose(1, b"x")
    net.deliver_all()
    assert net.node(4).applied_data() == [b"x"]
    assert net.core(4).conf_state() == ConfState([1, 2, 3], [4])
    # Two voters gone: the leader and the learner are not a quorum.
    committed = leader.committed
    net.isolate(2, 3)
    net.propose(1, b"y")
    net.deliver_all()
    assert net.log(4)[-1][2] == b"y"  # the learner holds it...
    assert leader.committed == committed  # ... and it still is not committed
    net.heal()
    net.run(1)
    assert leader.committed == committed + 1
    # An election without the leader: the learner never campaigns and is never asked.
    net.isolate(1)
    for _ in range(6 * ELECTION_TICK):
        net.tick(1, ids=[2, 3, 4], deliver=True)
        if net.leader() in (2, 3):
            break
    assert net.leader() in (2, 3)
    net.tick(6 * ELECTION_TICK, ids=[4], deliver=True)  # a long silence changes nothing
    assert net.core(4).role == Role.FOLLOWER
    assert votes_involving(net, 4, since) == 0


def test_promoted_learner_votes_and_counts_for_quorum() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    add_learner(net, 1, 4)
    net.conf_change(1, ConfChange(ConfChangeType.ADD_NODE, 4))
    net.deliver_all()
    leader = net.core(1)
    assert leader.conf_state() == ConfState([1, 2, 3, 4])
    net.run(1)  # a heartbeat round: node 4 learns the commit index
    assert net.core(4).conf_state() == ConfState([1, 2, 3, 4])
    # Quorum of four is three: 1, 3 and 4 commit without 2...
    net.isolate(2)
    net.propose(1, b"a")
    net.deliver_all()
    assert net.node(4).applied_data() == [b"a"]
    # ... but 1 and 4 alone cannot.
    committed = leader.committed
    net.isolate(3)
    net.propose(1, b"b")
    net.deliver_all()
    assert leader.committed == committed
    # Node 4 now votes: it is asked in an election.
    since = len(net.sent)
    net.heal()
    net.isolate(1)
    for _ in range(6 * ELECTION_TICK):
        net.tick(1, ids=[2, 3, 4], deliver=True)
        if net.leader() in (2, 3, 4):
            break
    assert net.leader() in (2, 3, 4)
    assert votes_involving(net, 4, since) > 0


def test_removing_a_voter_shrinks_the_quorum() -> None:
    net = Network([1, 2, 3, 4])
    net.elect(1)
    leader = net.core(1)
    # With four voters, two are not a quorum.
    net.isolate(3, 4)
    net.propose(1, b"a")
    net.deliver_all()
    assert net.node(1).applied_data() == []
    net.heal()
    net.isolate(4)
    net.run(1)
    assert net.node(1).applied_data() == [b"a"]
    net.conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 4))
    net.deliver_all()
    assert leader.conf_state() == ConfState([1, 2, 3])
    # With three voters, two are.
    committed = leader.committed
    net.isolate(3)
    net.propose(1, b"b")
    net.deliver_all()
    assert leader.committed == committed + 1
    assert net.node(1).applied_data() == net.node(2).applied_data() == [b"a", b"b"]


def test_one_configuration_change_at_a_time() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.add_node(4)
    net.add_node(5)
    net.conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDroppedError, match="pending"):
        net.conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 5))
    net.deliver_all()  # the first one is committed and applied
    assert net.core(1).conf_state() == ConfState([1, 2, 3], [4])
    net.conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 5))
    net.deliver_all()
    assert net.core(1).conf_state() == ConfState([1, 2, 3], [4, 5])


def test_membership_changes_while_a_minority_is_partitioned_then_heal() -> None:
    net = Network([1, 2, 3, 4, 5])
    net.elect(1)
    leader = net.core(1)
    term = leader.term
    net.partition([1, 2, 3], [4, 5])
    net.conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 5))
    net.deliver_all()
    assert leader.conf_state() == ConfState([1, 2, 3, 4])
    net.add_node(6, bootstrap=ConfState([1, 2, 3, 4, 5]))
    net.partition([1, 2, 3, 6], [4, 5])
    net.conf_change(1, ConfChange(ConfChangeType.ADD_NODE, 6))
    net.deliver_all()
    assert leader.conf_state() == ConfState([1, 2, 3, 4, 6])
    net.propose(1, b"during")
    net.run(3 * ELECTION_TICK)  # 4 and 5 time out over and over on their side
    net.heal()
    net.run(5 * ELECTION_TICK)
    net.propose(1, b"healed")
    net.run(2)
    # No term had two leaders (the harness checks every election), nobody was disrupted.
    assert net.leaders == {term: 1}
    members = [1, 2, 3, 4, 6]
    for nid in members:
        core = net.core(nid)
        assert core.term == term
        assert core.conf_state() == ConfState([1, 2, 3, 4, 6])
        assert net.log(nid) == net.log(1)
        assert net.node(nid).applied == net.node(1).applied
        assert net.node(nid).applied_data() == [b"during", b"healed"]
    assert net.core(5).role != Role.LEADER


def test_membership_changes_when_the_old_leader_is_in_the_minority() -> None:
    """The leader is cut off with one follower and proposes a change that cannot commit; the
    majority elects a new leader, which removes the old one and adds a new node. After
    healing, the stranded change is gone and the members' logs agree."""
    net = Network([1, 2, 3, 4, 5])
    net.elect(1)
    net.propose(1, b"a")
    net.deliver_all()
    net.partition([1, 4], [2, 3, 5])
    net.conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 5))  # stranded
    net.deliver_all()
    assert net.core(1).committed < net.core(1).log_entries()[-1].index
    for _ in range(8 * ELECTION_TICK):
        net.tick(1, deliver=True)
        if net.leader() in (2, 3, 5):
            break
    new = net.leader()
    assert new in (2, 3, 5)
    net.run(2 * ELECTION_TICK)
    assert net.core(1).role == Role.FOLLOWER  # check-quorum made it step down
    net.conf_change(new, ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.deliver_all()
    net.add_node(6)
    net.partition([1, 4], [2, 3, 5, 6])
    net.conf_change(new, ConfChange(ConfChangeType.ADD_NODE, 6))
    net.deliver_all()
    assert net.core(new).conf_state() == ConfState([2, 3, 4, 5, 6])
    net.heal()
    net.run(5 * ELECTION_TICK)
    net.propose(new, b"healed")
    net.run(2)
    members = [2, 3, 4, 5, 6]
    leader_term = net.core(new).term
    assert net.leaders[leader_term] == new
    for nid in members:
        assert net.core(nid).term == leader_term
        assert net.core(nid).conf_state() == ConfState([2, 3, 4, 5, 6])
        assert net.log(nid) == net.log(new)
        assert net.node(nid).applied == net.node(new).applied
        assert net.node(nid).applied_data() == [b"a", b"healed"]
    # The old leader's change died with its term: node 5 was never removed.
    assert 5 in net.core(new).conf_state().voters
    assert net.core(1).role != Role.LEADER


def test_removed_leader_steps_down_and_the_rest_elect_a_new_one() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.deliver_all()
    old = net.core(1)
    assert old.role == Role.FOLLOWER
    assert old.conf_state() == ConfState([2, 3])
    since = len(net.sent)
    for _ in range(6 * ELECTION_TICK):
        net.tick(1, deliver=True)
        if net.leader() in (2, 3):
            break
    new = net.leader()
    assert new in (2, 3)
    net.run(2)
    assert net.count_sent(frm=1, type=MessageType.PRE_VOTE, since=since) == 0
    assert net.count_sent(frm=1, type=MessageType.VOTE, since=since) == 0
    for nid in (2, 3):
        assert net.core(nid).conf_state() == ConfState([2, 3])
    net.propose(new, b"without-1")
    net.deliver_all()
    assert net.node(2).applied_data() == net.node(3).applied_data() == [b"without-1"]
