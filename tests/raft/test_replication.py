"""Log replication (Raft paper section 5.3): entries reach every follower, and figure 7's
divergent follower logs are repaired to exactly the leader's log."""

from __future__ import annotations

from grozd.raft.core import MemoryStorage, MessageType

from .harness import Network, preload


def test_proposals_are_replicated_committed_and_applied_in_order() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(5):
        net.propose(1, b"x%d" % i)
    net.propose(2, b"via-follower")  # forwarded to the leader
    net.deliver_all()
    expected = [b"x0", b"x1", b"x2", b"x3", b"x4", b"via-follower"]
    for nid in (1, 2, 3):
        assert net.node(nid).applied_data() == expected
        assert net.log(nid) == net.log(1)
        assert net.core(nid).committed == 7


# Figure 7: the leader at the top (it is about to lead term 8) and six possible followers.
LEADER_LOG = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FOLLOWER_LOGS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],  # missing one entry
    "b": [1, 1, 1, 4],  # missing many
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # an extra uncommitted entry
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # extra entries of a later term
    "e": [1, 1, 1, 4, 4, 4, 4],  # missing entries and extra ones of term 4
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # a leader of terms 2 and 3 that never committed
}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_figure7_follower_logs_are_repaired_to_the_leaders_log() -> None:
    names = list(FOLLOWER_LOGS)
    ids = {name: i + 2 for i, name in enumerate(names)}  # leader is node 1, a..f are 2..7
    storages = {1: MemoryStorage()}
    preload(storages[1], LEADER_LOG, term=7)
    for name, terms in FOLLOWER_LOGS.items():
        storages[ids[name]] = MemoryStorage()
        preload(storages[ids[name]], terms, term=7)
    net = Network(range(1, 8), storages=storages)
    net.elect(1)
    leader = net.core(1)
    assert leader.term == 8
    # c and d hold logs more up-to-date than the leader's and refused to vote; a, b, e and f
    # made the majority.
    refused = {m.frm for m in net.delivered if m.type == MessageType.VOTE_RESP and m.reject}
    assert refused == {ids["c"], ids["d"]}
    net.deliver_all()
    expected = [*LEADER_LOG, 8]
    assert net.terms(1) == expected
    for name in names:
        nid = ids[name]
        assert net.terms(nid) == expected, name
        assert net.log(nid) == net.log(1), name
        assert net.core(nid).committed == len(expected)
    assert leader.committed == len(expected)

    # Round trips to find the match point: one per rejected append, plus the accepted one.
    # The naive back-off moves next back by one index per rejection, from the leader's last
    # index + 1 down to just past the longest common prefix.
    fast: dict[str, int] = {}
    naive: dict[str, int] = {}
    for name in names:
        nid = ids[name]
        rejects = [m for m in net.delivered
                   if m.frm == nid and m.type == MessageType.APP_RESP and m.reject]
        fast[name] = len(rejects) + 1
        naive[name] = len(LEADER_LOG) + 1 - common_prefix(LEADER_LOG, FOLLOWER_LOGS[name])
    assert naive == {"a": 2, "b": 7, "c": 1, "d": 1, "e": 6, "f": 8}
    assert fast == {"a": 2, "b": 2, "c": 1, "d": 1, "e": 2, "f": 2}
    assert all(fast[n] <= naive[n] for n in names)
    assert sum(fast.values()) < sum(naive.values())



def test_leader_counts_its_own_entry_only_once_persisted() -> None:
    """With node 3 away, index 2 needs the leader's own copy: a follower's acknowledgement
    that arrives before the leader has persisted the entry does not commit it."""
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(3)
    leader = net.core(1)
    leader.propose(b"x")
    rd = leader.ready()  # taken, not yet persisted
    [app] = [m for m in rd.messages if m.to == 2]
    net.step(2, app)  # the follower persists and answers
    [ack] = net.pending(frm=2, type=MessageType.APP_RESP)
    assert ack.index == 2
    net.drop_pending()
    leader.step(ack)
    assert leader.committed == 1  # one copy out of three on disk
    net.node(1).storage.append(rd.entries)
    leader.advance()
    assert leader.committed == 2
