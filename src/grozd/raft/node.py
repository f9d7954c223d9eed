"""A Raft member: drives the pure core with real time, disk and network, on one event loop.

Each loop turn's proposals reach the core as one batch, and each Ready is one WAL append and one
fdatasync (group commit; the fdatasync on a thread that never takes the GIL, or on the loop for
a follower while its syncs are quick). Committed entries are applied, and their clients
answered, while the batch's fsync runs: they are on a majority's disks already. A follower's
messages wait for the fsync; a leader's go out at once, since the core counts the leader's copy
only once it is persisted.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import heapq
import json
import logging
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgpack

from grozd.raft.core import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    ProposalDroppedError,
    Raft,
    Ready,
    Role,
    Snapshot,
)
from grozd.raft.snapshot import SnapshotStore
from grozd.raft.syncer import Syncer
from grozd.raft.transport import Transport, fetch_cluster_id
from grozd.raft.wal import WAL, WALWriteError

log = logging.getLogger("grozd.raft.node")

_MAX_FD = 1 << 16
# Zeros kept ahead of the WAL's end: an fdatasync of records written over them took 100 us
# where one that also grew the file took 200 (measured on the machines this runs on).
WAL_PREALLOCATE = 1 << 20
# Entries freed per loop turn when the log is compacted after a snapshot: freeing 95,000 at
# once held the loop for ~9 ms.
COMPACT_STEP = 5000
# A follower fdatasyncs its WAL on the loop while syncs are quick: the hand-off to the sync
# thread and back costs two context switches, more than a short wait (a single client's writes
# were 14% faster). Past this average (seconds) it hands off again, so a slow disk never holds
# the loop; the leader always does, its loop keeps taking requests meanwhile.
INLINE_SYNC_LIMIT = 0.001
_ENVELOPE = struct.Struct(">QQ")  # proposing member, its sequence number; then the payload


class Histogram:
    """Durations in exponential buckets (1 ms doubling to 8 s), as etcd exports them."""

    BOUNDS = tuple(0.001 * 2**i for i in range(14))

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.count += 1
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[i] += 1
                break

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs."""
        running, out = 0, []
        for bound, n in zip(self.BOUNDS, self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class StateMachine(Protocol):
    """What the node replicates: deterministic, fed only committed entries."""

    def apply(self, index: int, data: bytes) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class NodeError(Exception):
    """A proposal or read that did not complete; the message says why and what to do."""


class NoLeaderError(NodeError):
    pass


class ProposalTimeoutError(NodeError):
    pass


# Who waits for a proposal or a read: a future (a coroutine awaiting it), or a callback
# called with (result, error) at once, from apply() itself: no loop turn lies between the
# state machine and the client's answer.
Done = Callable[[object, BaseException | None], None]
Waiter = asyncio.Future | Done


def settle(waiter: Waiter, result: object = None, error: BaseException | None = None) -> None:
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():  # a caller that gave up cancelled it
            if error is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error)
        return
    try:
        waiter(result, error)
    except Exception:  # an answer that fails must not stop the member
        log.exception("event=answer_failed")


def waiting_for(waiter: Waiter) -> bool:
    return not isinstance(waiter, asyncio.Future) or not waiter.done()


class StoppedError(NodeError):
    pass


class StorageFailedError(NodeError):
    pass


class DataDirMismatchError(Exception):
    """The flags describe a different member or cluster than the data dir holds."""


def member_id_for(peer_urls: list[str], token: str) -> int:
    """Member IDs derive from the peer URLs and the cluster token, as in etcd."""
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cluster_id_for(member_ids: list[int]) -> int:
    digest = hashlib.sha1(b"".join(i.to_bytes(8, "big") for i in sorted(member_ids))).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass
class Member:
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str] = field(default_factory=list)
    learner: bool = False

    def context(self, request: tuple[int, int] = (0, 0)) -> bytes:
        return json.dumps({"name": self.name, "peerURLs": self.peer_urls,
                           "clientURLs": self.client_urls, "request": list(request)}).encode()


@dataclass
class NodeConfig:
    name: str = "default"
    data_dir: Path = Path("default.grozd")
    wal_dir: Path | None = None
    listen_peer_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2380"])
    initial_advertise_peer_urls: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:2380"])
    client_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    initial_cluster: dict[str, list[str]] = field(default_factory=dict)  # name -> peer URLs
    initial_cluster_state: str = "new"
    initial_cluster_token: str = "etcd-cluster"
    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000
    snapshot_count: int = 100000  # etcd 3.4's default
    max_snapshots: int = 5
    max_wals: int = 5
    request_timeout: float = 7.0
    snapshot_catchup_entries: int = 5000  # entries kept behind a snapshot for slow followers
    seed: int | None = None  # for the election-timeout generator; None: from os.urandom

    def members(self) -> list[Member]:
        cluster = self.initial_cluster or {self.name: self.initial_advertise_peer_urls}
        return [Member(member_id_for(urls, self.initial_cluster_token), name, list(urls))
                for name, urls in sorted(cluster.items())]

    @property
    def member_id(self) -> int:
        return member_id_for(self.initial_advertise_peer_urls, self.initial_cluster_token)


class RaftNode:
    """One member of a cluster. `await start()`, then propose, read, change membership."""

    def __init__(self, config: NodeConfig, fsm: StateMachine,
                 on_conf_change: Callable[[dict[int, Member]], None] | None = None) -> None:
        self.config = config
        self.fsm = fsm
        self.on_conf_change = on_conf_change
        self.id = config.member_id
        self.cluster_id = 0
        self.members: dict[int, Member] = {}
        self.core: Raft | None = None
        self.storage = MemoryStorage()
        self.wal: WAL | None = None
        self.snapshots: SnapshotStore | None = None
        self.transport: Transport | None = None
        self.applied = 0
        self.snapshot_index = 0
        self.seq = 0
        self.waiting: dict[int, Waiter] = {}
        # (deadline, seq) of proposals, checked on every tick: cheaper than a timer each.
        self.deadlines: list[tuple[float, int]] = []
        # Proposals of this loop turn, handed to the core as one batch: one append message
        # per follower and one answer back, however many clients wrote at once.
        self.queued: list[tuple[int, bytes]] = []
        # Reads as (future, deadline): those of this turn (or waiting for a leader), and the
        # ReadIndex rounds asked of the core: context -> (readers, when it counts as lost).
        self.read_batch: list[tuple[Waiter, float]] = []
        self.reads: dict[bytes, tuple[list[tuple[Waiter, float]], float]] = {}
        self.applied_waiters: list[tuple[int, Waiter, float]] = []
        self.leader_changed = asyncio.Event()
        self.stopped = asyncio.Event()
        self.storage_error: str | None = None
        self.processing = False
        self.process_scheduled = False
        self.ticker: asyncio.TimerHandle | None = None
        self.stats = {"fsyncs": 0, "proposals": 0, "entries_applied": 0, "leader_changes": 0,
                      "snapshots": 0, "readies": 0}
        self.removed = False
        self.fsync_seconds = Histogram()
        self.force_snapshot = False
        self.snapshotting: asyncio.Task[None] | None = None
        self.syncer: Syncer | None = None
        self.wal_pending = False
        self.sync_average = 0.0  # seconds per WAL fdatasync, a moving average
        self.joined_members: list = []
        self.durable_vote = (0, 0)  # (term, vote) as last synced

    # ---- start-up ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        member_dir = Path(cfg.data_dir) / "member"
        wal_dir = Path(cfg.wal_dir) if cfg.wal_dir else member_dir / "wal"
        self.snapshots = SnapshotStore(member_dir / "snap", keep=cfg.max_snapshots)
        rng = random.Random(cfg.seed if cfg.seed is not None else os.urandom(8))
        election_tick = max(2, cfg.election_timeout_ms // cfg.heartbeat_interval_ms)
        if WAL.exists(wal_dir):
            applied = await asyncio.to_thread(self.recover, wal_dir)
        else:
            if cfg.initial_cluster_state == "existing":
                own = set(cfg.initial_advertise_peer_urls)
                others = [u for m in cfg.members() for u in m.peer_urls if u not in own]
                for attempt in range(10):
                    try:
                        self.cluster_id, self.id, known = await fetch_cluster_id(
                            cfg.initial_advertise_peer_urls, others)
                    except ConnectionError as e:
                        raise NodeError(
                            f"cannot join with --initial-cluster-state existing: {e}") from None
                    if self.id:
                        self.joined_members = known
                        break
                    await asyncio.sleep(0.2 * (attempt + 1))
                if not self.id:
                    raise NodeError(
                        f"the cluster has no member with peer URLs"
                        f" {cfg.initial_advertise_peer_urls}: add it first (etcdctl member add)"
                        " and start it with the same --initial-advertise-peer-urls")
            applied = await asyncio.to_thread(self.bootstrap, wal_dir)
        self.core = Raft(self.id, self.storage, rng, election_tick=election_tick,
                         heartbeat_tick=1, applied=applied)
        self.transport = Transport(self.id, self.cluster_id, self.on_message,
                                   self.on_unreachable, self.on_snapshot_status,
                                   self.describe_cluster)
        await self.transport.listen(cfg.listen_peer_urls)
        self.sync_peers()
        loop = asyncio.get_running_loop()
        self.ticker = loop.call_later(cfg.heartbeat_interval_ms / 1000, self.tick)
        log.info("event=member_started name=%s member=%x cluster=%x applied=%d", cfg.name,
                 self.id, self.cluster_id, applied)
        self.schedule()

    def member_for_urls(self, peer_urls: list[str]) -> int:
        for m in self.members.values():
            if set(m.peer_urls) == set(peer_urls):
                return m.id
        return 0

    def describe_cluster(self, peer_urls: list[str]) -> tuple[int, list]:
        return self.member_for_urls(peer_urls), [
            [m.id, m.name, m.peer_urls] for m in self.members.values()]

    def bootstrap(self, wal_dir: Path) -> int:
        cfg = self.config
        members = cfg.members()
        ids = [m.id for m in members]
        if cfg.initial_cluster_state == "existing":
            # Whom to answer until the log or a snapshot says who the members are.
            members = [Member(i, name, urls) for i, name, urls in self.joined_members]
        elif self.id not in ids:
            raise DataDirMismatchError(
                f"--initial-advertise-peer-urls {cfg.initial_advertise_peer_urls} are not the"
                f" peer URLs of {cfg.name!r} in --initial-cluster")
        if not self.cluster_id:
            self.cluster_id = cluster_id_for(ids)
        meta = msgpack.packb({"member": self.id, "cluster": self.cluster_id, "name": cfg.name,
                              "joined": cfg.initial_cluster_state == "existing"})
        self.wal = WAL.create(wal_dir, meta, max_wals=cfg.max_wals, preallocate=WAL_PREALLOCATE)
        if cfg.initial_cluster_state == "new":
            # Every founding member writes the same configuration entries, so logs agree.
            entries = [
                Entry(1, i + 1, ConfChange(ConfChangeType.ADD_NODE, m.id, m.context()).encode(),
                      EntryType.CONF_CHANGE)
                for i, m in enumerate(members)
            ]
            hs = HardState(1, 0, len(entries))
            self.wal.save(hs, entries)
            self.storage.append(entries)
            self.storage.set_hard_state(hs)
        for m in members:
            self.members[m.id] = m
        return 0

    def recover(self, wal_dir: Path) -> int:
        wal, rec = WAL.open(wal_dir, max_wals=self.config.max_wals, preallocate=WAL_PREALLOCATE)
        self.wal = wal
        if rec.repaired:
            log.warning("event=wal_repaired detail=%r", rec.repaired)
        meta = msgpack.unpackb(rec.metadata)
        if meta["member"] != self.id and meta.get("joined"):
            self.id = meta["member"]  # a joining member was given its ID by the cluster
        if meta["member"] != self.id:
            raise DataDirMismatchError(
                f"the data dir {self.config.data_dir} belongs to member {meta['member']:x}"
                f" ({meta.get('name')!r}), but --initial-advertise-peer-urls"
                f" {self.config.initial_advertise_peer_urls} and --initial-cluster-token"
                f" {self.config.initial_cluster_token!r} give member {self.id:x}")
        self.cluster_id = meta["cluster"]
        # The WAL's marker is authoritative: a snapshot file it does not name was not finished.
        snap = self.snapshots.load(rec.snapshot.index) if rec.snapshot is not None else None
        applied = 0
        if snap is not None:
            self.storage.apply_snapshot(snap)
            self.restore_state(snap.data)
            applied = snap.index
        else:
            self.members = {m.id: m for m in self.config.members()}
        self.storage.append([e for e in rec.entries if e.index > applied])
        if rec.hard_state is not None:
            self.storage.set_hard_state(rec.hard_state)
            self.durable_vote = (rec.hard_state.term, rec.hard_state.vote)
        self.applied = applied
        self.snapshot_index = applied
        return applied

    # ---- snapshots of the node's own state ---------------------------------------------------

    def snapshot_state(self) -> bytes:
        members = [[m.id, m.name, m.peer_urls, m.client_urls, m.learner]
                   for m in self.members.values()]
        return msgpack.packb({"members": members, "fsm": self.fsm.snapshot()}, use_bin_type=True)

    def restore_state(self, data: bytes) -> None:
        state = msgpack.unpackb(data, raw=False)
        self.members = {m[0]: Member(m[0], m[1], m[2], m[3], m[4]) for m in state["members"]}
        self.fsm.restore(state["fsm"])

    # ---- inputs ------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.stopped.is_set():
            return
        core = self.core
        if core.lead == 0 and core.conf_state().voters == (self.id,):
            core.campaign_now()  # the only voter: no one to wait for
        else:
            core.tick()
        loop = asyncio.get_running_loop()
        self.ticker = loop.call_later(self.config.heartbeat_interval_ms / 1000, self.tick)
        self.expire_waiters(loop.time())
        self.schedule()

    def expire_waiters(self, now: float) -> None:
        """Fail the proposals and reads whose deadline has passed (checked on every tick)."""
        deadlines, waiting = self.deadlines, self.waiting
        # Answered proposals leave their entry behind; drop those too, to keep the heap short.
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in waiting):
            _, seq = heapq.heappop(deadlines)
            waiter = self.waiting.pop(seq, None)
            if waiter is None:
                continue
            if any(queued == seq for queued, _ in self.queued):
                settle(waiter, error=NoLeaderError(
                    "proposal: no leader (an election is under way or a majority of members"
                    " is unreachable); retry later"))
            else:
                settle(waiter, error=ProposalTimeoutError(
                    "proposal timed out (leader lost or overloaded); it may or may not have"
                    " been applied"))
        if self.queued:
            self.queued = [(seq, data) for seq, data in self.queued if seq in waiting]
        # A read round unanswered for an election timeout was lost with a leader change:
        # its readers are asked again.
        for ctx in [c for c, (_, lost_at) in self.reads.items() if lost_at <= now]:
            self.read_batch.extend(self.reads.pop(ctx)[0])
        if self.read_batch and any(r[1] <= now for r in self.read_batch):
            no_leader = self.core is None or self.core.lead == 0
            for waiter, _ in [r for r in self.read_batch if r[1] <= now]:
                settle(waiter, error=NoLeaderError(
                    "read: no leader (an election is under way or a majority of members"
                    " is unreachable); retry later") if no_leader
                    else ProposalTimeoutError("linearizable read timed out"))
            self.read_batch = [r for r in self.read_batch if r[1] > now]
        if self.applied_waiters and any(w[2] <= now for w in self.applied_waiters):
            late = [w for w in self.applied_waiters if w[2] <= now]
            self.applied_waiters = [w for w in self.applied_waiters if w[2] > now]
            for index, waiter, _ in late:
                settle(waiter, error=ProposalTimeoutError(
                    f"member did not apply up to {index} in time"))

    def flush_proposals(self) -> None:
        """Hand this turn's proposals to the core; without a leader they wait for one (or
        for their deadline)."""
        if not self.queued or self.core is None:
            return
        try:
            self.core.propose_many([data for _, data in self.queued])
        except ProposalDroppedError:
            return  # kept; tried again when a leader is known (and on every tick)
        self.queued = []

    def on_message(self, m: Message) -> None:
        if self.core is None or self.stopped.is_set():
            return
        try:
            self.core.step(m)
        except Exception:
            log.exception("event=step_failed from=%x type=%d", m.frm, m.type)
            return
        self.schedule()

    def on_unreachable(self, peer: int) -> None:
        if self.core is not None:
            self.core.report_unreachable(peer)

    def on_snapshot_status(self, peer: int, failed: bool) -> None:
        if self.core is not None:
            self.core.report_snapshot(peer, failed)
            self.schedule()

    # ---- the Ready pipeline ---------------------------------------------------------------------

    def schedule(self) -> None:
        """Process readies at the end of this loop turn: everything that arrives in the turn is
        one batch, one fsync."""
        if not self.process_scheduled and not self.processing:
            self.process_scheduled = True
            asyncio.get_running_loop().call_soon(self.spawn_process)

    def spawn_process(self) -> None:
        self.process_scheduled = False
        if not self.processing:
            self.processing = True
            asyncio.get_running_loop().create_task(self.process())

    async def process(self) -> None:
        try:
            self.flush_proposals()
            self.flush_reads()
            while self.core.has_ready() and not self.stopped.is_set():
                await self.handle_ready(self.core.ready())
                self.flush_proposals()
                self.flush_reads()
        except Exception:
            log.exception("event=ready_failed member=%x", self.id)
            raise
        finally:
            self.processing = False

    async def handle_ready(self, rd: Ready) -> None:
        self.stats["readies"] += 1
        core = self.core
        leader_sends_early = core.role == Role.LEADER
        if leader_sends_early:
            self.transport.send(rd.messages)
        if rd.snapshot is not None:
            if self.snapshotting is not None:
                await asyncio.shield(self.snapshotting)  # one writer of snapshot files at a time
            await asyncio.to_thread(self.write_received_snapshot, rd.snapshot)
            self.install_snapshot(rd.snapshot)
        # Committed entries are on a majority's disks already: apply (and answer) them while
        # this batch's new entries are written, not after.
        self.apply(rd)
        for rs in rd.read_states:
            self.read_answered(rs.context, rs.index)
        if rd.hard_state is not None or rd.entries:
            await self.persist(rd)
        if rd.entries:
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)
        if not leader_sends_early:
            self.transport.send(rd.messages)
        if rd.soft_state is not None:
            self.on_soft_state(rd.soft_state.leader, rd.soft_state.role)
        core.advance()
        if self.removed:
            await self.stop()
            return
        await self.maybe_snapshot()

    async def persist(self, rd: Ready) -> None:
        """Write the batch to the WAL; on a disk error, fail this member's proposals in it and
        retry until the disk takes it (the core cannot move on without it)."""
        delay = 0.05
        hs = rd.hard_state
        # Entries, terms and votes must be on disk before anyone hears of them; a commit index
        # alone need not be (it is re-learned from the leader after a crash).
        sync = bool(rd.entries) or (hs is not None and (hs.term, hs.vote) != self.durable_vote)
        while True:
            try:
                if sync:
                    started = time.perf_counter()
                    await self.save_synced(hs, rd.entries)
                    self.fsync_seconds.observe(time.perf_counter() - started)
                else:
                    # A bare commit-index record: a page-cache write, cheaper than a thread hop.
                    self.wal.save(hs, rd.entries, sync=False)
                if hs is not None:
                    self.durable_vote = (hs.term, hs.vote)
                self.stats["fsyncs"] += sync
                if self.storage_error is not None:
                    log.warning("event=wal_write_recovered member=%x", self.id)
                self.storage_error = None
                return
            except WALWriteError as e:
                if self.storage_error is None:
                    log.error("event=wal_write_failed member=%x error=%r", self.id, str(e))
                self.storage_error = str(e)
                self.fail_proposals(rd.entries, StorageFailedError(
                    f"write-ahead log write failed ({e}); the proposal was not applied here"
                    " and may still be applied by the cluster"))
            if self.stopped.is_set():
                raise StoppedError("member stopped")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def save_synced(self, hs: HardState | None, entries: list[Entry]) -> None:
        """Write on the loop (a page-cache copy), fdatasync on the sync thread (or on the
        loop: a follower whose syncs are quick)."""
        pending = self.wal.write(hs, entries)
        if pending is None:
            return
        started = time.perf_counter()
        if self.core.role != Role.LEADER and self.sync_average < INLINE_SYNC_LIMIT:
            try:
                os.fdatasync(pending.fd)
                outcome = 0
            except OSError as e:
                outcome = e.errno or errno.EIO
        else:
            if self.syncer is None:
                self.syncer = Syncer(asyncio.get_running_loop())
            self.wal_pending = True
            try:
                outcome = await asyncio.shield(self.syncer.fdatasync(pending.fd))
            except BaseException:
                self.wal.finish(pending, 0, synced=False)  # written; durable or not, as in a crash
                raise
            finally:
                self.wal_pending = False
        self.sync_average += (time.perf_counter() - started - self.sync_average) / 8
        self.wal.finish(pending, outcome)

    def fail_proposals(self, entries: list[Entry], error: Exception) -> None:
        for e in entries:
            if e.type == EntryType.NORMAL and len(e.data) >= _ENVELOPE.size:
                member, seq = _ENVELOPE.unpack_from(e.data)
                if member == self.id:
                    waiter = self.waiting.pop(seq, None)
                    if waiter is not None:
                        settle(waiter, error=error)

    def write_received_snapshot(self, snap: Snapshot) -> None:
        self.snapshots.save(snap)
        self.wal.save_snapshot(snap.index, snap.term)

    def install_snapshot(self, snap: Snapshot) -> None:
        """On the loop thread: the state machine is never touched from another thread."""
        self.storage.apply_snapshot(snap)
        self.restore_state(snap.data)
        self.applied = snap.index
        self.snapshot_index = snap.index
        self.sync_peers()
        log.info("event=snapshot_restored member=%x index=%d", self.id, snap.index)

    def on_soft_state(self, leader: int, role: int) -> None:
        self.stats["leader_changes"] += 1
        log.info("event=leader_changed member=%x leader=%x term=%d role=%s", self.id, leader,
                 self.core.term, Role(role).name)
        self.leader_changed.set()
        self.leader_changed = asyncio.Event()

    def apply(self, rd: Ready) -> None:
        for e in rd.committed_entries:
            if e.index <= self.applied:
                continue
            if e.type == EntryType.CONF_CHANGE:
                self.apply_conf_change(ConfChange.decode(e.data))
            elif len(e.data) >= _ENVELOPE.size:
                member, seq = _ENVELOPE.unpack_from(e.data)
                result = self.fsm.apply(e.index, e.data[_ENVELOPE.size:])
                if member == self.id:
                    waiter = self.waiting.pop(seq, None)
                    if waiter is not None:
                        settle(waiter, result)
            self.applied = e.index
            self.stats["entries_applied"] += 1
        if rd.committed_entries and self.applied_waiters:
            ready = [w for w in self.applied_waiters if w[0] <= self.applied]
            self.applied_waiters = [w for w in self.applied_waiters if w[0] > self.applied]
            for index, waiter, _ in ready:
                settle(waiter, index)

    def apply_conf_change(self, cc: ConfChange) -> None:
        try:
            info = json.loads(cc.context or b"{}")
        except ValueError:
            info = {}
        request = tuple(info.get("request", (0, 0)))
        if cc.type == ConfChangeType.REMOVE_NODE:
            self.members.pop(cc.node_id, None)
            log.info("event=member_removed member=%x removed=%x", self.id, cc.node_id)
            if cc.node_id == self.id:
                self.removed = True
        else:
            old = self.members.get(cc.node_id)
            learner = cc.type == ConfChangeType.ADD_LEARNER
            self.members[cc.node_id] = Member(
                cc.node_id, info.get("name") or (old.name if old else ""),
                info.get("peerURLs") or (old.peer_urls if old else []),
                info.get("clientURLs") or (old.client_urls if old else []), learner)
            log.info("event=member_added member=%x added=%x learner=%s", self.id, cc.node_id,
                     learner)
            if old is None:
                # A joining member refuses a snapshot of a configuration without itself: take
                # one now, so the snapshot it may need already names it.
                self.force_snapshot = True
        self.sync_peers()
        if request[0] == self.id:
            waiter = self.waiting.pop(request[1], None)
            if waiter is not None:
                settle(waiter, cc.node_id)
        if self.on_conf_change is not None:
            self.on_conf_change(dict(self.members))

    def sync_peers(self) -> None:
        if self.transport is None:
            return
        for m in self.members.values():
            self.transport.set_peer(m.id, m.peer_urls)
        for peer in list(self.transport.peers):
            if peer not in self.members:
                asyncio.get_running_loop().create_task(self.transport.remove_peer(peer))

    async def maybe_snapshot(self) -> None:
        if self.snapshotting is not None:
            return
        due = self.applied - self.snapshot_index >= self.config.snapshot_count
        if not due and not (self.force_snapshot and self.applied > self.snapshot_index):
            return
        self.force_snapshot = False
        self.snapshot_index = self.applied
        # In the background: the Ready pipeline goes on while the snapshot is written.
        self.snapshotting = asyncio.get_running_loop().create_task(
            self.take_snapshot(self.applied, self.core.conf_state()))

    async def take_snapshot(self, index: int, conf: ConfState) -> None:
        try:
            snap = await self.serialize_snapshot(index, self.storage.term(index), conf)
            if index <= self.storage.snapshot().index or self.stopped.is_set():
                return  # a newer snapshot arrived from the leader meanwhile
            self.storage.create_snapshot(index, conf, snap.data)
            await asyncio.to_thread(self.mark_snapshot, snap)
            compact_to = index - self.config.snapshot_catchup_entries
            while compact_to >= self.storage.first_index():
                self.storage.compact(min(compact_to,
                                         self.storage.first_index() + COMPACT_STEP - 1))
                await asyncio.sleep(0)
            self.stats["snapshots"] += 1
        except Exception:
            log.exception("event=snapshot_failed member=%x index=%d", self.id, index)
            self.snapshot_index = min(self.snapshot_index, self.storage.snapshot().index)
        finally:
            self.snapshotting = None

    async def serialize_snapshot(self, index: int, term: int, conf: ConfState) -> Snapshot:
        """Serialise and save the state as of now. A forked child does the work on a
        copy-on-write image of the state, so serving and replicating never pause for it."""
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("event=snapshot_fork_failed member=%x error=%r", self.id, str(e))
            snap = Snapshot(index, term, conf, self.snapshot_state())
            await asyncio.to_thread(self.snapshots.save, snap)
            return snap
        if pid == 0:  # the child: no loop, no other threads; never returns
            code = 1
            try:
                os.closerange(3, _MAX_FD)  # sockets stay the parent's alone
                gc.disable()  # short-lived: collections here only walked the records it builds
                os.nice(19)  # background work: never take a core from a member's loop
                self.snapshots.save(Snapshot(index, term, conf, self.snapshot_state()))
                code = 0
            finally:
                os._exit(code)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the snapshot writer failed ({status:#x})")
        return await asyncio.to_thread(self.snapshots.load, index)

    def mark_snapshot(self, snap: Snapshot) -> None:
        """Once the snapshot file is durable, the WAL records it and lets older segments go."""
        self.wal.save_snapshot(snap.index, snap.term)
        self.wal.release_to(max(0, snap.index - self.config.snapshot_catchup_entries))
        log.info("event=snapshot_saved member=%x index=%d", self.id, snap.index)

    # ---- the API above -----------------------------------------------------------------------

    @property
    def leader(self) -> int:
        return self.core.lead if self.core is not None else 0

    @property
    def is_leader(self) -> bool:
        return self.core is not None and self.core.role == Role.LEADER

    @property
    def term(self) -> int:
        return self.core.term if self.core is not None else 0

    async def _until(self, deadline: float, what: str) -> None:
        """Wait for a leader to appear, or give up at the deadline."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise NoLeaderError(f"{what}: no leader (an election is under way or a majority"
                                " of members is unreachable); retry later")
        try:
            await asyncio.wait_for(self.leader_changed.wait(), min(remaining, 0.05))
        except TimeoutError:
            pass

    async def propose(self, payload: bytes, timeout: float | None = None) -> object:
        """Replicate payload and return what the state machine's apply() gave for it."""
        fut = self.submit(payload, timeout)
        assert fut is not None
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()  # our caller gave up; apply() will skip answering

    def submit(self, payload: bytes, timeout: float | None = None, done: Done | None = None
               ) -> asyncio.Future[object] | None:
        """`propose` without a coroutine: ``done(result, error)`` is called from apply() (or
        at the deadline with NoLeaderError or ProposalTimeoutError, or by stop()); without
        ``done``, a future is returned and settled the same way."""
        if self.stopped.is_set():
            raise StoppedError("member stopped")
        if self.storage_error is not None:
            raise StorageFailedError(f"write-ahead log is failing ({self.storage_error});"
                                     " free disk space on this member")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.request_timeout)
        self.seq += 1
        seq = self.seq
        fut = loop.create_future() if done is None else None
        self.waiting[seq] = done if fut is None else fut
        heapq.heappush(self.deadlines, (deadline, seq))
        self.queued.append((seq, _ENVELOPE.pack(self.id, seq) + payload))
        self.stats["proposals"] += 1
        self.schedule()
        return fut

    async def read_index(self, timeout: float | None = None) -> int:
        """A linearizable read point: returns once this member has applied up to it."""
        fut = self.read_submit(timeout)
        assert fut is not None
        return await fut

    def read_submit(self, timeout: float | None = None, done: Done | None = None
                    ) -> asyncio.Future[int] | None:
        """`read_index` without a coroutine, answered like `submit`. Reads asked for in the
        same loop turn share one ReadIndex round (one heartbeat to the followers), as etcd
        batches them."""
        if self.stopped.is_set():
            raise StoppedError("member stopped")
        loop = asyncio.get_running_loop()
        fut = loop.create_future() if done is None else None
        deadline = loop.time() + (timeout or self.config.request_timeout)
        self.read_batch.append((done if fut is None else fut, deadline))
        self.schedule()
        return fut

    def flush_reads(self) -> None:
        batch = [r for r in self.read_batch if waiting_for(r[0])]
        self.read_batch = []
        if not batch:
            return
        self.seq += 1
        ctx = _ENVELOPE.pack(self.id, self.seq)
        try:
            self.core.read_index(ctx)
        except ProposalDroppedError:
            self.read_batch = batch  # no leader: asked again on the next tick
            return
        lost_at = asyncio.get_running_loop().time() + self.config.election_timeout_ms / 1000
        self.reads[ctx] = (batch, lost_at)

    def read_answered(self, ctx: bytes, index: int) -> None:
        asked = self.reads.pop(ctx, None)
        if asked is None:
            return
        for waiter, deadline in asked[0]:
            if not waiting_for(waiter):
                continue
            if self.applied >= index:
                settle(waiter, index)
            else:
                self.applied_waiters.append((index, waiter, deadline))

    async def change_membership(self, cc_type: int, node_id: int, member: Member | None = None,
                                timeout: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.request_timeout)
        self.seq += 1
        seq = self.seq
        fut = loop.create_future()
        self.waiting[seq] = fut
        context = member.context((self.id, seq)) if member else json.dumps(
            {"request": [self.id, seq]}).encode()
        try:
            while True:
                try:
                    self.core.propose_conf_change(ConfChange(cc_type, node_id, context))
                    break
                except ProposalDroppedError as e:
                    if "pending" in str(e):
                        raise NodeError("another membership change is still being applied;"
                                        " retry in a moment") from None
                    await self._until(deadline, "membership change")
            self.schedule()
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise ProposalTimeoutError("membership change timed out") from None
        finally:
            self.waiting.pop(seq, None)

    async def add_member(self, peer_urls: list[str], name: str = "",
                         learner: bool = False) -> Member:
        if self.member_for_urls(peer_urls):
            raise NodeError(f"peer URLs {peer_urls} already belong to member"
                            f" {self.member_for_urls(peer_urls):x}")
        # A fresh ID each time: an ID once removed must never come back (its old messages
        # could still be in flight). The new member learns it when it joins.
        mid = member_id_for(peer_urls, f"{self.config.initial_cluster_token}:{time.time_ns()}")
        member = Member(mid, name, list(peer_urls), [], learner)
        kind = ConfChangeType.ADD_LEARNER if learner else ConfChangeType.ADD_NODE
        await self.change_membership(kind, mid, member)
        return self.members.get(mid, member)

    async def promote_member(self, member_id: int) -> None:
        m = self.members.get(member_id)
        if m is None or not m.learner:
            raise NodeError(f"member {member_id:x} is not a learner")
        await self.change_membership(ConfChangeType.ADD_NODE, member_id, m)

    async def remove_member(self, member_id: int) -> None:
        if member_id not in self.members:
            raise NodeError(f"member {member_id:x} is not in the cluster")
        await self.change_membership(ConfChangeType.REMOVE_NODE, member_id)

    def status(self) -> dict:
        core = self.core
        return {"id": self.id, "cluster": self.cluster_id, "leader": core.lead, "term": core.term,
                "role": Role(core.role).name, "commit": core.committed, "applied": self.applied,
                "conf": ConfState(core.conf_state().voters, core.conf_state().learners),
                **self.stats}

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.ticker is not None:
            self.ticker.cancel()
        reads = [w for batch, _ in self.reads.values() for w, _ in batch]
        reads += [w for w, _ in self.read_batch] + [w for _, w, _ in self.applied_waiters]
        waiters = list(self.waiting.values()) + reads
        self.waiting.clear()
        self.reads.clear()
        self.read_batch = []
        self.applied_waiters = []
        for waiter in waiters:
            settle(waiter, error=StoppedError("member stopped"))
        if self.transport is not None:
            await self.transport.stop()
        if self.snapshotting is not None:
            try:
                await asyncio.shield(self.snapshotting)
            except Exception:
                pass
        for _ in range(1000):  # a batch between write and finish holds the WAL
            if not self.wal_pending:
                break
            await asyncio.sleep(0.005)
        if self.wal is not None and not self.wal_pending:
            self.wal.close()
        if self.syncer is not None:
            self.syncer.close()
        log.info("event=member_stopped member=%x", self.id)
