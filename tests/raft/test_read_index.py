"""ReadIndex (Raft thesis section 6.4): a read point is the leader's commit index, handed out
only once a quorum has confirmed the leader is still the leader."""

from __future__ import annotations

from grozd.raft.core import MessageType, Role

from .harness import ELECTION_TICK, Network


def reads(net: Network, nid: int) -> list[tuple[int, bytes]]:
    return [(rs.index, rs.context) for rs in net.node(nid).reads]


def test_read_on_the_leader_waits_for_a_heartbeat_quorum() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.propose(1, b"w")
    net.deliver_all()
    leader = net.core(1)
    assert leader.committed == 2
    net.read_index(1, b"r1")
    beats = net.pending(type=MessageType.HEARTBEAT)
    assert {m.to for m in beats} == {2, 3}
    assert all(m.context == b"r1" for m in beats)
    assert reads(net, 1) == []  # not before anyone confirmed
    net.deliver_until(lambda: bool(net.node(1).reads))
    acks = [m for m in net.delivered if m.type == MessageType.HEARTBEAT_RESP and m.to == 1
            and m.context == b"r1"]
    assert len(acks) == 1  # itself and one follower: a quorum of three
    assert reads(net, 1) == [(2, b"r1")]
    net.deliver_all()
    assert reads(net, 1) == [(2, b"r1")]  # answered once


def test_read_on_a_follower_is_forwarded_and_answered_with_the_leaders_commit() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.propose(1, b"w")
    net.deliver_all()
    net.read_index(2, b"r2")
    assert [m.to for m in net.pending(type=MessageType.READ_INDEX)] == [1]
    net.deliver_all()
    assert reads(net, 2) == [(net.core(1).committed, b"r2")]
    assert reads(net, 1) == []


def test_new_leader_answers_reads_only_after_committing_an_entry_of_its_term() -> None:
    """The old leader committed w (index 2), but node 2 has not heard so when it takes over:
    its own commit index (1) would be a stale read point."""
    net = Network([1, 2, 3])
    net.elect(1)
    old = net.core(1)
    net.propose(1, b"w")
    net.deliver_until(lambda: old.committed == 2)  # the client sees w committed
    net.drop_pending()  # ... and the news of the commit never reaches the followers
    new = net.core(2)
    assert new.committed == 1
    net.transfer(1, 2)
    net.deliver_until(lambda: new.role == Role.LEADER)
    assert new.committed == 1
    net.read_index(2, b"r")
    assert reads(net, 2) == []
    assert not [m for m in net.queue if m.type == MessageType.HEARTBEAT and m.context == b"r"]
    net.deliver_all()
    [(index, ctx)] = reads(net, 2)
    assert ctx == b"r"
    assert index >= 2  # w is visible at the read point
    assert index == new.committed
    assert new.log_entries(index)[0].term == new.term


def test_deposed_leader_cannot_answer_a_read() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(1)
    for _ in range(4 * ELECTION_TICK):
        net.tick(1, ids=[2, 3], deliver=True)
        if net.leader() in (2, 3):
            break
    new = net.leader()
    assert new in (2, 3)
    net.propose(new, b"w2")
    net.deliver_all()
    stale = net.core(1)
    assert stale.role == Role.LEADER  # it has not noticed yet
    assert stale.committed < net.core(new).committed
    net.read_index(1, b"stale")
    net.deliver_all()
    assert reads(net, 1) == []  # no quorum acknowledges it
    net.heal()
    net.run(2)
    assert stale.role == Role.FOLLOWER
    assert stale.lead == new
    assert reads(net, 1) == []
