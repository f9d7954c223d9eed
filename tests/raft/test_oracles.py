"""The core's small pieces against naive oracles, on seeded random inputs: the quorum commit
index, and the in-flight window (by count and by bytes). Both are driven through a real
leader by stepping hand-made append responses into it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from grozd.raft.core import MemoryStorage, Message, MessageType, ProgressState, Role

from .harness import Network, app_resp, preload

OVERHEAD = 24


def oracle_commit(matches: list[int], quorum: int, committed: int, term_of: list[int],
                  term: int, unsafe: bool) -> int:
    """Sort the match indexes, take the one a quorum has reached; it commits if it is newer
    and (the figure-8 rule) of the current term."""
    q = sorted(matches, reverse=True)[quorum - 1]
    if q > committed and (unsafe or term_of[q] == term):
        return q
    return committed


@pytest.mark.parametrize("unsafe", [False, True])
def test_commit_index_matches_the_quorum_oracle_on_random_match_vectors(unsafe: bool) -> None:
    rng = random.Random(7)
    for _trial in range(150):
        size = rng.choice([1, 2, 3, 4, 5, 6, 7])
        ids = list(range(1, size + 1))
        old = sorted(rng.choice([1, 2, 3]) for _ in range(rng.randrange(0, 6)))
        storages = {i: MemoryStorage() for i in ids}
        for s in storages.values():
            preload(s, old, term=3)
        net = Network(ids, storages=storages, unsafe_commit_previous_term=unsafe)
        net.elect(1, settle=False)
        net.drop_pending()  # followers hear nothing: their progress is what we step in
        leader = net.core(1)
        assert leader.role == Role.LEADER
        for _ in range(rng.randrange(0, 5)):
            net.propose(1, b"x")
        net.drop_pending()
        log = leader.log_entries()
        term_of = [0] + [e.term for e in log]
        last = len(log)
        committed = leader.committed
        matches = {i: 0 for i in ids}
        matches[1] = last  # the leader's own entries are persisted (the harness did it)
        for _ in range(3 * size):
            if size == 1:
                break
            f = rng.choice(ids[1:])
            index = rng.randrange(0, last + 1)
            net.step(1, app_resp(f, 1, leader.term, index))
            net.drop_pending()
            matches[f] = max(matches[f], index)
            committed = oracle_commit(list(matches.values()), size // 2 + 1, committed,
                                      term_of, leader.term, unsafe)
            assert leader.committed == committed, (size, old, matches)
        if size == 1:
            assert leader.committed == last  # a lone voter commits its own entries


@dataclass
class WindowOracle:
    """The leader's sending to one replicating follower, naively: the window is a list of
    (index, bytes) sent and not acknowledged; one entry per message."""

    cap: int
    max_bytes: int  # 0: unlimited
    last: int  # the leader's last index
    match: int  # the follower's acknowledged index
    sent_upto: int = 0  # every entry up to here has been sent
    sizes: dict[int, int] = field(default_factory=dict)  # index -> bytes of the entry
    out: list[tuple[int, int]] = field(default_factory=list)

    def full(self) -> bool:
        total = sum(b for _, b in self.out)
        return len(self.out) >= self.cap or (self.max_bytes > 0 and total >= self.max_bytes)

    def send_one(self) -> list[int]:
        if self.full() or self.sent_upto >= self.last:
            return []
        self.sent_upto += 1
        self.out.append((self.sent_upto, self.sizes[self.sent_upto]))
        return [self.sent_upto]

    def propose(self, nbytes: int) -> list[int]:
        """A new entry goes out at once if the window has room."""
        self.last += 1
        self.sizes[self.last] = nbytes
        return self.send_one()

    def ack(self, index: int) -> list[int]:
        """An acknowledgement frees the window up to index, then it is filled again."""
        if index <= self.match:
            return []
        self.match = index
        self.out = [(i, b) for i, b in self.out if i > index]
        sent: list[int] = []
        while more := self.send_one():
            sent += more
        return sent

    def heartbeat(self) -> list[int]:
        """A heartbeat answer frees one slot of a full window, and resumes sending."""
        if self.full():
            self.out = self.out[1:]
        return self.send_one() if self.match < self.last else []


def sent_entries(net: Network) -> list[int]:
    """Indexes carried by queued appends to node 2 (one entry per message here); drops all."""
    appends = [m for m in net.queue if m.type == MessageType.APP and m.to == 2]
    assert all(len(m.entries) <= 1 for m in appends)
    net.drop_pending()
    return [e.index for m in appends for e in m.entries]


@pytest.mark.parametrize("cap,max_bytes", [(1, 0), (2, 0), (4, 0), (256, 100), (3, 150),
                                           (256, 1)])
def test_inflight_window_matches_the_oracle(cap: int, max_bytes: int) -> None:
    rng = random.Random(cap * 1000 + max_bytes)
    for _trial in range(12):
        net = Network([1, 2], max_msg_bytes=1, max_inflight=cap, max_inflight_bytes=max_bytes)
        net.elect(1)
        leader = net.core(1)
        assert leader.progress()[2].state == ProgressState.REPLICATE
        last = leader.log_entries()[-1].index
        oracle = WindowOracle(cap, max_bytes, last=last, match=last, sent_upto=last)
        for _ in range(60):
            op = rng.random()
            if op < 0.45:
                data = b"d" * rng.choice([0, 10, 50, 150])
                net.propose(1, data)
                expected = oracle.propose(len(data) + OVERHEAD)
            elif op < 0.85 and oracle.out:
                index = rng.choice(oracle.out)[0]
                net.step(1, app_resp(2, 1, leader.term, index))
                expected = oracle.ack(index)
            else:
                net.step(1, Message(type=MessageType.HEARTBEAT_RESP, to=1, frm=2,
                                    term=leader.term))
                expected = oracle.heartbeat()
            assert sent_entries(net) == expected
            assert leader.progress()[2].inflight_count == len(oracle.out)
