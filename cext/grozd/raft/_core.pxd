# Declarations of the Raft core; bodies live in _core.pyx.

from libc.stdint cimport uint64_t, int64_t


cdef class Entry:
    cdef readonly uint64_t term
    cdef readonly uint64_t index
    cdef readonly int type
    cdef readonly bytes data


cdef class ConfState:
    cdef readonly tuple voters
    cdef readonly tuple learners


cdef class Snapshot:
    cdef readonly uint64_t index
    cdef readonly uint64_t term
    cdef readonly ConfState conf_state
    cdef readonly bytes data


cdef class Message:
    cdef public int type
    cdef public uint64_t to
    cdef public uint64_t frm
    cdef public uint64_t term
    cdef public uint64_t log_term
    cdef public uint64_t index
    cdef public list entries
    cdef public uint64_t commit
    cdef public bint reject
    cdef public uint64_t reject_hint
    cdef public Snapshot snapshot
    cdef public bytes context


cdef class HardState:
    cdef readonly uint64_t term
    cdef readonly uint64_t vote
    cdef readonly uint64_t commit


cdef class SoftState:
    cdef readonly uint64_t leader
    cdef readonly int role


cdef class ReadState:
    cdef readonly uint64_t index
    cdef readonly bytes context


cdef class ConfChange:
    cdef readonly int type
    cdef readonly uint64_t node_id
    cdef readonly bytes context


cdef class Ready:
    cdef readonly HardState hard_state
    cdef readonly SoftState soft_state
    cdef readonly list entries
    cdef readonly Snapshot snapshot
    cdef readonly list messages
    cdef readonly list committed_entries
    cdef readonly list read_states


cdef class MemoryStorage:
    cdef list _ents        # _ents[0] is a dummy standing for the snapshot (its index and term)
    cdef readonly HardState hard_state
    cdef readonly Snapshot _snapshot
    cdef readonly ConfState conf_state
    cpdef uint64_t first_index(self)
    cpdef uint64_t last_index(self)
    cpdef uint64_t term(self, uint64_t i) except? 0
    cpdef list entries(self, uint64_t lo, uint64_t hi, uint64_t max_bytes)


cdef class Inflights:
    cdef uint64_t* _index
    cdef uint64_t* _bytes
    cdef int _start, _count, _cap
    cdef uint64_t _total_bytes, _max_bytes
    cdef bint full(self)
    cdef void add(self, uint64_t index, uint64_t nbytes)
    cdef void free_le(self, uint64_t index)
    cdef void free_first_one(self)
    cdef void reset(self)


cdef class Progress:
    cdef readonly uint64_t match
    cdef readonly uint64_t next
    cdef readonly int state
    cdef readonly bint probe_sent
    cdef readonly uint64_t pending_snapshot
    cdef readonly bint recent_active
    cdef readonly bint is_learner
    cdef Inflights inflights
    cdef void reset_state(self, int state)
    cdef void become_probe(self)
    cdef void become_replicate(self)
    cdef void become_snapshot(self, uint64_t index)
    cdef bint maybe_update(self, uint64_t n)
    cdef bint maybe_decr_to(self, uint64_t rejected, uint64_t match_hint)
    cdef bint is_paused(self)


cdef class RaftLog:
    cdef object storage
    cdef MemoryStorage mem     # the same object when storage is a MemoryStorage: C-speed calls
    cdef list unstable         # entries not yet persisted, starting at index `offset`
    cdef uint64_t offset
    cdef Snapshot unstable_snapshot
    cdef readonly uint64_t committed
    cdef readonly uint64_t applied
    cdef readonly uint64_t max_committed_bytes
    cpdef uint64_t first_index(self)
    cpdef uint64_t last_index(self)
    cpdef uint64_t term(self, uint64_t i) except? 0
    cdef uint64_t term_or_zero(self, uint64_t i)
    cdef uint64_t last_term(self)
    cdef bint match_term(self, uint64_t i, uint64_t t)
    cdef bint is_up_to_date(self, uint64_t lasti, uint64_t t)
    cdef void append(self, list ents)
    cdef uint64_t find_conflict(self, list ents)
    cdef uint64_t find_conflict_by_term(self, uint64_t index, uint64_t t)
    cdef int64_t maybe_append(self, uint64_t index, uint64_t log_term, uint64_t committed, list ents) except -2
    cdef void commit_to(self, uint64_t c) except *
    cdef bint maybe_commit(self, uint64_t i, uint64_t t)
    cpdef list slice(self, uint64_t lo, uint64_t hi, uint64_t max_bytes)
    cdef list next_committed(self)
    cdef bint has_next_committed(self)
    cdef Snapshot snapshot(self)
    cdef void restore(self, Snapshot s)
    cdef void stable_to(self, uint64_t i, uint64_t t)
    cdef void stable_snap_to(self, uint64_t i)
    cdef void applied_to(self, uint64_t i)


cdef class Raft:
    cdef readonly uint64_t id
    cdef readonly uint64_t term
    cdef readonly uint64_t vote
    cdef readonly uint64_t lead
    cdef readonly int role
    cdef readonly RaftLog log
    cdef dict prs              # node id -> Progress, voters and learners
    cdef list voters           # sorted: iteration order decides message order, keep it deterministic
    cdef list learners
    cdef dict votes
    cdef list msgs
    cdef list read_states
    cdef int election_timeout
    cdef int heartbeat_timeout
    cdef readonly int randomized_election_timeout
    cdef readonly int election_elapsed
    cdef int heartbeat_elapsed
    cdef readonly bint check_quorum
    cdef readonly bint pre_vote
    cdef readonly uint64_t lead_transferee
    cdef readonly uint64_t pending_conf_index
    cdef uint64_t max_msg_bytes
    cdef int max_inflight
    cdef uint64_t max_inflight_bytes
    cdef object rng
    cdef bint unsafe_commit_previous_term
    cdef list pending_read_index
    cdef dict read_acks       # read context -> (index, request message, set of acks)
    cdef list read_queue      # read contexts in arrival order
    cdef HardState prev_hard
    cdef SoftState prev_soft
    cdef Ready pending_ready
    cdef str drop_reason

    cdef void send(self, Message m)
    cdef int quorum(self)
    cdef bint promotable(self)
    cdef void reset(self, uint64_t term)
    cdef void reset_randomized_election_timeout(self)
    cdef void become_follower(self, uint64_t term, uint64_t lead)
    cdef void become_candidate(self)
    cdef void become_pre_candidate(self)
    cdef void become_leader(self)
    cdef void campaign(self, int kind)
    cdef void hup(self, int kind)
    cdef int poll(self, uint64_t frm, bint granted)
    cdef bint maybe_send_append(self, uint64_t to, bint send_if_empty)
    cdef void bcast_append(self)
    cdef void send_heartbeat(self, uint64_t to, bytes ctx)
    cdef void bcast_heartbeat(self, bytes ctx)
    cdef bint maybe_commit(self)
    cdef uint64_t quorum_match(self)
    cdef void append_entries(self, list ents)
    cdef bint committed_entry_in_current_term(self)
    cdef void send_timeout_now(self, uint64_t to)
    cdef void abort_leader_transfer(self)
    cdef bint quorum_active(self)
    cdef void step_leader(self, Message m)
    cdef void step_candidate(self, Message m)
    cdef void step_follower(self, Message m)
    cdef void handle_append(self, Message m)
    cdef void handle_heartbeat(self, Message m)
    cdef void handle_snapshot(self, Message m)
    cdef bint restore(self, Snapshot s)
    cdef void handle_read_index(self, Message m)
    cdef void answer_read(self, Message req, uint64_t index)
    cdef void recv_read_ack(self, uint64_t frm, bytes ctx)
    cdef void set_config(self, ConfState cs)
    cdef void apply_conf_change(self, ConfChange cc)
    cdef bint has_pending_conf_in_committed(self)
    cdef release_pending_reads(self)
    cdef uint64_t stable_last_index(self)
