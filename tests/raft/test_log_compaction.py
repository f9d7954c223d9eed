"""Log compaction (Raft paper section 7): a follower that fell behind the leader's compacted
log is sent a snapshot, restores it, and catches up with appends."""

from __future__ import annotations

from typing import Any

from grozd.raft.core import ConfChange, ConfChangeType, ConfState, MessageType, ProgressState

from .harness import Network


def lagging_behind_compaction(**kwargs: Any) -> Network:
    """Node 3 misses ten entries, which the leader then compacts away."""
    net = Network([1, 2, 3], **kwargs)
    net.elect(1)
    net.isolate(3)
    for i in range(10):
        net.propose(1, b"w%d" % i)
    net.deliver_all()
    net.compact(1)
    leader = net.core(1)
    assert net.node(1).storage.first_index() == leader.applied + 1
    assert leader.log_entries() == []  # everything applied is compacted
    assert net.core(3).log_entries()[-1].index < net.node(1).storage.first_index() - 1
    net.heal()
    return net


def test_follower_behind_compaction_gets_a_snapshot_and_catches_up() -> None:
    net = lagging_behind_compaction()
    snap_index = net.node(1).storage.snapshot().index
    net.run(1)  # a heartbeat answer tells the leader where 3 is
    sent = [m for m in net.sent if m.type == MessageType.SNAP]
    assert [m.to for m in sent] == [3]
    assert sent[0].snapshot.index == snap_index
    follower = net.node(3)
    assert follower.restored == [snap_index]  # handed over in a Ready, persisted
    assert follower.storage.snapshot().index == snap_index
    assert follower.storage.conf_state == ConfState([1, 2, 3])
    assert net.core(1).progress()[3].state == ProgressState.REPLICATE
    net.propose(1, b"after")
    net.deliver_all()
    assert net.log(3)[-1][2] == b"after"
    assert follower.applied == net.node(1).applied
    assert follower.applied_data() == [b"w%d" % i for i in range(10)] + [b"after"]


def test_failed_snapshot_puts_the_follower_back_to_probe() -> None:
    net = lagging_behind_compaction(auto_report_snapshot=False)
    leader = net.core(1)
    net.tick(1, ids=[1])  # heartbeat
    net.deliver_until(lambda: bool(net.pending(type=MessageType.SNAP)))
    assert leader.progress()[3].state == ProgressState.SNAPSHOT
    assert net.drop_pending(lambda m: m.type == MessageType.SNAP) == 1  # lost on the way
    leader.report_snapshot(3, True)
    net.process(1)
    pr = leader.progress()[3]
    assert pr.state == ProgressState.PROBE
    assert pr.pending_snapshot == 0
    assert pr.probe_sent  # it waits for a sign of life before trying again
    net.deliver_all()
    assert net.count_sent(type=MessageType.SNAP) == 1
    net.run(1)  # the next heartbeat answer: a new snapshot goes out, and this one lands
    assert net.count_sent(type=MessageType.SNAP) == 2
    assert net.node(3).restored == [net.node(1).storage.snapshot().index]
    assert leader.progress()[3].state == ProgressState.REPLICATE
    assert net.node(3).applied == net.node(1).applied


def test_member_added_after_the_snapshot_waits_for_one_that_names_it() -> None:
    """A learner joins a cluster whose leader has compacted its log. The only snapshot predates
    the learner, which would refuse it: the leader does not send it (no SNAP/APP ping-pong),
    and sends the next snapshot, taken after the change, instead."""
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(5):
        net.propose(1, b"w%d" % i)
    net.deliver_all()
    net.compact(1)
    net.add_node(4)
    net.conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.deliver_all()
    net.propose(1, b"x")
    net.deliver_all(limit=1000)  # goes quiet
    net.run(3)
    assert net.count_sent(type=MessageType.SNAP) == 0
    assert net.node(4).applied == []
    net.compact(1)  # the application takes a snapshot of the new configuration
    assert 4 in net.node(1).storage.snapshot().conf_state.learners
    net.run(2)
    assert net.count_sent(type=MessageType.SNAP, to=4) == 1
    assert net.node(4).restored == [net.node(1).storage.snapshot().index]
    assert net.node(4).applied_data() == [b"w0", b"w1", b"w2", b"w3", b"w4", b"x"]
    assert net.core(1).progress()[4].state == ProgressState.REPLICATE
