"""A deterministic simulator: whole clusters of the compiled Raft core in one process.

A seeded scheduler delivers messages late, out of order, twice or never; partitions nodes;
crashes them and restarts them from what they had persisted. Checkers outside the nodes verify
the Raft safety properties after every event. One seed replays a run exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from grozd.raft.core import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDroppedError,
    Raft,
    Ready,
    Role,
    Snapshot,
)

TICK = 10  # scheduler time units per Raft tick: network delays are a fraction of a tick
ELECTION_TICK = 10
GENESIS = b"\0" * 20
MARKER = b"after-heal"  # proposed once the cluster is healed: every voter must apply it


class SafetyViolation(AssertionError):
    """A Raft safety property does not hold."""


class LivenessFailure(AssertionError):
    """A healed cluster did not elect a leader and commit within the bound."""


@dataclass
class Faults:
    """How hostile the network and the machines are during the safety phase."""

    drop: float = 0.05
    duplicate: float = 0.02
    max_delay: int = 8  # time units; a long tail of up to 4x this reorders messages
    partition_every: int = 40  # ticks between partition changes on average (0: never)
    crash_every: int = 60  # ticks between crashes on average (0: never)
    compact_every: int = 12  # applied entries between snapshots on a node (0: never)
    small_messages: bool = False  # one entry per append message, a tiny in-flight window
    membership_every: int = 0  # ticks between membership changes on average (0: never)

    @classmethod
    def random(cls, rng: random.Random) -> Faults:
        """A fault mix drawn from the seed, from gentle to harsh."""
        return cls(
            drop=rng.choice([0.0, 0.02, 0.1, 0.25]),
            duplicate=rng.choice([0.0, 0.02, 0.1]),
            max_delay=rng.choice([2, 8, 20]),
            partition_every=rng.choice([0, 20, 60]),
            crash_every=rng.choice([0, 30, 80]),
            compact_every=rng.choice([0, 5, 20]),
            small_messages=rng.random() < 0.3,
            membership_every=rng.choice([0, 0, 50]),
        )


def chain(prev: bytes, entry: Entry) -> bytes:
    """The state machine: a hash chain over applied entries (order and content both count)."""
    return hashlib.blake2b(
        prev + entry.term.to_bytes(8, "big") + bytes((entry.type,)) + entry.data, digest_size=20
    ).digest()


@dataclass
class Checker:
    """Checks Election Safety, Log Matching, Leader Completeness, State Machine Safety, and
    monotonic commit indexes, from what the nodes persist, apply and report."""

    leaders: dict[int, int] = field(default_factory=dict)  # term -> leader id
    entries: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (index, term) -> data
    prev_terms: dict[tuple[int, int], int] = field(default_factory=dict)  # -> predecessor's term
    applied: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (term, hash)
    commits: dict[int, int] = field(default_factory=dict)  # node -> persisted commit
    max_commit: int = 0

    def fail(self, what: str) -> None:
        raise SafetyViolation(what)

    def on_hard_state(self, node: int, hs: HardState) -> None:
        if hs.commit < self.commits.get(node, 0):
            self.fail(f"node {node} commit index went back from {self.commits[node]}"
                      f" to {hs.commit}")
        self.commits[node] = hs.commit
        self.max_commit = max(self.max_commit, hs.commit)

    def on_leader(self, node: int, term: int, core: Raft) -> None:
        other = self.leaders.setdefault(term, node)
        if other != node:
            self.fail(f"election safety: nodes {other} and {node} both lead term {term}")
        first = core.log.first_index()
        last = core.log.last_index()
        for index, (eterm, _) in self.applied.items():
            if index < first:
                continue  # inside its snapshot, which the snapshot check covers
            if index > last or core.log.term(index) != eterm:
                self.fail(f"leader completeness: leader {node} of term {term} lacks committed"
                          f" entry {index} (term {eterm})")

    def on_persist(self, node: int, entries: list[Entry], prev_term: int | None) -> None:
        """prev_term: the term of the entry before entries[0], None when compacted away."""
        # (index, term) must always name the same entry with the same predecessor term: by
        # induction that is the Log Matching property.
        for e in entries:
            key = (e.index, e.term)
            if self.entries.setdefault(key, e.data + bytes((e.type,))) != e.data + bytes((e.type,)):
                self.fail(f"log matching: node {node} holds a different entry {e.index}"
                          f" in term {e.term}")
            if prev_term is not None and self.prev_terms.setdefault(key, prev_term) != prev_term:
                self.fail(f"log matching: node {node} holds entry {e.index} of term {e.term}"
                          f" after an entry of term {prev_term}, another node after"
                          f" {self.prev_terms[key]}")
            prev_term = e.term

    def on_apply(self, node: int, index: int, term: int, state: bytes) -> None:
        seen = self.applied.setdefault(index, (term, state))
        if seen != (term, state):
            self.fail(f"state machine safety: node {node} applied a different entry at {index}")

    def on_restore(self, node: int, index: int, state: bytes) -> None:
        seen = self.applied.get(index)
        if seen is not None and seen[1] != state:
            self.fail(f"state machine safety: node {node} restored a snapshot at {index}"
                      " that differs from what others applied")


class SimNode:
    """One member: the persisted part (storage) survives a crash, the rest does not."""

    def __init__(self, node_id: int, voters: list[int], seed: int, faults: Faults,
                 unsafe: bool) -> None:
        self.id = node_id
        self.storage = MemoryStorage()
        self.storage.set_conf_state(ConfState(voters))
        self.bootstrap = ConfState(voters)
        self.rng = random.Random(seed)
        self.faults = faults
        self.unsafe = unsafe
        self.core: Raft | None = None
        self.state = GENESIS
        self.state_index = 0
        self.restarts = 0
        self.applied_marker = False

    @property
    def up(self) -> bool:
        return self.core is not None

    def start(self) -> None:
        snap = self.storage.snapshot()
        # Restart from the snapshot: the configuration as of it, the state machine it carries.
        self.storage.set_conf_state(snap.conf_state if snap.index else self.bootstrap)
        self.state_index = snap.index
        self.state = snap.data[8:] if snap.index else GENESIS
        small = self.faults.small_messages
        self.core = Raft(
            self.id, self.storage, self.rng, election_tick=ELECTION_TICK, heartbeat_tick=1,
            applied=snap.index, max_msg_bytes=1 if small else 1 << 20,
            max_inflight=2 if small else 64, unsafe_commit_previous_term=self.unsafe,
        )

    def crash(self) -> None:
        self.core = None
        self.restarts += 1

    def snapshot_data(self) -> bytes:
        return self.state_index.to_bytes(8, "big") + self.state


class Simulation:
    """A seeded run of one cluster: a safety phase under faults, then a liveness phase."""

    def __init__(self, seed: int, nodes: int = 3, faults: Faults | None = None,
                 unsafe_commit_previous_term: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults if faults is not None else Faults.random(self.rng)
        ids = list(range(1, nodes + 1))
        self.nodes = {
            i: SimNode(i, ids, self.rng.randrange(1 << 30), self.faults,
                       unsafe_commit_previous_term)
            for i in ids
        }
        self.checker = Checker()
        self.now = 0
        self.events: list[tuple[int, int, str, object]] = []
        self.seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.read_floor: dict[bytes, int] = {}
        self.proposed = 0
        self.stats = {"delivered": 0, "dropped": 0, "duplicated": 0, "crashes": 0,
                      "partitions": 0, "elections": 0, "snapshots_sent": 0, "reads": 0,
                      "conf_changes": 0}
        for node in self.nodes.values():
            node.start()
            # Desynchronised clocks: each node ticks at its own phase.
            self.schedule(self.rng.randrange(TICK), "tick", node.id)

    # ---- scheduler ------------------------------------------------------------------------

    def schedule(self, at: int, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def send(self, m: Message) -> None:
        f = self.faults
        if (m.frm, m.to) in self.blocked or self.rng.random() < f.drop:
            self.stats["dropped"] += 1
            self.report_lost(m)
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            delay = 1 + self.rng.randrange(f.max_delay)
            if self.rng.random() < 0.05:
                delay *= 4  # a long tail that reorders
            self.schedule(self.now + delay, "deliver", m)

    def report_lost(self, m: Message) -> None:
        # A transport knows when a snapshot could not be sent, and says so to its core.
        if m.type == MessageType.SNAP:
            sender = self.nodes[m.frm]
            if sender.up:
                sender.core.report_snapshot(m.to, True)
                self.process(sender)

    def run_until(self, end: int, faults: bool) -> None:
        while self.events and self.events[0][0] <= end:
            at, _, kind, payload = heapq.heappop(self.events)
            self.now = at
            if kind == "tick":
                self.on_tick(self.nodes[payload], faults)
            elif kind == "deliver":
                self.deliver(payload)
            elif kind == "restart":
                node = self.nodes[payload]
                if not node.up:
                    node.start()
                    self.process(node)
        self.now = end

    def deliver(self, m: Message) -> None:
        node = self.nodes[m.to]
        if not node.up or (m.frm, m.to) in self.blocked:
            self.stats["dropped"] += 1
            self.report_lost(m)
            return
        self.stats["delivered"] += 1
        node.core.step(m.copy())
        self.process(node)
        if m.type == MessageType.SNAP:
            # The transport tells the sender once a snapshot has been streamed in full.
            sender = self.nodes[m.frm]
            if sender.up:
                sender.core.report_snapshot(m.to, False)
                self.process(sender)

    def on_tick(self, node: SimNode, faults: bool) -> None:
        self.schedule(self.now + TICK, "tick", node.id)
        if faults:
            self.maybe_fault()
        if not node.up:
            return
        node.core.tick()
        r = self.rng.random()
        if r < 0.3:
            # Client load only while faulty: afterwards the bound is on the marker's commit.
            if faults:
                self.propose(node)
        elif r < 0.35:
            self.read(node)
        elif faults and self.faults.membership_every and r < 0.35 + 1 / (
                self.faults.membership_every * len(self.nodes)):
            self.change_membership(node)
        self.process(node)

    def maybe_fault(self) -> None:
        f = self.faults
        n = len(self.nodes)
        # Rates are per tick of the whole cluster; on_tick runs once per node per tick.
        if f.partition_every and self.rng.random() < 1 / (f.partition_every * n):
            self.stats["partitions"] += 1
            self.blocked.clear()
            if self.rng.random() < 0.7:
                ids = list(self.nodes)
                self.rng.shuffle(ids)
                cut = self.rng.randrange(1, n)
                a, b = ids[:cut], ids[cut:]
                one_way = self.rng.random() < 0.2
                for x in a:
                    for y in b:
                        self.blocked.add((x, y))
                        if not one_way:
                            self.blocked.add((y, x))
        if f.crash_every and self.rng.random() < 1 / (f.crash_every * n):
            victim = self.nodes[self.rng.choice(list(self.nodes))]
            if victim.up:
                self.stats["crashes"] += 1
                victim.crash()
                self.schedule(self.now + self.rng.randrange(1, 4 * ELECTION_TICK) * TICK,
                              "restart", victim.id)

    def propose(self, node: SimNode) -> None:
        self.proposed += 1
        data = b"p%d" % self.proposed
        try:
            node.core.propose(data)
        except ProposalDroppedError:
            pass

    def read(self, node: SimNode) -> None:
        ctx = b"r%d" % len(self.read_floor)
        # Everything committed before the read starts must be visible at its read index.
        self.read_floor[ctx] = self.checker.max_commit
        try:
            node.core.read_index(ctx)
        except ProposalDroppedError:
            pass

    def change_membership(self, node: SimNode) -> None:
        """Take a random voter out as a learner... or bring a learner/removed node back."""
        core = node.core
        if core.role != Role.LEADER:
            return
        cs = core.conf_state()
        outside = [i for i in self.nodes if i not in cs.voters and i not in cs.learners]
        if cs.learners:
            cc = ConfChange(ConfChangeType.ADD_NODE, self.rng.choice(cs.learners))
        elif outside:
            cc = ConfChange(ConfChangeType.ADD_LEARNER, self.rng.choice(outside))
        elif len(cs.voters) > 3:
            cc = ConfChange(ConfChangeType.REMOVE_NODE, self.rng.choice(cs.voters))
        else:
            return
        try:
            core.propose_conf_change(cc)
            self.stats["conf_changes"] += 1
        except ProposalDroppedError:
            pass

    # ---- one node's Ready: persist, send, apply, advance ---------------------------------

    def process(self, node: SimNode) -> None:
        core = node.core
        while core.has_ready():
            rd: Ready = core.ready()
            self.persist(node, rd)
            for m in rd.messages:
                if m.type == MessageType.SNAP:
                    self.stats["snapshots_sent"] += 1
                self.send(m)
            self.apply(node, rd)
            core.advance()
            self.after_advance(node, rd)

    def persist(self, node: SimNode, rd: Ready) -> None:
        core, storage, check = node.core, node.storage, self.checker
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
            node.state_index = rd.snapshot.index
            node.state = rd.snapshot.data[8:]
            check.on_restore(node.id, rd.snapshot.index, node.state)
        if rd.entries:
            first = rd.entries[0].index
            try:
                prev = core.log.term(first - 1)
            except CompactedError:
                prev = None  # the predecessor is inside the snapshot
            check.on_persist(node.id, rd.entries, prev)
            storage.append(rd.entries)
        if rd.hard_state is not None:
            check.on_hard_state(node.id, rd.hard_state)
            storage.set_hard_state(rd.hard_state)
        if rd.soft_state is not None and rd.soft_state.role == Role.LEADER:
            self.stats["elections"] += 1
            check.on_leader(node.id, core.term, core)

    def apply(self, node: SimNode, rd: Ready) -> None:
        for e in rd.committed_entries:
            if e.index <= node.state_index:
                continue  # already in the restored snapshot
            if e.index != node.state_index + 1:
                raise SafetyViolation(f"node {node.id} applies {e.index} after {node.state_index}")
            node.state = chain(node.state, e)
            node.state_index = e.index
            self.checker.on_apply(node.id, e.index, e.term, node.state)
            if e.data == MARKER:
                node.applied_marker = True
        for rs in rd.read_states:
            self.stats["reads"] += 1
            floor = self.read_floor.get(rs.context, 0)
            if rs.index < floor:
                raise SafetyViolation(f"read index {rs.index} on node {node.id} is below the"
                                      f" commit index {floor} seen before the read began")

    def after_advance(self, node: SimNode, rd: Ready) -> None:
        every = self.faults.compact_every
        if not every or not rd.committed_entries:
            return
        storage = node.storage
        snap: Snapshot = storage.snapshot()
        if node.state_index - snap.index >= every and node.state_index <= storage.last_index():
            storage.create_snapshot(node.state_index, node.core.conf_state(), node.snapshot_data())
            # Keep a few entries behind the snapshot so slow followers need not always get it.
            keep = self.rng.randrange(3)
            target = node.state_index - keep
            if target >= storage.first_index():
                storage.compact(target)

    # ---- the two phases ---------------------------------------------------------------------

    def leader(self) -> SimNode | None:
        best = None
        for node in self.nodes.values():
            if node.up and node.core.role == Role.LEADER:
                if best is None or node.core.term > best.core.term:
                    best = node
        return best

    def heal(self) -> None:
        self.blocked.clear()
        self.faults.drop = 0.0
        self.faults.duplicate = 0.0
        for node in self.nodes.values():
            if not node.up:
                node.start()
                self.process(node)

    def run(self, safety_ticks: int = 300, liveness_ticks: int = 40 * ELECTION_TICK) -> int:
        """Faults for safety_ticks, then heal; returns the ticks the healed cluster needed to
        elect a leader and commit a new proposal on every voter."""
        self.run_until(safety_ticks * TICK, faults=True)
        self.heal()
        start = self.now
        proposed_at: int | None = None
        deadline = start + liveness_ticks * TICK
        while self.now < deadline:
            self.run_until(self.now + TICK, faults=False)
            leader = self.leader()
            if leader is None:
                continue
            if proposed_at is None or self.now - proposed_at > 5 * ELECTION_TICK * TICK:
                try:
                    leader.core.propose(MARKER)
                    proposed_at = self.now
                    self.process(leader)
                except ProposalDroppedError:
                    continue
            voters = leader.core.conf_state().voters
            if all(self.nodes[v].applied_marker for v in voters):
                return (self.now - start) // TICK
        leader = self.leader()
        raise LivenessFailure(
            f"no leader committed a proposal on every voter within {liveness_ticks} ticks after"
            f" healing (leader: {leader.id if leader else None})")


def replay_command(seed: int, nodes: int) -> str:
    return f"grozd sim --seed {seed} --nodes {nodes}"
