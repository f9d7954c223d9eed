"""Flow control: the in-flight window of a replicating follower, batching of appends by
max_msg_bytes, and one append per round trip to a follower in probe state."""

from __future__ import annotations

from grozd.raft.core import MemoryStorage, Message, MessageType, ProgressState

from .harness import Network, preload

OVERHEAD = 24  # the core's per-entry cost on top of the data when sizing messages


def appends_with_entries(net: Network, to: int) -> list[Message]:
    return [m for m in net.queue if m.to == to and m.type == MessageType.APP and m.entries]


def test_max_inflight_caps_unacknowledged_appends_to_a_replicating_follower() -> None:
    net = Network([1, 2, 3], max_inflight=2)
    net.elect(1)
    leader = net.core(1)
    assert leader.progress()[2].state == ProgressState.REPLICATE
    for i in range(6):
        net.propose(1, b"e%d" % i)
    # Six proposals, each would go out at once: only two appends leave before an answer.
    assert [len(m.entries) for m in appends_with_entries(net, 2)] == [1, 1]
    assert leader.progress()[2].inflight_count == 2
    peak = 0
    while net.queue:
        net.deliver_one()
        # Appends on the wire to 2, plus those 2 received and has not had acknowledged yet.
        unacked = len(appends_with_entries(net, 2)) + len(
            [m for m in net.queue if m.frm == 2 and m.type == MessageType.APP_RESP])
        peak = max(peak, unacked)
        assert leader.progress()[2].inflight_count <= 2
    assert peak == 2
    assert net.node(2).applied_data() == [b"e%d" % i for i in range(6)]


def test_propose_many_goes_out_in_one_append_when_it_fits() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    since = len(net.sent)
    batch = [b"%010d" % i for i in range(64)]
    net.propose_many(1, batch)
    net.deliver_all()
    sent = [m for m in net.sent[since:] if m.to == 2 and m.type == MessageType.APP and m.entries]
    assert len(sent) == 1
    assert [e.data for e in sent[0].entries] == batch
    assert net.node(2).applied_data() == batch


def test_propose_many_is_split_by_max_msg_bytes() -> None:
    per_entry = 10 + OVERHEAD
    net = Network([1, 2, 3], max_msg_bytes=8 * per_entry)
    net.elect(1)
    since = len(net.sent)
    batch = [b"%010d" % i for i in range(64)]
    net.propose_many(1, batch)
    net.deliver_all()
    sent = [m for m in net.sent[since:] if m.to == 2 and m.type == MessageType.APP and m.entries]
    assert len(sent) == 8
    for m in sent:
        assert sum(len(e.data) + OVERHEAD for e in m.entries) <= 8 * per_entry
    assert [e.data for m in sent for e in m.entries] == batch
    assert net.node(2).applied_data() == batch


def test_follower_in_probe_state_gets_one_append_per_round_trip() -> None:
    storages = {i: MemoryStorage() for i in (1, 2, 3)}
    preload(storages[1], [1, 1, 3, 3, 3, 3], term=3)
    preload(storages[2], [1, 1, 3, 3, 3, 3], term=3)
    preload(storages[3], [1, 1, 2, 2, 2, 2, 2, 2], term=3)  # a diverged tail
    net = Network([1, 2, 3], storages=storages)
    net.elect(1, settle=False)
    leader = net.core(1)
    assert leader.progress()[3].state == ProgressState.PROBE
    assert len(net.pending(to=3, type=MessageType.APP)) == 1
    for i in range(3):
        net.propose(1, b"p%d" % i)
    # The proposals wait: one probe at a time.
    assert len(net.pending(to=3, type=MessageType.APP)) == 1
    probes = 1
    while leader.progress()[3].state == ProgressState.PROBE:
        in_flight = len(net.pending(to=3, type=MessageType.APP)) + len(
            net.pending(frm=3, type=MessageType.APP_RESP))
        assert in_flight <= 1
        m = net.deliver_one()
        assert m is not None
        if m.frm == 3 and m.type == MessageType.APP_RESP and m.reject:
            probes += 1  # the answer came back: the next probe may leave
    assert probes == 2  # the reject hint skipped the whole term-2 tail in one step
    net.deliver_all()
    assert net.log(3) == net.log(1)
    assert net.node(3).applied_data() == [b"p0", b"p1", b"p2"]


def test_caught_up_follower_in_probe_state_returns_to_replicate() -> None:
    """Node 2 holds everything when the leader drops it to probe (a transport reported it
    unreachable); a later commit sends it an empty probe. Its answer (index == match) must put
    it back to replicate, not trigger another empty probe, and another, for ever."""
    net = Network([1, 2, 3, 4, 5])
    net.elect(1)
    leader = net.core(1)
    net.propose(1, b"x")
    last = leader.log_entries()[-1].index
    net.deliver_until(lambda: leader.progress()[2].match == last)
    assert leader.committed < last  # 1 and 2 are not a quorum of five
    leader.report_unreachable(2)
    net.process(1)
    assert leader.progress()[2].state == ProgressState.PROBE
    net.deliver_all(limit=1000)  # the others' answers commit x: an empty probe goes to 2
    assert leader.committed == last
    assert leader.progress()[2].state == ProgressState.REPLICATE
    net.propose(1, b"y")
    net.deliver_all()
    assert net.node(2).applied_data() == [b"x", b"y"]
