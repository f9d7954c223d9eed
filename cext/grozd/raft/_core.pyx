# cython: language_level=3
"""The Raft algorithm as a deterministic state machine: no clock, no sockets, no files.

The caller drives it with tick(), step(), propose() ... and collects what to persist, send and
apply with ready(), then acknowledges with advance(). Randomness (election timeouts) comes from a
generator the caller passes in, so a seed replays a run exactly.
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint64_t, int64_t

# Message types. Local ones (HUP, BEAT, CHECK_QUORUM) never cross the network.
DEF MSG_HUP = 0
DEF MSG_BEAT = 1
DEF MSG_PROP = 2
DEF MSG_APP = 3
DEF MSG_APP_RESP = 4
DEF MSG_VOTE = 5
DEF MSG_VOTE_RESP = 6
DEF MSG_SNAP = 7
DEF MSG_HEARTBEAT = 8
DEF MSG_HEARTBEAT_RESP = 9
DEF MSG_UNREACHABLE = 10
DEF MSG_SNAP_STATUS = 11
DEF MSG_CHECK_QUORUM = 12
DEF MSG_TRANSFER_LEADER = 13
DEF MSG_TIMEOUT_NOW = 14
DEF MSG_READ_INDEX = 15
DEF MSG_READ_INDEX_RESP = 16
DEF MSG_PRE_VOTE = 17
DEF MSG_PRE_VOTE_RESP = 18

DEF FOLLOWER = 0
DEF PRE_CANDIDATE = 1
DEF CANDIDATE = 2
DEF LEADER = 3

DEF ENTRY_NORMAL = 0
DEF ENTRY_CONF_CHANGE = 1

DEF PROBE = 0
DEF REPLICATE = 1
DEF SNAPSHOT = 2

DEF CONF_ADD_NODE = 0
DEF CONF_REMOVE_NODE = 1
DEF CONF_ADD_LEARNER = 2

DEF CAMPAIGN_PRE_ELECTION = 0
DEF CAMPAIGN_ELECTION = 1
DEF CAMPAIGN_TRANSFER = 2

DEF VOTE_PENDING = 0
DEF VOTE_WON = 1
DEF VOTE_LOST = 2

DEF NONE = 0
DEF UNLIMITED = 0xFFFFFFFFFFFFFFFF
# Fixed cost counted per entry on top of its data when sizing messages and windows.
DEF ENTRY_OVERHEAD = 24

# Public mirrors of the constants above (the Python face turns them into enums).
MESSAGE_TYPES = {
    "HUP": MSG_HUP, "BEAT": MSG_BEAT, "PROP": MSG_PROP, "APP": MSG_APP, "APP_RESP": MSG_APP_RESP,
    "VOTE": MSG_VOTE, "VOTE_RESP": MSG_VOTE_RESP, "SNAP": MSG_SNAP, "HEARTBEAT": MSG_HEARTBEAT,
    "HEARTBEAT_RESP": MSG_HEARTBEAT_RESP, "UNREACHABLE": MSG_UNREACHABLE,
    "SNAP_STATUS": MSG_SNAP_STATUS, "CHECK_QUORUM": MSG_CHECK_QUORUM,
    "TRANSFER_LEADER": MSG_TRANSFER_LEADER, "TIMEOUT_NOW": MSG_TIMEOUT_NOW,
    "READ_INDEX": MSG_READ_INDEX, "READ_INDEX_RESP": MSG_READ_INDEX_RESP,
    "PRE_VOTE": MSG_PRE_VOTE, "PRE_VOTE_RESP": MSG_PRE_VOTE_RESP,
}
ROLES = {"FOLLOWER": FOLLOWER, "PRE_CANDIDATE": PRE_CANDIDATE, "CANDIDATE": CANDIDATE,
         "LEADER": LEADER}
ENTRY_TYPES = {"NORMAL": ENTRY_NORMAL, "CONF_CHANGE": ENTRY_CONF_CHANGE}
PROGRESS_STATES = {"PROBE": PROBE, "REPLICATE": REPLICATE, "SNAPSHOT": SNAPSHOT}
CONF_CHANGE_TYPES = {"ADD_NODE": CONF_ADD_NODE, "REMOVE_NODE": CONF_REMOVE_NODE,
                     "ADD_LEARNER": CONF_ADD_LEARNER}

# A vote request carrying this context comes from a leadership transfer: it may not be ignored
# by a follower that still hears from its leader.
CAMPAIGN_TRANSFER_CONTEXT = b"transfer"
CONF_CHANGE_FORMAT = 1


class RaftError(Exception):
    """Base of the core's errors."""


class CompactedError(RaftError):
    """The requested index is older than the log's first retained entry."""


class UnavailableError(RaftError):
    """The requested index is newer than the log's last entry."""


class SnapshotTemporarilyUnavailableError(RaftError):
    """The storage cannot produce a snapshot right now; the core retries later."""


class ProposalDroppedError(RaftError):
    """A proposal was not accepted (no leader, transfer in progress, not a member...)."""


cdef inline uint64_t entry_size(Entry e):
    return len(e.data) + ENTRY_OVERHEAD


cdef class Entry:
    def __init__(self, uint64_t term=0, uint64_t index=0, bytes data=b"", int type=ENTRY_NORMAL):
        self.term = term
        self.index = index
        self.data = data
        self.type = type

    def __eq__(self, other):
        if not isinstance(other, Entry):
            return NotImplemented
        cdef Entry o = <Entry>other
        return (self.term == o.term and self.index == o.index and self.type == o.type
                and self.data == o.data)

    def __hash__(self):
        return hash((self.term, self.index, self.type, self.data))

    def __repr__(self):
        return f"Entry(term={self.term}, index={self.index}, type={self.type}, data={self.data!r})"


cdef inline Entry new_entry(uint64_t term, uint64_t index, int type, bytes data):
    cdef Entry e = Entry.__new__(Entry)
    e.term = term
    e.index = index
    e.type = type
    e.data = data
    return e


cdef class ConfState:
    def __init__(self, voters=(), learners=()):
        self.voters = tuple(sorted(voters))
        self.learners = tuple(sorted(learners))

    def __eq__(self, other):
        if not isinstance(other, ConfState):
            return NotImplemented
        return self.voters == other.voters and self.learners == other.learners

    def __hash__(self):
        return hash((self.voters, self.learners))

    def __repr__(self):
        return f"ConfState(voters={self.voters}, learners={self.learners})"


cdef class Snapshot:
    def __init__(self, uint64_t index=0, uint64_t term=0, ConfState conf_state=None,
                 bytes data=b""):
        self.index = index
        self.term = term
        self.conf_state = conf_state if conf_state is not None else ConfState()
        self.data = data

    def __repr__(self):
        return (f"Snapshot(index={self.index}, term={self.term}, conf_state={self.conf_state!r},"
                f" data=<{len(self.data)} bytes>)")


cdef class Message:
    def __init__(self, int type=MSG_HUP, uint64_t to=0, uint64_t frm=0, uint64_t term=0,
                 uint64_t log_term=0, uint64_t index=0, list entries=None, uint64_t commit=0,
                 bint reject=False, uint64_t reject_hint=0, Snapshot snapshot=None,
                 bytes context=None):
        self.type = type
        self.to = to
        self.frm = frm
        self.term = term
        self.log_term = log_term
        self.index = index
        self.entries = entries if entries is not None else []
        self.commit = commit
        self.reject = reject
        self.reject_hint = reject_hint
        self.snapshot = snapshot
        self.context = context

    def copy(self):
        """A shallow copy (entries list copied, entries shared: they are immutable)."""
        return Message(self.type, self.to, self.frm, self.term, self.log_term, self.index,
                       list(self.entries), self.commit, self.reject, self.reject_hint,
                       self.snapshot, self.context)

    def __repr__(self):
        return (f"Message(type={self.type}, {self.frm}->{self.to}, term={self.term},"
                f" log_term={self.log_term}, index={self.index}, entries={len(self.entries)},"
                f" commit={self.commit}, reject={self.reject}, hint={self.reject_hint})")


cdef inline Message new_message(int type, uint64_t to):
    cdef Message m = Message.__new__(Message)
    m.type = type
    m.to = to
    m.entries = []
    return m


cdef class HardState:
    def __init__(self, uint64_t term=0, uint64_t vote=0, uint64_t commit=0):
        self.term = term
        self.vote = vote
        self.commit = commit

    def __eq__(self, other):
        if not isinstance(other, HardState):
            return NotImplemented
        return (self.term == other.term and self.vote == other.vote
                and self.commit == other.commit)

    def __hash__(self):
        return hash((self.term, self.vote, self.commit))

    def __repr__(self):
        return f"HardState(term={self.term}, vote={self.vote}, commit={self.commit})"


cdef class SoftState:
    def __init__(self, uint64_t leader=0, int role=FOLLOWER):
        self.leader = leader
        self.role = role

    def __repr__(self):
        return f"SoftState(leader={self.leader}, role={self.role})"


cdef class ReadState:
    def __init__(self, uint64_t index, bytes context):
        self.index = index
        self.context = context

    def __repr__(self):
        return f"ReadState(index={self.index}, context={self.context!r})"


cdef class ConfChange:
    def __init__(self, int type, uint64_t node_id, bytes context=b""):
        if type not in (CONF_ADD_NODE, CONF_REMOVE_NODE, CONF_ADD_LEARNER):
            raise ValueError(f"unknown configuration change type {type}")
        if node_id == NONE:
            raise ValueError("a configuration change needs a node id other than 0")
        self.type = type
        self.node_id = node_id
        self.context = context

    def encode(self) -> bytes:
        """Entry payload: format byte, change type, 8-byte big-endian node id, then the context."""
        return (bytes((CONF_CHANGE_FORMAT, self.type)) + self.node_id.to_bytes(8, "big")
                + self.context)

    @staticmethod
    def decode(bytes data):
        if len(data) < 10 or data[0] != CONF_CHANGE_FORMAT:
            raise ValueError("not a configuration change payload of a known format")
        return ConfChange(data[1], int.from_bytes(data[2:10], "big"), data[10:])

    def __repr__(self):
        return f"ConfChange(type={self.type}, node_id={self.node_id})"


cdef class Ready:
    def __repr__(self):
        return (f"Ready(hard_state={self.hard_state!r}, soft_state={self.soft_state!r},"
                f" entries={len(self.entries)}, snapshot={self.snapshot!r},"
                f" messages={len(self.messages)}, committed={len(self.committed_entries)},"
                f" reads={len(self.read_states)})")


cdef class MemoryStorage:
    """The stable log kept in memory: what the caller has persisted, as the core reads it."""

    def __init__(self):
        self._ents = [new_entry(0, 0, ENTRY_NORMAL, b"")]
        self.hard_state = HardState()
        self._snapshot = Snapshot()
        self.conf_state = ConfState()

    def initial_state(self):
        return self.hard_state, self.conf_state

    def set_hard_state(self, HardState hs):
        self.hard_state = hs

    def set_conf_state(self, ConfState cs):
        self.conf_state = cs

    cpdef uint64_t first_index(self):
        return (<Entry>self._ents[0]).index + 1

    cpdef uint64_t last_index(self):
        return (<Entry>self._ents[0]).index + len(self._ents) - 1

    cpdef uint64_t term(self, uint64_t i) except? 0:
        cdef uint64_t offset = (<Entry>self._ents[0]).index
        if i < offset:
            raise CompactedError(i)
        if i - offset >= <uint64_t>len(self._ents):
            raise UnavailableError(i)
        return (<Entry>self._ents[i - offset]).term

    cpdef list entries(self, uint64_t lo, uint64_t hi, uint64_t max_bytes):
        """Entries [lo, hi), at least one, then as many as fit in max_bytes."""
        cdef uint64_t offset = (<Entry>self._ents[0]).index
        if lo <= offset:
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        cdef list ents = self._ents[lo - offset:hi - offset]
        return limit_size(ents, max_bytes)

    def snapshot(self):
        return self._snapshot

    def append(self, list entries):
        """Persist entries, replacing any conflicting suffix."""
        if not entries:
            return
        cdef uint64_t first = self.first_index()
        cdef Entry e0 = entries[0]
        cdef uint64_t last = e0.index + len(entries) - 1
        if last < first:
            return
        if first > e0.index:
            entries = entries[first - e0.index:]
            e0 = entries[0]
        cdef uint64_t offset = e0.index - (<Entry>self._ents[0]).index
        cdef uint64_t n = len(self._ents)
        if n > offset:
            del self._ents[offset:]
            self._ents.extend(entries)
        elif n == offset:
            self._ents.extend(entries)
        else:
            raise ValueError(f"missing log entry [last: {self.last_index()}, append at: {e0.index}]")

    def apply_snapshot(self, Snapshot snap):
        """Replace the whole log with a snapshot (a follower restoring from its leader)."""
        if snap.index <= self._snapshot.index and self._snapshot.index != 0:
            raise ValueError("snapshot is older than the one held")
        self._snapshot = snap
        self._ents = [new_entry(snap.term, snap.index, ENTRY_NORMAL, b"")]
        self.conf_state = snap.conf_state

    def create_snapshot(self, uint64_t index, ConfState conf_state, bytes data):
        """Record a snapshot of the state machine as of `index` (already applied)."""
        if index <= self._snapshot.index:
            raise ValueError("snapshot index is not newer than the current snapshot")
        if index > self.last_index():
            raise ValueError(f"snapshot {index} is out of bound lastindex({self.last_index()})")
        self._snapshot = Snapshot(index, self.term(index), conf_state, data)
        return self._snapshot

    def compact(self, uint64_t index):
        """Discard entries up to and including index (the snapshot covers them)."""
        cdef uint64_t offset = (<Entry>self._ents[0]).index
        if index <= offset:
            raise CompactedError(index)
        if index > self.last_index():
            raise ValueError(f"compact {index} is out of bound lastindex({self.last_index()})")
        cdef Entry e = self._ents[index - offset]
        self._ents = [new_entry(e.term, e.index, ENTRY_NORMAL, b"")] + self._ents[index - offset + 1:]


cdef list limit_size(list ents, uint64_t max_bytes):
    if max_bytes == UNLIMITED or len(ents) <= 1:
        return ents
    cdef uint64_t size = entry_size(<Entry>ents[0])
    cdef Py_ssize_t i, n = len(ents)
    for i in range(1, n):
        size += entry_size(<Entry>ents[i])
        if size > max_bytes:
            return ents[:i]
    return ents


cdef class Inflights:
    """The in-flight window of append messages to one follower: by count and by bytes."""

    def __cinit__(self, int cap, uint64_t max_bytes):
        self._cap = cap if cap > 0 else 1
        self._index = <uint64_t*>PyMem_Malloc(self._cap * sizeof(uint64_t))
        self._bytes = <uint64_t*>PyMem_Malloc(self._cap * sizeof(uint64_t))
        if self._index == NULL or self._bytes == NULL:
            raise MemoryError()
        self._max_bytes = max_bytes if max_bytes else UNLIMITED
        self.reset()

    def __dealloc__(self):
        PyMem_Free(self._index)
        PyMem_Free(self._bytes)

    cdef bint full(self):
        return self._count == self._cap or self._total_bytes >= self._max_bytes

    cdef void add(self, uint64_t index, uint64_t nbytes):
        cdef int slot = (self._start + self._count) % self._cap
        self._index[slot] = index
        self._bytes[slot] = nbytes
        self._count += 1
        self._total_bytes += nbytes

    cdef void free_le(self, uint64_t index):
        while self._count > 0 and self._index[self._start] <= index:
            self._total_bytes -= self._bytes[self._start]
            self._start = (self._start + 1) % self._cap
            self._count -= 1
        if self._count == 0:
            self._start = 0

    cdef void free_first_one(self):
        if self._count > 0:
            self.free_le(self._index[self._start])

    cdef void reset(self):
        self._start = 0
        self._count = 0
        self._total_bytes = 0

    @property
    def count(self):
        return self._count


cdef class Progress:
    """What the leader knows of one follower's log, and how it is sending to it."""

    def __cinit__(self, uint64_t next, int max_inflight, uint64_t max_inflight_bytes,
                  bint is_learner):
        self.next = next
        self.match = 0
        self.state = PROBE
        self.is_learner = is_learner
        self.inflights = Inflights(max_inflight, max_inflight_bytes)

    cdef void reset_state(self, int state):
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    cdef void become_probe(self):
        # Coming back from a snapshot, the follower holds at least the snapshot.
        if self.state == SNAPSHOT:
            pending = self.pending_snapshot
            self.reset_state(PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self.reset_state(PROBE)
            self.next = self.match + 1

    cdef void become_replicate(self):
        self.reset_state(REPLICATE)
        self.next = self.match + 1

    cdef void become_snapshot(self, uint64_t index):
        self.reset_state(SNAPSHOT)
        self.pending_snapshot = index

    cdef bint maybe_update(self, uint64_t n):
        cdef bint updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        if self.next < n + 1:
            self.next = n + 1
        return updated

    cdef bint maybe_decr_to(self, uint64_t rejected, uint64_t match_hint):
        if self.state == REPLICATE:
            # A rejection at or below match is stale: it answers an older append.
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        # In probe state only the answer to the one outstanding probe counts.
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), 1)
        self.probe_sent = False
        return True

    cdef bint is_paused(self):
        if self.state == PROBE:
            return self.probe_sent
        if self.state == REPLICATE:
            return self.inflights.full()
        return True

    @property
    def inflight_count(self):
        return self.inflights._count

    def __repr__(self):
        return (f"Progress(match={self.match}, next={self.next}, state={self.state},"
                f" paused={self.is_paused()}, learner={self.is_learner})")


cdef class RaftLog:
    """The log as the core sees it: stable entries in storage, then the unstable tail."""

    def __cinit__(self, object storage, uint64_t max_committed_bytes):
        self.storage = storage
        self.mem = storage if type(storage) is MemoryStorage else None
        cdef uint64_t first = storage.first_index()
        cdef uint64_t last = storage.last_index()
        self.unstable = []
        self.offset = last + 1
        self.unstable_snapshot = None
        self.committed = first - 1
        self.applied = first - 1
        self.max_committed_bytes = max_committed_bytes

    cpdef uint64_t first_index(self):
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.index + 1
        if self.mem is not None:
            return self.mem.first_index()
        return self.storage.first_index()

    cpdef uint64_t last_index(self):
        if self.unstable:
            return self.offset + len(self.unstable) - 1
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.index
        if self.mem is not None:
            return self.mem.last_index()
        return self.storage.last_index()

    cpdef uint64_t term(self, uint64_t i) except? 0:
        """Term of entry i; 0 outside [first-1, last]; raises CompactedError below the snapshot."""
        if i >= self.offset and self.unstable:
            if i - self.offset < <uint64_t>len(self.unstable):
                return (<Entry>self.unstable[i - self.offset]).term
            return 0
        if self.unstable_snapshot is not None:
            if i == self.unstable_snapshot.index:
                return self.unstable_snapshot.term
            if i < self.unstable_snapshot.index:
                raise CompactedError(i)
        cdef uint64_t dummy = self.first_index() - 1
        if i < dummy:
            raise CompactedError(i)
        if i > self.last_index():
            return 0
        try:
            if self.mem is not None:
                return self.mem.term(i)
            return self.storage.term(i)
        except UnavailableError:
            return 0

    cdef uint64_t term_or_zero(self, uint64_t i):
        try:
            return self.term(i)
        except CompactedError:
            return 0

    cdef uint64_t last_term(self):
        return self.term(self.last_index())

    cdef bint match_term(self, uint64_t i, uint64_t t):
        try:
            return self.term(i) == t
        except CompactedError:
            return False

    cdef bint is_up_to_date(self, uint64_t lasti, uint64_t t):
        cdef uint64_t lt = self.last_term()
        return t > lt or (t == lt and lasti >= self.last_index())

    cdef void append(self, list ents):
        """Append to the unstable tail, truncating whatever conflicts with ents."""
        if not ents:
            return
        cdef uint64_t after = (<Entry>ents[0]).index
        cdef uint64_t n = len(self.unstable)
        if after == self.offset + n:
            self.unstable.extend(ents)
        elif after <= self.offset:
            # The whole unstable tail (and maybe stable entries) is replaced.
            self.offset = after
            self.unstable = list(ents)
        else:
            del self.unstable[after - self.offset:]
            self.unstable.extend(ents)

    cdef uint64_t find_conflict(self, list ents):
        """Index of the first entry of ents that is new or conflicts with the log, else 0."""
        cdef Entry e
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    cdef uint64_t find_conflict_by_term(self, uint64_t index, uint64_t t):
        """The largest index <= index whose term is <= t (the fast back-tracking hint)."""
        cdef uint64_t li = self.last_index()
        if index > li:
            return index
        while index > 0:
            try:
                if self.term(index) <= t:
                    break
            except CompactedError:
                break
            index -= 1
        return index

    cdef int64_t maybe_append(self, uint64_t index, uint64_t log_term, uint64_t committed,
                              list ents) except -2:
        """Append ents after (index, log_term) if it matches; the new last index, or -1."""
        if not self.match_term(index, log_term):
            return -1
        cdef uint64_t lastnew = index + len(ents)
        cdef uint64_t ci = self.find_conflict(ents)
        if ci != 0:
            if ci <= self.committed:
                raise RaftError(f"entry {ci} conflicts with committed entry [committed({self.committed})]")
            self.append(ents[ci - index - 1:])
        self.commit_to(min(committed, lastnew))
        return lastnew

    cdef void commit_to(self, uint64_t c) except *:
        if c > self.committed:
            if c > self.last_index():
                raise RaftError(f"commit({c}) is out of range [last index({self.last_index()})]")
            self.committed = c

    cdef bint maybe_commit(self, uint64_t i, uint64_t t):
        if i > self.committed and self.term_or_zero(i) == t:
            self.commit_to(i)
            return True
        return False

    cpdef list slice(self, uint64_t lo, uint64_t hi, uint64_t max_bytes):
        """Entries [lo, hi) limited to max_bytes (at least one); raises CompactedError."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(lo)
        cdef list ents
        cdef uint64_t shi
        if lo < self.offset:
            shi = min(hi, self.offset)
            if self.mem is not None:
                ents = self.mem.entries(lo, shi, max_bytes)
            else:
                ents = self.storage.entries(lo, shi, max_bytes)
            if <uint64_t>len(ents) < shi - lo or hi <= self.offset:
                return ents
            ents = ents + self.unstable[0:hi - self.offset]
        else:
            ents = self.unstable[lo - self.offset:hi - self.offset]
        return limit_size(ents, max_bytes)

    cdef list next_committed(self):
        cdef uint64_t lo = max(self.applied + 1, self.first_index())
        if self.committed + 1 > lo:
            return self.slice(lo, self.committed + 1, self.max_committed_bytes)
        return []

    cdef bint has_next_committed(self):
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    cdef Snapshot snapshot(self):
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot
        return self.storage.snapshot()

    cdef void restore(self, Snapshot s):
        self.committed = s.index
        self.unstable_snapshot = s
        self.unstable = []
        self.offset = s.index + 1

    cdef void stable_to(self, uint64_t i, uint64_t t):
        # Only trim if the entry is still the one that was persisted (a newer leader may have
        # replaced it in the meantime).
        if i < self.offset or not self.unstable:
            return
        if i - self.offset >= <uint64_t>len(self.unstable):
            return
        if (<Entry>self.unstable[i - self.offset]).term != t:
            return
        del self.unstable[:i + 1 - self.offset]
        self.offset = i + 1

    cdef void stable_snap_to(self, uint64_t i):
        if self.unstable_snapshot is not None and self.unstable_snapshot.index == i:
            self.unstable_snapshot = None

    cdef void applied_to(self, uint64_t i):
        if i == 0:
            return
        if i > self.committed or i < self.applied:
            raise RaftError(f"applied({i}) is out of range [prevApplied({self.applied}),"
                            f" committed({self.committed})]")
        self.applied = i


cdef class Raft:
    """One Raft peer: feed it ticks and messages, collect Ready, call advance()."""

    def __init__(self, uint64_t id, storage, rng, *, int election_tick=10, int heartbeat_tick=1,
                 uint64_t applied=0, uint64_t max_msg_bytes=1024 * 1024, int max_inflight=256,
                 uint64_t max_inflight_bytes=0, uint64_t max_committed_bytes=64 * 1024 * 1024,
                 bint check_quorum=True, bint pre_vote=True,
                 bint unsafe_commit_previous_term=False):
        """Start (or restart) a peer from what storage holds.

        rng: a seeded random.Random (or anything with randrange) for election timeouts.
        unsafe_commit_previous_term: breaks the figure-8 rule; exists only so the simulator's
        checkers can be shown to catch the violation. Never set it elsewhere.
        """
        if id == NONE:
            raise ValueError("node id 0 is reserved")
        if heartbeat_tick <= 0 or election_tick <= heartbeat_tick:
            raise ValueError("election_tick must be greater than heartbeat_tick > 0")
        self.id = id
        self.rng = rng
        self.election_timeout = election_tick
        self.heartbeat_timeout = heartbeat_tick
        self.max_msg_bytes = max_msg_bytes
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.check_quorum = check_quorum
        self.pre_vote = pre_vote
        self.unsafe_commit_previous_term = unsafe_commit_previous_term
        self.log = RaftLog(storage, max_committed_bytes)
        self.msgs = []
        self.read_states = []
        self.prs = {}
        self.voters = []
        self.learners = []
        self.votes = {}
        self.pending_read_index = []
        self.read_acks = {}
        self.read_queue = []
        hs, cs = storage.initial_state()
        self.set_config(cs)
        if hs.term or hs.vote or hs.commit:
            if hs.commit < self.log.committed or hs.commit > self.log.last_index():
                raise RaftError(f"commit {hs.commit} is out of range"
                                f" [{self.log.committed}, {self.log.last_index()}]")
            self.log.committed = hs.commit
            self.term = hs.term
            self.vote = hs.vote
        if applied > 0:
            self.log.applied_to(applied)
        self.become_follower(self.term, NONE)
        self.prev_hard = HardState(self.term, self.vote, self.log.committed)
        self.prev_soft = SoftState(self.lead, self.role)
        self.pending_ready = None
        self.drop_reason = None

    # ---- configuration -------------------------------------------------------------------

    cdef void set_config(self, ConfState cs):
        cdef uint64_t nid
        cdef uint64_t nxt = self.log.last_index() + 1
        self.prs = {}
        for nid in cs.voters:
            self.prs[nid] = Progress(nxt, self.max_inflight, self.max_inflight_bytes, False)
        for nid in cs.learners:
            self.prs[nid] = Progress(nxt, self.max_inflight, self.max_inflight_bytes, True)
        self.voters = sorted(cs.voters)
        self.learners = sorted(cs.learners)

    cdef void apply_conf_change(self, ConfChange cc):
        cdef uint64_t nid = cc.node_id
        cdef Progress pr
        if cc.type == CONF_ADD_NODE:
            if nid in self.voters:
                return
            if nid in self.learners:
                self.learners.remove(nid)
                (<Progress>self.prs[nid]).is_learner = False
            else:
                pr = Progress(self.log.last_index() + 1, self.max_inflight,
                              self.max_inflight_bytes, False)
                # A new member counts as active so check-quorum gives it a chance to catch up.
                pr.recent_active = True
                self.prs[nid] = pr
            self.voters = sorted(self.voters + [nid])
        elif cc.type == CONF_ADD_LEARNER:
            if nid in self.voters or nid in self.learners:
                return  # demoting a voter is not a single-step change: ignore it
            pr = Progress(self.log.last_index() + 1, self.max_inflight,
                          self.max_inflight_bytes, True)
            pr.recent_active = True
            self.prs[nid] = pr
            self.learners = sorted(self.learners + [nid])
        elif cc.type == CONF_REMOVE_NODE:
            if nid not in self.prs:
                return
            del self.prs[nid]
            if nid in self.voters:
                self.voters.remove(nid)
            else:
                self.learners.remove(nid)
            if nid == self.lead_transferee:
                self.abort_leader_transfer()
        if self.role != LEADER:
            return
        if self.id not in self.voters:
            # A leader that is no longer a voter steps down; the rest elect among themselves.
            self.become_follower(self.term, NONE)
            return
        if self.maybe_commit():
            self.bcast_append()
        else:
            for nid in list(self.prs):
                if nid != self.id:
                    self.maybe_send_append(nid, False)

    cdef bint has_pending_conf_in_committed(self):
        cdef Entry e
        if not self.log.has_next_committed():
            return False
        for e in self.log.next_committed():
            if e.type == ENTRY_CONF_CHANGE:
                return True
        return False

    # ---- small helpers -------------------------------------------------------------------

    cdef void send(self, Message m):
        m.frm = self.id
        if m.type == MSG_VOTE or m.type == MSG_VOTE_RESP or m.type == MSG_PRE_VOTE \
                or m.type == MSG_PRE_VOTE_RESP:
            if m.term == 0:
                raise RaftError(f"term should be set when sending message type {m.type}")
        elif m.type != MSG_PROP and m.type != MSG_READ_INDEX:
            # Proposals and read requests are forwarded as they came, without a term.
            m.term = self.term
        self.msgs.append(m)

    cdef uint64_t stable_last_index(self):
        if self.log.unstable:
            return self.log.offset - 1
        return self.log.last_index()

    cdef int quorum(self):
        return len(self.voters) // 2 + 1

    cdef bint promotable(self):
        return self.id in self.voters and self.log.unstable_snapshot is None

    cdef void reset_randomized_election_timeout(self):
        self.randomized_election_timeout = (
            self.election_timeout + self.rng.randrange(self.election_timeout))

    cdef void reset(self, uint64_t term):
        cdef Progress pr
        cdef uint64_t nid
        cdef uint64_t last = self.log.last_index()
        cdef uint64_t stable = self.stable_last_index()
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.reset_randomized_election_timeout()
        self.abort_leader_transfer()
        self.votes = {}
        for nid, pr in self.prs.items():
            pr.reset_state(PROBE)
            pr.next = last + 1
            pr.match = stable if nid == self.id else 0
            pr.recent_active = False
        self.pending_conf_index = 0
        self.read_acks = {}
        self.read_queue = []

    cdef void become_follower(self, uint64_t term, uint64_t lead):
        self.reset(term)
        self.lead = lead
        self.role = FOLLOWER

    cdef void become_pre_candidate(self):
        if self.role == LEADER:
            raise RaftError("invalid transition [leader -> pre-candidate]")
        # Term and vote stay: a pre-election changes nothing durable.
        self.votes = {}
        self.lead = NONE
        self.role = PRE_CANDIDATE

    cdef void become_candidate(self):
        if self.role == LEADER:
            raise RaftError("invalid transition [leader -> candidate]")
        self.reset(self.term + 1)
        self.vote = self.id
        self.role = CANDIDATE

    cdef void become_leader(self):
        if self.role == FOLLOWER:
            raise RaftError("invalid transition [follower -> leader]")
        self.reset(self.term)
        self.lead = self.id
        self.role = LEADER
        cdef Progress me = self.prs.get(self.id)
        if me is not None:
            me.become_replicate()
            me.recent_active = True
        # No configuration change until everything up to here is applied (single-change rule).
        self.pending_conf_index = self.log.last_index()
        # The empty entry commits the previous terms' entries (they cannot commit by counting).
        self.append_entries([new_entry(0, 0, ENTRY_NORMAL, b"")])

    cdef void campaign(self, int kind):
        cdef int vote_type
        cdef uint64_t term
        cdef uint64_t nid
        cdef Message m
        if kind == CAMPAIGN_PRE_ELECTION:
            self.become_pre_candidate()
            vote_type = MSG_PRE_VOTE
            term = self.term + 1  # the term it would campaign in; not yet its own
        else:
            self.become_candidate()
            vote_type = MSG_VOTE
            term = self.term
        if self.poll(self.id, True) == VOTE_WON:
            # A single voter wins at once.
            if kind == CAMPAIGN_PRE_ELECTION:
                self.campaign(CAMPAIGN_ELECTION)
            else:
                self.become_leader()
            return
        cdef uint64_t li = self.log.last_index()
        cdef uint64_t lt = self.log.last_term()
        for nid in self.voters:
            if nid == self.id:
                continue
            m = new_message(vote_type, nid)
            m.term = term
            m.index = li
            m.log_term = lt
            if kind == CAMPAIGN_TRANSFER:
                m.context = CAMPAIGN_TRANSFER_CONTEXT
            self.send(m)

    cdef void hup(self, int kind):
        if self.role == LEADER:
            return
        if not self.promotable():
            return
        # A configuration change committed but not applied may change who may vote.
        if self.has_pending_conf_in_committed():
            return
        self.campaign(kind)

    cdef int poll(self, uint64_t frm, bint granted):
        if frm not in self.votes:
            self.votes[frm] = granted
        cdef int yes = 0, no = 0
        cdef uint64_t nid
        for nid in self.voters:
            v = self.votes.get(nid)
            if v is None:
                continue
            if v:
                yes += 1
            else:
                no += 1
        cdef int q = self.quorum()
        if yes >= q:
            return VOTE_WON
        if <int>len(self.voters) - no < q:
            return VOTE_LOST
        return VOTE_PENDING

    # ---- replication ---------------------------------------------------------------------

    cdef bint maybe_send_append(self, uint64_t to, bint send_if_empty):
        cdef Progress pr = self.prs[to]
        if pr.is_paused():
            return False
        cdef Message m = new_message(MSG_APP, to)
        cdef uint64_t prev_term
        cdef list ents
        cdef Snapshot snap
        cdef Entry e
        cdef uint64_t nbytes = 0
        try:
            prev_term = self.log.term(pr.next - 1)
            ents = self.log.slice(pr.next, self.log.last_index() + 1, self.max_msg_bytes)
        except CompactedError:
            # The follower needs entries that are gone: it gets a snapshot instead.
            if not pr.recent_active:
                return False
            try:
                snap = self.log.snapshot()
            except SnapshotTemporarilyUnavailableError:
                return False
            if snap.index == 0:
                raise RaftError("need non-empty snapshot")
            if to not in snap.conf_state.voters and to not in snap.conf_state.learners:
                # A member added after this snapshot was taken would refuse it (restore() turns
                # down a configuration without itself) and answer with its old commit index,
                # which sets the probe going again: SNAP, APP, reject, SNAP... with no tick in
                # between. Wait instead for a snapshot that names it (the application takes
                # one after the change); heartbeat answers retry.
                return False
            m.type = MSG_SNAP
            m.snapshot = snap
            pr.become_snapshot(snap.index)
            self.send(m)
            return True
        if not ents and not send_if_empty:
            return False
        m.index = pr.next - 1
        m.log_term = prev_term
        m.entries = ents
        m.commit = self.log.committed
        if ents:
            if pr.state == REPLICATE:
                e = ents[-1]
                for x in ents:
                    nbytes += entry_size(<Entry>x)
                pr.next = e.index + 1
                pr.inflights.add(e.index, nbytes)
            elif pr.state == PROBE:
                pr.probe_sent = True
        elif pr.state == PROBE:
            pr.probe_sent = True
        self.send(m)
        return True

    cdef void bcast_append(self):
        cdef uint64_t nid
        for nid in list(self.prs):
            if nid != self.id:
                self.maybe_send_append(nid, True)

    cdef void send_heartbeat(self, uint64_t to, bytes ctx):
        cdef Progress pr = self.prs[to]
        cdef Message m = new_message(MSG_HEARTBEAT, to)
        # Never tell a follower to commit beyond what it is known to hold.
        m.commit = min(pr.match, self.log.committed)
        m.context = ctx
        self.send(m)

    cdef void bcast_heartbeat(self, bytes ctx):
        cdef uint64_t nid
        if ctx is None and self.read_queue:
            ctx = self.read_queue[-1]
        for nid in list(self.prs):
            if nid != self.id:
                self.send_heartbeat(nid, ctx)

    cdef uint64_t quorum_match(self):
        cdef list matches = []
        cdef uint64_t nid
        for nid in self.voters:
            matches.append((<Progress>self.prs[nid]).match)
        matches.sort(reverse=True)
        return matches[self.quorum() - 1]

    cdef bint maybe_commit(self):
        if not self.voters:
            return False
        cdef uint64_t mci = self.quorum_match()
        if self.unsafe_commit_previous_term:
            if mci > self.log.committed:
                self.log.commit_to(mci)
                return True
            return False
        # The figure-8 rule: only an entry of the current term commits by counting replicas.
        return self.log.maybe_commit(mci, self.term)

    cdef void append_entries(self, list ents):
        cdef uint64_t li = self.log.last_index()
        cdef Entry e
        cdef Py_ssize_t i
        cdef list stamped = []
        # Fresh entries: the proposed ones may be shared (a duplicated message delivers the same
        # objects twice), and log entries must never change once made.
        for i in range(len(ents)):
            e = ents[i]
            stamped.append(new_entry(self.term, li + 1 + i, e.type, e.data))
        # The leader counts itself for an entry only once it is persisted (see advance()).
        self.log.append(stamped)

    cdef bint committed_entry_in_current_term(self):
        return self.log.term_or_zero(self.log.committed) == self.term

    cdef void send_timeout_now(self, uint64_t to):
        self.send(new_message(MSG_TIMEOUT_NOW, to))

    cdef void abort_leader_transfer(self):
        self.lead_transferee = NONE

    cdef bint quorum_active(self):
        cdef int active = 0
        cdef uint64_t nid
        cdef Progress pr
        for nid in self.voters:
            pr = self.prs[nid]
            if nid == self.id or pr.recent_active:
                active += 1
        for nid, pr in self.prs.items():
            if nid != self.id:
                pr.recent_active = False
        return active >= self.quorum()

    # ---- ReadIndex ---------------------------------------------------------------------

    cdef void handle_read_index(self, Message m):
        if len(self.voters) == 1:
            self.answer_read(m, self.log.committed)
            return
        # Until an entry of this term commits, the leader's commit index may be stale.
        if not self.committed_entry_in_current_term():
            self.pending_read_index.append(m)
            return
        cdef bytes ctx = m.context
        if ctx in self.read_acks:
            return
        self.read_acks[ctx] = (self.log.committed, m, {self.id})
        self.read_queue.append(ctx)
        self.bcast_heartbeat(ctx)

    cdef void answer_read(self, Message req, uint64_t index):
        cdef Message resp
        if req.frm == NONE or req.frm == self.id:
            self.read_states.append(ReadState(index, req.context))
        else:
            resp = new_message(MSG_READ_INDEX_RESP, req.frm)
            resp.index = index
            resp.context = req.context
            self.send(resp)

    cdef void recv_read_ack(self, uint64_t frm, bytes ctx):
        cdef tuple pending = self.read_acks.get(ctx)
        if pending is None:
            return
        acks = pending[2]
        acks.add(frm)
        cdef int n = 0
        cdef uint64_t nid
        for nid in self.voters:
            if nid in acks:
                n += 1
        if n < self.quorum():
            return
        # A quorum confirmed leadership after this request arrived: it and all before it are safe.
        cdef Py_ssize_t i = self.read_queue.index(ctx)
        for c in self.read_queue[:i + 1]:
            index, req, _ = self.read_acks.pop(c)
            self.answer_read(req, index)
        del self.read_queue[:i + 1]

    # ---- stepping ------------------------------------------------------------------------

    def step(self, Message m):
        """Feed one message (from a peer, or a local one) into the state machine."""
        self.drop_reason = None
        cdef bint force, in_lease
        cdef Message resp
        if m.term == 0:
            pass  # local message
        elif m.term > self.term:
            if m.type == MSG_VOTE or m.type == MSG_PRE_VOTE:
                force = m.context == CAMPAIGN_TRANSFER_CONTEXT
                in_lease = (self.check_quorum and self.lead != NONE
                            and self.election_elapsed < self.election_timeout)
                if not force and in_lease:
                    # It still hears from a leader: a partitioned node rejoining may not depose it.
                    return
            if m.type == MSG_PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MSG_PRE_VOTE_RESP and not m.reject:
                pass  # the term is bumped when the pre-election is won
            elif m.type == MSG_APP or m.type == MSG_HEARTBEAT or m.type == MSG_SNAP:
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and (
                    m.type == MSG_HEARTBEAT or m.type == MSG_APP):
                # A stale leader learns of the newer term and steps down; without this reply a
                # node that lost an election under check-quorum could stay stuck.
                self.send(new_message(MSG_APP_RESP, m.frm))
            elif m.type == MSG_PRE_VOTE:
                resp = new_message(MSG_PRE_VOTE_RESP, m.frm)
                resp.term = self.term
                resp.reject = True
                self.send(resp)
            return

        if m.type == MSG_HUP:
            self.hup(CAMPAIGN_PRE_ELECTION if self.pre_vote else CAMPAIGN_ELECTION)
        elif m.type == MSG_VOTE or m.type == MSG_PRE_VOTE:
            can_vote = (self.vote == m.frm
                        or (self.vote == NONE and self.lead == NONE)
                        or (m.type == MSG_PRE_VOTE and m.term > self.term))
            resp = new_message(MSG_VOTE_RESP if m.type == MSG_VOTE else MSG_PRE_VOTE_RESP, m.frm)
            if can_vote and self.log.is_up_to_date(m.index, m.log_term):
                # The response carries the request's term so a pre-candidate can count it.
                resp.term = m.term
                self.send(resp)
                if m.type == MSG_VOTE:
                    self.election_elapsed = 0
                    self.vote = m.frm
            else:
                resp.term = self.term
                resp.reject = True
                self.send(resp)
        elif self.role == LEADER:
            self.step_leader(m)
        elif self.role == FOLLOWER:
            self.step_follower(m)
        else:
            self.step_candidate(m)

    cdef void step_leader(self, Message m):
        cdef Progress pr
        cdef Entry e
        cdef uint64_t nid, probe, last
        cdef bint was_paused
        if m.type == MSG_BEAT:
            self.bcast_heartbeat(None)
            return
        if m.type == MSG_CHECK_QUORUM:
            if not self.quorum_active():
                self.become_follower(self.term, NONE)
            return
        if m.type == MSG_PROP:
            if not m.entries:
                raise RaftError("stepped empty proposal")
            if self.id not in self.prs:
                self.drop_reason = "this node was removed from the cluster"
                return
            if self.lead_transferee != NONE:
                self.drop_reason = "leadership transfer in progress"
                return
            for i in range(len(m.entries)):
                e = m.entries[i]
                if e.type == ENTRY_CONF_CHANGE:
                    if self.pending_conf_index > self.log.applied:
                        # One change at a time; the entry stays in the log as a no-op.
                        m.entries[i] = new_entry(0, 0, ENTRY_NORMAL, b"")
                        self.drop_reason = "a configuration change is already pending"
                    else:
                        self.pending_conf_index = self.log.last_index() + i + 1
            self.append_entries(m.entries)
            self.bcast_append()
            return
        if m.type == MSG_READ_INDEX:
            self.handle_read_index(m)
            return

        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if m.type == MSG_APP_RESP:
            pr.recent_active = True
            if m.reject:
                probe = m.reject_hint
                if m.log_term > 0:
                    probe = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
                if pr.maybe_decr_to(m.index, probe):
                    if pr.state == REPLICATE:
                        pr.become_probe()
                    self.maybe_send_append(m.frm, True)
                return
            was_paused = pr.is_paused()
            if pr.state == PROBE and m.index >= pr.match:
                pr.probe_sent = False
            # A probed follower that answers with exactly its known match (it was already
            # caught up when it was put back to probe) must return to replicate too: otherwise
            # match never moves, and each answer resumes the probe with another empty append,
            # answered again, for ever, with no tick in between.
            if pr.maybe_update(m.index) or (pr.state == PROBE and m.index == pr.match):
                if pr.state == PROBE:
                    pr.become_replicate()
                elif pr.state == SNAPSHOT and pr.match >= pr.pending_snapshot:
                    pr.become_probe()
                    pr.become_replicate()
                elif pr.state == REPLICATE:
                    pr.inflights.free_le(m.index)
                if self.maybe_commit():
                    self.release_pending_reads()
                    self.bcast_append()
                elif was_paused:
                    self.maybe_send_append(m.frm, True)
                # Keep the window full: send more while it is open and there is more.
                while self.maybe_send_append(m.frm, False):
                    pass
                if m.frm == self.lead_transferee and pr.match == self.log.last_index():
                    self.send_timeout_now(m.frm)
            elif was_paused and not pr.is_paused():
                self.maybe_send_append(m.frm, True)
        elif m.type == MSG_HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()
            if pr.match < self.log.last_index():
                self.maybe_send_append(m.frm, True)
            if m.context is not None:
                self.recv_read_ack(m.frm, m.context)
        elif m.type == MSG_SNAP_STATUS:
            if pr.state != SNAPSHOT:
                return
            if m.reject:
                pr.pending_snapshot = 0
            pr.become_probe()
            # Wait for the follower's answer (or a heartbeat) before probing again.
            pr.probe_sent = True
        elif m.type == MSG_UNREACHABLE:
            if pr.state == REPLICATE:
                pr.become_probe()
        elif m.type == MSG_TRANSFER_LEADER:
            if pr.is_learner:
                self.drop_reason = "a learner cannot become leader"
                return
            nid = m.frm
            if self.lead_transferee == nid or nid == self.id:
                return
            self.abort_leader_transfer()
            # The transfer must finish within one election timeout or it is abandoned.
            self.election_elapsed = 0
            self.lead_transferee = nid
            if pr.match == self.log.last_index():
                self.send_timeout_now(nid)
            else:
                self.maybe_send_append(nid, True)

    cdef release_pending_reads(self):
        if not self.pending_read_index or not self.committed_entry_in_current_term():
            return
        cdef list pending = self.pending_read_index
        self.pending_read_index = []
        for m in pending:
            self.handle_read_index(<Message>m)

    cdef void step_candidate(self, Message m):
        cdef int res
        cdef int my_resp = MSG_PRE_VOTE_RESP if self.role == PRE_CANDIDATE else MSG_VOTE_RESP
        if m.type == MSG_PROP:
            self.drop_reason = "no leader"
        elif m.type == MSG_APP:
            self.become_follower(m.term, m.frm)
            self.handle_append(m)
        elif m.type == MSG_HEARTBEAT:
            self.become_follower(m.term, m.frm)
            self.handle_heartbeat(m)
        elif m.type == MSG_SNAP:
            self.become_follower(m.term, m.frm)
            self.handle_snapshot(m)
        elif m.type == my_resp:
            res = self.poll(m.frm, not m.reject)
            if res == VOTE_WON:
                if self.role == PRE_CANDIDATE:
                    self.campaign(CAMPAIGN_ELECTION)
                else:
                    self.become_leader()
                    self.bcast_append()
            elif res == VOTE_LOST:
                self.become_follower(self.term, NONE)
        elif m.type == MSG_READ_INDEX:
            self.drop_reason = "no leader"

    cdef void step_follower(self, Message m):
        cdef Message fwd
        if m.type == MSG_PROP or m.type == MSG_READ_INDEX or m.type == MSG_TRANSFER_LEADER:
            if self.lead == NONE:
                self.drop_reason = "no leader"
                return
            fwd = m.copy()
            fwd.to = self.lead
            if fwd.frm == NONE:
                fwd.frm = self.id
            if m.type == MSG_TRANSFER_LEADER:
                fwd.term = 0
            self.msgs.append(fwd)
        elif m.type == MSG_APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self.handle_append(m)
        elif m.type == MSG_HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self.handle_heartbeat(m)
        elif m.type == MSG_SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self.handle_snapshot(m)
        elif m.type == MSG_TIMEOUT_NOW:
            # Leadership transfer: campaign at once, skipping pre-vote, with the force context.
            if self.promotable():
                self.campaign(CAMPAIGN_TRANSFER)
        elif m.type == MSG_READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    cdef void handle_append(self, Message m):
        cdef Message resp = new_message(MSG_APP_RESP, m.frm)
        cdef int64_t lastnew
        cdef uint64_t hint
        if m.index < self.log.committed:
            resp.index = self.log.committed
            self.send(resp)
            return
        lastnew = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if lastnew >= 0:
            resp.index = <uint64_t>lastnew
            self.send(resp)
            return
        # Reject with a hint: the last index at or below m.index whose term is <= m.log_term, so
        # the leader skips whole terms of conflicting entries in one round trip.
        hint = min(m.index, self.log.last_index())
        hint = self.log.find_conflict_by_term(hint, m.log_term)
        resp.index = m.index
        resp.reject = True
        resp.reject_hint = hint
        resp.log_term = self.log.term_or_zero(hint)
        self.send(resp)

    cdef void handle_heartbeat(self, Message m):
        # The leader sends min(match, commit). A follower that lost the unsynced tail of its
        # log (a torn WAL) holds less than its old match; what it still holds is a prefix of
        # what it acknowledged, so committing up to its own last entry stays safe.
        self.log.commit_to(min(m.commit, self.log.last_index()))
        cdef Message resp = new_message(MSG_HEARTBEAT_RESP, m.frm)
        resp.context = m.context
        self.send(resp)

    cdef void handle_snapshot(self, Message m):
        cdef Message resp = new_message(MSG_APP_RESP, m.frm)
        if self.restore(m.snapshot):
            resp.index = self.log.last_index()
        else:
            resp.index = self.log.committed
        self.send(resp)

    cdef bint restore(self, Snapshot s):
        if s.index <= self.log.committed:
            return False
        if self.role != FOLLOWER:
            self.become_follower(self.term + 1, NONE)
        if self.id not in s.conf_state.voters and self.id not in s.conf_state.learners:
            return False  # a snapshot of a configuration we are not part of
        if self.log.match_term(s.index, s.term):
            # We hold the snapshot's last entry: just move the commit index forward.
            self.log.commit_to(s.index)
            return False
        self.log.restore(s)
        self.set_config(s.conf_state)
        cdef Progress me = self.prs.get(self.id)
        if me is not None:
            me.maybe_update(s.index)
        return True

    # ---- the caller's API ------------------------------------------------------------------

    def tick(self):
        """Advance logical time by one tick."""
        if self.role == LEADER:
            self.heartbeat_elapsed += 1
            self.election_elapsed += 1
            if self.election_elapsed >= self.election_timeout:
                self.election_elapsed = 0
                if self.check_quorum:
                    self.step(new_message(MSG_CHECK_QUORUM, NONE))
                if self.role == LEADER and self.lead_transferee != NONE:
                    self.abort_leader_transfer()
            if self.role != LEADER:
                return
            if self.heartbeat_elapsed >= self.heartbeat_timeout:
                self.heartbeat_elapsed = 0
                self.step(new_message(MSG_BEAT, NONE))
        else:
            self.election_elapsed += 1
            if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                self.step(new_message(MSG_HUP, NONE))

    def campaign_now(self):
        """Start an election now (with pre-vote when enabled), as an expired timer would."""
        self.step(new_message(MSG_HUP, NONE))

    def propose(self, bytes data):
        """Propose one entry; raises ProposalDroppedError when it cannot be accepted here."""
        self.propose_many([data])

    def propose_many(self, datas):
        """Propose several entries in one message (they are appended and sent as one batch)."""
        cdef Message m = new_message(MSG_PROP, NONE)
        m.frm = self.id
        m.entries = [new_entry(0, 0, ENTRY_NORMAL, d) for d in datas]
        self.step_local(m)

    def propose_conf_change(self, ConfChange cc):
        """Propose a membership change; it takes effect when applied (on advance())."""
        if self.role == LEADER and self.pending_conf_index > self.log.applied:
            raise ProposalDroppedError("a configuration change is already pending")
        cdef Message m = new_message(MSG_PROP, NONE)
        m.frm = self.id
        m.entries = [new_entry(0, 0, ENTRY_CONF_CHANGE, cc.encode())]
        self.step_local(m)

    def read_index(self, bytes ctx):
        """Ask for a linearizable read point; the answer comes as a ReadState carrying ctx."""
        cdef Message m = new_message(MSG_READ_INDEX, NONE)
        m.frm = self.id
        m.context = ctx
        self.step_local(m)

    def transfer_leadership(self, uint64_t to):
        """Ask the leader to hand leadership to `to` (it must be a voter)."""
        cdef Message m = new_message(MSG_TRANSFER_LEADER, NONE)
        m.frm = to
        self.step_local(m)

    def report_unreachable(self, uint64_t nid):
        cdef Message m = new_message(MSG_UNREACHABLE, NONE)
        m.frm = nid
        self.step(m)

    def report_snapshot(self, uint64_t nid, bint failed):
        cdef Message m = new_message(MSG_SNAP_STATUS, NONE)
        m.frm = nid
        m.reject = failed
        self.step(m)

    def step_local(self, Message m):
        self.step(m)
        if self.drop_reason is not None:
            raise ProposalDroppedError(self.drop_reason)

    def has_ready(self):
        """Whether ready() would hand back anything."""
        if self.pending_ready is not None:
            return False
        if self.msgs or self.read_states or self.log.unstable or \
                self.log.unstable_snapshot is not None:
            return True
        if self.log.has_next_committed():
            return True
        if (self.term != self.prev_hard.term or self.vote != self.prev_hard.vote
                or self.log.committed != self.prev_hard.commit):
            return True
        return self.lead != self.prev_soft.leader or self.role != self.prev_soft.role

    def ready(self):
        """What to persist, send and apply now. Persist, then send, apply, and call advance()."""
        if self.pending_ready is not None:
            raise RaftError("ready() called again before advance()")
        cdef Ready rd = Ready.__new__(Ready)
        rd.entries = list(self.log.unstable)
        rd.snapshot = self.log.unstable_snapshot
        rd.committed_entries = self.log.next_committed()
        rd.messages = self.msgs
        self.msgs = []
        rd.read_states = self.read_states
        self.read_states = []
        if (self.term != self.prev_hard.term or self.vote != self.prev_hard.vote
                or self.log.committed != self.prev_hard.commit):
            rd.hard_state = HardState(self.term, self.vote, self.log.committed)
            self.prev_hard = rd.hard_state
        if self.lead != self.prev_soft.leader or self.role != self.prev_soft.role:
            rd.soft_state = SoftState(self.lead, self.role)
            self.prev_soft = rd.soft_state
        self.pending_ready = rd
        return rd

    def advance(self):
        """The last Ready is persisted, sent and applied: move on (and apply membership changes)."""
        cdef Ready rd = self.pending_ready
        cdef Entry e
        if rd is None:
            raise RaftError("advance() without a ready()")
        self.pending_ready = None
        if rd.snapshot is not None:
            self.log.stable_snap_to(rd.snapshot.index)
            if rd.snapshot.index > self.log.applied:
                self.log.applied = rd.snapshot.index
        if rd.entries:
            e = rd.entries[-1]
            self.log.stable_to(e.index, e.term)
            if self.role == LEADER:
                # Only now, persisted, does the leader's own copy count towards a quorum:
                # counting it earlier could commit an entry that a crash then loses.
                me = self.prs.get(self.id)
                if me is not None and (<Progress>me).maybe_update(self.stable_last_index()):
                    if self.maybe_commit():
                        self.release_pending_reads()
                        self.bcast_append()
        if rd.committed_entries:
            e = rd.committed_entries[-1]
            self.log.applied_to(e.index)
            for x in rd.committed_entries:
                e = x
                if e.type == ENTRY_CONF_CHANGE:
                    try:
                        cc = ConfChange.decode(e.data)
                    except ValueError:
                        continue
                    self.apply_conf_change(cc)

    def conf_state(self):
        """The configuration in force (as of the last applied change)."""
        return ConfState(self.voters, self.learners)

    def progress(self):
        """A copy-free view of the leader's per-peer progress (for inspection and tests)."""
        return dict(self.prs)

    @property
    def committed(self):
        return self.log.committed

    @property
    def applied(self):
        return self.log.applied

    @property
    def hard_state(self):
        return HardState(self.term, self.vote, self.log.committed)

    def log_entries(self, uint64_t lo=0):
        """All entries from lo (default: the first retained) to the last, stable or not."""
        first = self.log.first_index()
        if lo < first:
            lo = first
        return self.log.slice(lo, self.log.last_index() + 1, UNLIMITED)
