"""Leadership transfer (Raft thesis section 3.10): the leader brings the target up to date,
sends it TimeoutNow, and the target wins an election at once."""

from __future__ import annotations

import pytest

from grozd.raft.core import MessageType, ProposalDroppedError, Role

from .harness import ELECTION_TICK, Network


@pytest.mark.parametrize("asked_at", [1, 3])
def test_transfer_to_an_up_to_date_follower(asked_at: int) -> None:
    """Asked at the leader, or at a follower (which forwards the request)."""
    net = Network([1, 2, 3])
    net.elect(1)
    net.propose(1, b"w")
    net.deliver_all()
    since = len(net.sent)
    net.transfer(asked_at, 2)
    net.deliver_all()
    assert net.count_sent(type=MessageType.TIMEOUT_NOW, to=2, since=since) == 1
    assert net.leader() == 2
    new = net.core(2)
    assert new.term == 2
    for nid in (1, 3):
        assert (net.core(nid).role, net.core(nid).lead, net.core(nid).term) == (
            Role.FOLLOWER, 2, 2)
    assert net.core(1).lead_transferee == 0
    net.propose(2, b"after")
    net.deliver_all()
    for nid in (1, 2, 3):
        assert net.node(nid).applied_data() == [b"w", b"after"]


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"w%d" % i)
    net.deliver_all()
    leader = net.core(1)
    last = leader.log_entries()[-1].index
    assert net.core(3).log_entries()[-1].index < last
    net.heal()
    since = len(net.sent)
    net.transfer(1, 3)
    assert net.pending(type=MessageType.TIMEOUT_NOW) == []  # not yet: 3 lacks entries
    assert net.pending(to=3, type=MessageType.APP)
    net.deliver_all()
    assert net.leader() == 3
    sent = net.sent[since:]
    timeout_at = next(i for i, m in enumerate(sent) if m.type == MessageType.TIMEOUT_NOW)
    caught_up_at = next(i for i, m in enumerate(sent) if m.frm == 3
                        and m.type == MessageType.APP_RESP and not m.reject and m.index == last)
    assert caught_up_at < timeout_at
    assert [d for _, _, d in net.log(3) if d] == [b"w%d" % i for i in range(5)]


def test_proposals_are_dropped_during_a_transfer_and_it_aborts_after_an_election_timeout() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(3)  # the target cannot be reached
    net.transfer(1, 3)
    leader = net.core(1)
    assert leader.lead_transferee == 3
    with pytest.raises(ProposalDroppedError, match="transfer"):
        net.propose(1, b"during")
    net.tick(ELECTION_TICK - 1, deliver=True)
    assert leader.lead_transferee == 3
    assert not net.try_propose(1, b"still-during")
    net.tick(1, deliver=True)
    assert leader.role == Role.LEADER  # node 2 still answers: the quorum holds
    assert leader.lead_transferee == 0  # abandoned
    assert leader.term == 1
    net.propose(1, b"after")
    net.deliver_all()
    assert net.node(2).applied_data() == [b"after"]
