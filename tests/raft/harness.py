"""A scripted network of Raft cores for deterministic scenario tests.

Every core has a MemoryStorage and a seeded `random.Random`. Nothing is delivered unless a test
says so: messages wait in one FIFO queue, and `deliver_all()` hands them over one at a time
(processing the receiver's Ready after each) until the network is quiet. Partitions are checked
at delivery, so a test can cut a link while messages are still in flight. Each node processes a
Ready as a real node would: persist (snapshot, entries, hard state) to its storage, queue the
messages, apply the committed entries to a per-node list, then advance().
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from grozd.raft.core import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDroppedError,
    Raft,
    ReadState,
    Ready,
    Role,
)

ELECTION_TICK = 10
SEED = 20240601

MessageFilter = Callable[[Message], bool]


def encode_state(entries: list[Entry]) -> bytes:
    """Snapshot payload: the applied entries themselves (a tiny, exact state machine)."""
    return json.dumps([[e.term, e.index, e.type, e.data.hex()] for e in entries]).encode()


def decode_state(data: bytes) -> list[Entry]:
    """Inverse of encode_state."""
    if not data:
        return []
    return [Entry(t, i, bytes.fromhex(d), ty) for t, i, ty, d in json.loads(data)]


def preload(storage: MemoryStorage, terms: Iterable[int], term: int = 0, vote: int = 0,
            commit: int = 0) -> None:
    """Write a log (entry i+1 has terms[i]) and a hard state straight into storage."""
    ents = [Entry(t, i + 1, b"") for i, t in enumerate(terms)]
    storage.append(ents)
    storage.set_hard_state(HardState(term, vote, commit))


@dataclass
class Node:
    """One member: its core, what it persisted, applied and was told."""

    id: int
    storage: MemoryStorage
    bootstrap: ConfState
    kwargs: dict[str, Any]
    seed: int
    core: Raft | None = None
    applied: list[Entry] = field(default_factory=list)  # the state machine
    reads: list[ReadState] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)  # indexes of snapshots from a Ready

    def start(self) -> None:
        """(Re)build the core from storage: hard state, entries and snapshot survive."""
        snap = self.storage.snapshot()
        self.storage.set_conf_state(snap.conf_state if snap.index else self.bootstrap)
        self.applied = decode_state(snap.data) if snap.index else []
        self.core = Raft(self.id, self.storage, random.Random(self.seed), applied=snap.index,
                         **self.kwargs)

    def applied_index(self) -> int:
        """The last index the state machine holds (its snapshot's when it applied nothing)."""
        return self.applied[-1].index if self.applied else self.storage.snapshot().index

    def applied_data(self) -> list[bytes]:
        """Data of the applied normal entries, empty ones (leader no-ops) left out."""
        return [e.data for e in self.applied if e.type == EntryType.NORMAL and e.data]


class Network:
    """N cores and a controllable network between them."""

    def __init__(self, ids: Iterable[int], *, voters: Iterable[int] | None = None,
                 learners: Iterable[int] = (), seed: int = SEED,
                 storages: dict[int, MemoryStorage] | None = None,
                 auto_report_snapshot: bool = True, **raft_kwargs: Any) -> None:
        """ids: the nodes; voters/learners: the bootstrap configuration (default: all voters).

        auto_report_snapshot: report each snapshot message to its sender as streamed when
        delivered, as failed when lost to a cut or a crash (drop_pending reports nothing).

        raft_kwargs go to every Raft (election_tick defaults to ELECTION_TICK).
        """
        ids = list(ids)
        self.bootstrap = ConfState(list(voters) if voters is not None else ids, learners)
        raft_kwargs.setdefault("election_tick", ELECTION_TICK)
        self.kwargs = raft_kwargs
        self.seed = seed
        self.nodes: dict[int, Node] = {}
        self.queue: list[Message] = []
        self.sent: list[Message] = []  # every message ever sent, in order
        self.delivered: list[Message] = []
        self.blocked: set[tuple[int, int]] = set()
        self.filters: list[MessageFilter] = []  # a message matching any filter is dropped
        self.auto_report_snapshot = auto_report_snapshot
        self.leaders: dict[int, int] = {}  # term -> the one node that led it
        for i in ids:
            self.add_node(i, storage=(storages or {}).get(i))

    # ---- membership of the network (not of the Raft configuration) ----------------------

    def add_node(self, nid: int, storage: MemoryStorage | None = None,
                 bootstrap: ConfState | None = None, **raft_kwargs: Any) -> Node:
        """Start a node; a joiner gets the bootstrap configuration and learns the rest."""
        kwargs = {**self.kwargs, **raft_kwargs}
        node = Node(nid, storage if storage is not None else MemoryStorage(),
                    bootstrap if bootstrap is not None else self.bootstrap, kwargs,
                    self.seed * 1000 + nid)
        self.nodes[nid] = node
        node.start()
        return node

    def crash(self, nid: int) -> None:
        """Stop a node: storage survives, the core and its queued messages do not."""
        self.nodes[nid].core = None
        lost = [m for m in self.queue if m.frm == nid or m.to == nid]
        self.queue = [m for m in self.queue if m.frm != nid and m.to != nid]
        for m in lost:
            self.lost(m)

    def restart(self, nid: int) -> Raft:
        """Rebuild a node's core from its storage."""
        node = self.nodes[nid]
        node.start()
        self.process(nid)
        return node.core

    # ---- accessors --------------------------------------------------------------------

    def core(self, nid: int) -> Raft:
        core = self.nodes[nid].core
        assert core is not None, f"node {nid} is down"
        return core

    def node(self, nid: int) -> Node:
        return self.nodes[nid]

    def leader(self) -> int | None:
        """The up node that is leader in the highest term, if any."""
        best: tuple[int, int] | None = None
        for nid, node in self.nodes.items():
            if node.core is not None and node.core.role == Role.LEADER:
                if best is None or node.core.term > best[0]:
                    best = (node.core.term, nid)
        return best[1] if best else None

    def log(self, nid: int) -> list[tuple[int, int, bytes]]:
        """(index, term, data) of every entry the node holds (stable or not)."""
        return [(e.index, e.term, e.data) for e in self.core(nid).log_entries()]

    def terms(self, nid: int) -> list[int]:
        return [e.term for e in self.core(nid).log_entries()]

    def pending(self, *, to: int | None = None, frm: int | None = None,
                type: int | None = None) -> list[Message]:
        """Queued messages matching all the given fields."""
        return [m for m in self.queue if (to is None or m.to == to)
                and (frm is None or m.frm == frm) and (type is None or m.type == type)]

    def count_sent(self, *, to: int | None = None, frm: int | None = None,
                   type: int | None = None, since: int = 0) -> int:
        return sum(1 for m in self.sent[since:] if (to is None or m.to == to)
                   and (frm is None or m.frm == frm) and (type is None or m.type == type))

    # ---- the network ------------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        """Drop everything between a and b, both ways."""
        self.blocked |= {(a, b), (b, a)}

    def isolate(self, *nids: int) -> None:
        """Cut each of nids from every other node."""
        for n in nids:
            for other in self.nodes:
                if other != n:
                    self.cut(n, other)

    def partition(self, *groups: Iterable[int]) -> None:
        """Only nodes in the same group talk; nodes in no group are isolated."""
        self.heal()
        sets = [set(g) for g in groups]
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in s and b in s for s in sets):
                    self.blocked.add((a, b))

    def heal(self) -> None:
        """Remove every cut (filters stay)."""
        self.blocked.clear()

    def drop_pending(self, pred: MessageFilter | None = None) -> int:
        """Drop queued messages matching pred (all by default); returns how many."""
        before = len(self.queue)
        self.queue = [m for m in self.queue if pred is not None and not pred(m)]
        return before - len(self.queue)

    def deliver_one(self) -> Message | None:
        """Deliver (or drop) the oldest queued message; returns it, or None if none."""
        if not self.queue:
            return None
        m = self.queue.pop(0)
        node = self.nodes.get(m.to)
        if (node is None or node.core is None or (m.frm, m.to) in self.blocked
                or any(f(m) for f in self.filters)):
            self.lost(m)
            return m
        self.delivered.append(m)
        node.core.step(m.copy())
        self.process(m.to)
        if m.type == MessageType.SNAP and self.auto_report_snapshot:
            # The transport tells the sender once a snapshot has been streamed in full.
            sender = self.nodes[m.frm].core
            if sender is not None:
                sender.report_snapshot(m.to, False)
                self.process(m.frm)
        return m

    def lost(self, m: Message) -> None:
        """A transport knows when a snapshot could not be streamed, and says so."""
        if m.type == MessageType.SNAP and self.auto_report_snapshot:
            sender = self.nodes[m.frm].core
            if sender is not None:
                sender.report_snapshot(m.to, True)
                self.process(m.frm)

    def deliver_all(self, limit: int = 100_000) -> int:
        """Deliver until the network is quiet; returns the number of messages handled."""
        n = 0
        while self.queue:
            self.deliver_one()
            n += 1
            assert n < limit, "the network never went quiet"
        return n

    def deliver_until(self, cond: Callable[[], bool], limit: int = 100_000) -> None:
        """Deliver one message at a time until cond() holds (checked before each)."""
        n = 0
        while not cond():
            assert self.queue, "the network went quiet before the condition held"
            self.deliver_one()
            n += 1
            assert n < limit, "condition never held"

    # ---- driving the cores ------------------------------------------------------------

    def process(self, nid: int) -> None:
        """Handle every Ready of a node: persist, queue messages, apply, advance."""
        node = self.nodes[nid]
        core = node.core
        if core is None:
            return
        while core.has_ready():
            rd: Ready = core.ready()
            if rd.snapshot is not None:
                node.storage.apply_snapshot(rd.snapshot)
                node.applied = decode_state(rd.snapshot.data)
                node.restored.append(rd.snapshot.index)
            if rd.entries:
                node.storage.append(rd.entries)
            if rd.hard_state is not None:
                node.storage.set_hard_state(rd.hard_state)
            if rd.soft_state is not None and rd.soft_state.role == Role.LEADER:
                other = self.leaders.setdefault(core.term, nid)
                assert other == nid, f"nodes {other} and {nid} both lead term {core.term}"
            for m in rd.messages:
                self.sent.append(m)
                self.queue.append(m)
            for e in rd.committed_entries:
                last = node.applied_index()
                if e.index <= last:
                    continue  # already part of the restored snapshot
                assert e.index == last + 1, f"node {nid} applies {e.index} after {last}"
                node.applied.append(e)
            node.reads.extend(rd.read_states)
            core.advance()

    def tick(self, n: int = 1, ids: Iterable[int] | None = None, deliver: bool = False) -> None:
        """Tick the given (default: all up) nodes n times; optionally deliver after each."""
        for _ in range(n):
            for nid in list(ids) if ids is not None else list(self.nodes):
                node = self.nodes[nid]
                if node.core is None:
                    continue
                node.core.tick()
                self.process(nid)
            if deliver:
                self.deliver_all()

    def run(self, ticks: int, ids: Iterable[int] | None = None) -> None:
        """ticks rounds of: tick everyone (or ids) once, then deliver until quiet."""
        self.deliver_all()
        ids = list(ids) if ids is not None else None
        self.tick(ticks, ids, deliver=True)

    def campaign(self, nid: int) -> None:
        """Start an election on nid now (messages are queued, not delivered)."""
        self.core(nid).campaign_now()
        self.process(nid)

    def elect(self, nid: int, tries: int = 3, settle: bool = True) -> None:
        """Campaign on nid and deliver, retrying (a rejection may teach it a newer term),
        until it leads. settle=False stops delivering the moment it leads, leaving its first
        appends queued; otherwise the network is left quiet."""
        for _ in range(tries):
            self.campaign(nid)
            core = self.core(nid)
            while self.queue and core.role != Role.LEADER:
                self.deliver_one()
            if core.role == Role.LEADER:
                if settle:
                    self.deliver_all()
                return
            self.deliver_all()
        raise AssertionError(f"node {nid} did not win an election: role {self.core(nid).role}")

    def propose(self, nid: int, data: bytes) -> None:
        """Propose on nid (raises ProposalDroppedError); messages are queued."""
        self.core(nid).propose(data)
        self.process(nid)

    def propose_many(self, nid: int, datas: list[bytes]) -> None:
        self.core(nid).propose_many(datas)
        self.process(nid)

    def try_propose(self, nid: int, data: bytes) -> bool:
        """Propose, and say whether the core accepted it."""
        try:
            self.propose(nid, data)
        except ProposalDroppedError:
            return False
        return True

    def conf_change(self, nid: int, cc: ConfChange) -> None:
        self.core(nid).propose_conf_change(cc)
        self.process(nid)

    def read_index(self, nid: int, ctx: bytes) -> None:
        self.core(nid).read_index(ctx)
        self.process(nid)

    def transfer(self, nid: int, to: int) -> None:
        self.core(nid).transfer_leadership(to)
        self.process(nid)

    def step(self, nid: int, m: Message) -> None:
        """Step a hand-made message into a node and process its Ready."""
        self.core(nid).step(m)
        self.process(nid)

    def compact(self, nid: int, index: int | None = None) -> None:
        """Snapshot a node's state machine at index (default: applied) and drop the log up
        to it."""
        node = self.nodes[nid]
        core = self.core(nid)
        index = core.applied if index is None else index
        state = [e for e in node.applied if e.index <= index]
        node.storage.create_snapshot(index, core.conf_state(), encode_state(state))
        node.storage.compact(index)


def vote_request(frm: int, to: int, term: int, index: int, log_term: int,
                 context: bytes | None = None) -> Message:
    """A hand-made vote request."""
    return Message(type=MessageType.VOTE, to=to, frm=frm, term=term, index=index,
                   log_term=log_term, context=context)


def app_resp(frm: int, to: int, term: int, index: int) -> Message:
    """A hand-made successful append response (the follower holds up to index)."""
    return Message(type=MessageType.APP_RESP, to=to, frm=frm, term=term, index=index)
