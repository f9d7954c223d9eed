"""Figure 8 of the Raft paper (section 5.4.2): a leader may not commit an entry of a previous
term by counting its replicas; it commits it only through an entry of its own term.

Five servers S1..S5 are nodes 1..5. Check-quorum is off so that the leases of crashed leaders
do not get in the way of the script (the lease is tested on its own elsewhere); one entry per
append message so that replication can be stopped between two entries.
"""

from __future__ import annotations

from grozd.raft.core import MemoryStorage, Role

from .harness import Network, preload

IDS = [1, 2, 3, 4, 5]


def start(unsafe: bool) -> Network:
    storages = {i: MemoryStorage() for i in IDS}
    for s in storages.values():
        preload(s, [1], term=1, commit=1)  # index 1, term 1: committed everywhere
    return Network(IDS, storages=storages, check_quorum=False, max_msg_bytes=1,
                   unsafe_commit_previous_term=unsafe)


def entry(net: Network, nid: int, index: int) -> tuple[int, int]:
    """(index, term) of a node's entry at index."""
    e = net.core(nid).log_entries(index)[0]
    return e.index, e.term


def figure8_c(unsafe: bool = False) -> Network:
    """Play figure 8 (a)-(c) and stop at (c): S1 leads term 4 and has just learned that S3
    holds index 2 (term 2), so index 2 sits on S1, S2 and S3, a majority."""
    net = start(unsafe)
    # (a) S1 leads term 2; its entry at index 2 reaches S2 only.
    net.elect(1, settle=False)
    assert net.core(1).term == 2
    net.partition([1, 2], [3, 4, 5])
    net.deliver_all()
    assert [len(net.log(i)) for i in IDS] == [2, 2, 1, 1, 1]
    assert net.core(1).committed == 1
    # (b) S1 crashes; S5 leads term 3 with votes from S3, S4 and itself, appends index 2 in
    # term 3 and crashes before sending it.
    net.crash(1)
    net.partition([2, 3, 4, 5])
    net.elect(5, settle=False)
    assert net.core(5).term == 3
    assert entry(net, 5, 2) == (2, 3)
    net.crash(5)
    # (c) S5 down, S1 restarts and leads term 4 (S4 votes for it, then is cut off); S2 takes
    # its term-4 entry at index 3, S3 gets index 2 of term 2.
    net.restart(1)
    net.partition([1, 2, 3, 4])
    net.elect(1, settle=False)
    leader = net.core(1)
    assert leader.role == Role.LEADER and leader.term == 4
    net.partition([1, 2, 3])
    net.deliver_until(lambda: leader.progress()[3].match >= 2)
    return net


def holders(net: Network, index: int, term: int) -> set[int]:
    """Up nodes whose log holds (index, term)."""
    out = set()
    for nid, node in net.nodes.items():
        if node.core is None:
            continue
        ents = node.core.log_entries(index)
        if ents and ents[0].index == index and ents[0].term == term:
            out.add(nid)
    return out


def test_figure8_previous_term_entry_is_not_committed_by_counting_replicas() -> None:
    net = figure8_c()
    leader = net.core(1)
    assert holders(net, 2, 2) == {1, 2, 3}  # a majority of five
    assert holders(net, 3, 4) == {1, 2}  # the entry of term 4 is not (yet) on a majority
    matches = {nid: pr.match for nid, pr in leader.progress().items()}
    assert sorted(matches.values(), reverse=True)[2] >= 2  # the leader knows it
    assert leader.committed == 1  # ... and still does not commit it
    # (d) S1 crashes; S5 restarts and is elected with the votes of S3 and S4 (their last
    # entries, of term 2 and 1, are older than its term-3 one) and overwrites index 2.
    net.crash(1)
    net.restart(5)
    net.partition([2, 3, 4, 5])
    net.elect(5)
    net.deliver_all()
    assert net.core(5).term == 5
    assert holders(net, 2, 3) >= {3, 4, 5}
    assert net.core(5).committed >= 3
    # That was legal: no one ever applied the overwritten entry.
    for nid in IDS:
        assert (2, 2) not in [(e.index, e.term) for e in net.node(nid).applied]
    # S1 comes back and its log is repaired like everyone's.
    net.restart(1)
    net.heal()
    net.propose(5, b"after")
    net.run(2)  # a heartbeat resumes the probe that was lost while S1 was down
    for nid in IDS:
        assert net.log(nid) == net.log(5)
        assert net.node(nid).applied == net.node(5).applied
        assert entry(net, nid, 2) == (2, 3)


def test_figure8_previous_term_entry_commits_with_an_entry_of_the_current_term() -> None:
    net = figure8_c()
    leader = net.core(1)
    assert leader.committed == 1
    # (e) S1 replicates its term-4 entry to S3 too: a majority holds an entry of the current
    # term, which commits it and, with it, index 2 of term 2.
    net.deliver_all()
    assert holders(net, 3, 4) == {1, 2, 3}
    assert leader.committed == 3
    assert [(e.index, e.term) for e in net.node(1).applied] == [(1, 1), (2, 2), (3, 4)]
    # Now S5 can no longer be elected: S2 and S3 hold a newer log than its.
    net.crash(1)
    net.restart(5)
    net.partition([2, 3, 4, 5])
    for _ in range(3):
        net.campaign(5)
        net.deliver_all()
    assert net.core(5).role != Role.LEADER
    assert holders(net, 2, 2) >= {2, 3}


def test_figure8_without_the_rule_a_committed_entry_is_lost() -> None:
    """unsafe_commit_previous_term=True: the same script commits index 2 at (c) by counting
    replicas; S1 applies it; then (d) overwrites it and a different entry commits at index 2."""
    net = figure8_c(unsafe=True)
    leader = net.core(1)
    assert leader.committed == 2  # committed early, by counting
    assert (2, 2) in [(e.index, e.term) for e in net.node(1).applied]
    net.crash(1)
    net.restart(5)
    net.partition([2, 3, 4, 5])
    net.elect(5)
    net.deliver_all()
    # State machine safety is broken: S1 and S5 applied different entries at index 2.
    applied1 = {e.index: e.term for e in net.node(1).applied}
    applied5 = {e.index: e.term for e in net.node(5).applied}
    assert applied1[2] == 2
    assert applied5[2] == 3
