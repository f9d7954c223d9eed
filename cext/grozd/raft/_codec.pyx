# cython: language_level=3
"""The Raft wire format, hand-written: fixed little-endian fields, lengths before bytes.

    message  = format u8 | type u8 | flags u8 | to frm term log_term index commit hint: u64
               | n u32 | n x entry | [context] | [snapshot]
    entry    = term u64 | index u64 | type u8 | len u32 | data
    context  = len u32 | bytes                       (flags bit 2)
    snapshot = index u64 | term u64 | nv u32 | nv x u64 | nl u32 | nl x u64 | len u32 | data
                                                     (flags bit 1; bit 0 is `reject`)

Every read is bounds-checked: malformed input raises CodecError naming what and where.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from grozd.raft._core cimport ConfState, Entry, HardState, Message, Snapshot

DEF FORMAT = 2
DEF FLAG_REJECT = 1
DEF FLAG_SNAPSHOT = 2
DEF FLAG_CONTEXT = 4
DEF MAX_MESSAGE_TYPE = 18
DEF HEADER = 1 + 1 + 1 + 7 * 8 + 4
DEF ENTRY_HEAD = 8 + 8 + 1 + 4

FORMAT_VERSION = FORMAT


class CodecError(ValueError):
    """Bytes that are not a valid encoding of the expected value."""


cdef inline void put_u64(char* p, uint64_t v) noexcept:
    memcpy(p, &v, 8)  # the machines this runs on are little-endian (x86-64, aarch64)


cdef inline void put_u32(char* p, uint32_t v) noexcept:
    memcpy(p, &v, 4)


cdef class Reader:
    cdef const char* buf
    cdef Py_ssize_t size, pos
    cdef str what
    cdef bytes keep

    def __cinit__(self, bytes data, str what):
        self.keep = data
        self.buf = PyBytes_AS_STRING(data)
        self.size = PyBytes_GET_SIZE(data)
        self.pos = 0
        self.what = what

    cdef int need(self, Py_ssize_t n) except -1:
        if n < 0 or self.pos + n > self.size:
            raise CodecError(f"{self.what} is truncated: {n} bytes needed at offset {self.pos},"
                             f" {self.size - self.pos} left")
        return 0

    cdef uint64_t u64(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t v
        self.need(8)
        memcpy(&v, self.buf + self.pos, 8)
        self.pos += 8
        return v

    cdef uint32_t u32(self) except? 0xFFFFFFFF:
        cdef uint32_t v
        self.need(4)
        memcpy(&v, self.buf + self.pos, 4)
        self.pos += 4
        return v

    cdef uint8_t u8(self) except? 0xFF:
        self.need(1)
        self.pos += 1
        return <uint8_t>self.buf[self.pos - 1]

    cdef bytes blob(self):
        cdef uint32_t n = self.u32()
        self.need(n)
        cdef bytes b = PyBytes_FromStringAndSize(self.buf + self.pos, n)
        self.pos += n
        return b

    cdef int version(self) except -1:
        if self.size == 0:
            raise CodecError(f"empty {self.what}")
        cdef uint8_t v = self.u8()
        if v != FORMAT:
            raise CodecError(f"{self.what} has format {v}, this version reads format {FORMAT}")
        return 0

    cdef int end(self) except -1:
        if self.pos != self.size:
            raise CodecError(f"{self.what} has {self.size - self.pos} trailing bytes")
        return 0


cdef Py_ssize_t snapshot_size(Snapshot s):
    return (8 + 8 + 4 + 8 * len(s.conf_state.voters) + 4 + 8 * len(s.conf_state.learners)
            + 4 + len(s.data))


cdef char* put_snapshot(char* p, Snapshot s):
    cdef object nid
    cdef bytes data = s.data
    put_u64(p, s.index)
    put_u64(p + 8, s.term)
    p += 16
    put_u32(p, len(s.conf_state.voters))
    p += 4
    for nid in s.conf_state.voters:
        put_u64(p, nid)
        p += 8
    put_u32(p, len(s.conf_state.learners))
    p += 4
    for nid in s.conf_state.learners:
        put_u64(p, nid)
        p += 8
    put_u32(p, len(data))
    memcpy(p + 4, PyBytes_AS_STRING(data), len(data))
    return p + 4 + len(data)


cdef Snapshot read_snapshot(Reader r):
    cdef uint64_t index = r.u64(), term = r.u64()
    cdef uint32_t n = r.u32(), i
    r.need(<Py_ssize_t>n * 8)
    voters = [r.u64() for i in range(n)]
    n = r.u32()
    r.need(<Py_ssize_t>n * 8)
    learners = [r.u64() for i in range(n)]
    return Snapshot(index, term, ConfState(voters, learners), r.blob())


cdef char* put_entry(char* p, Entry e):
    cdef bytes data = e.data
    cdef Py_ssize_t n = len(data)
    put_u64(p, e.term)
    put_u64(p + 8, e.index)
    p[16] = <char>e.type
    put_u32(p + 17, <uint32_t>n)
    memcpy(p + ENTRY_HEAD, PyBytes_AS_STRING(data), n)
    return p + ENTRY_HEAD + n


cdef Entry read_entry(Reader r):
    cdef uint64_t term = r.u64(), index = r.u64()
    cdef uint8_t kind = r.u8()
    if kind > 1:
        raise CodecError(f"{r.what} has an entry of unknown type {kind}")
    return Entry(term, index, r.blob(), kind)


def encode_message(Message m) -> bytes:
    """Encode a message for a peer."""
    cdef Py_ssize_t size = HEADER
    cdef Entry e
    cdef bytes ctx = m.context
    for e in m.entries:
        size += ENTRY_HEAD + len(e.data)
    if ctx is not None:
        size += 4 + len(ctx)
    if m.snapshot is not None:
        size += snapshot_size(m.snapshot)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = FORMAT
    p[1] = <char>m.type
    p[2] = ((FLAG_REJECT if m.reject else 0) | (FLAG_SNAPSHOT if m.snapshot is not None else 0)
            | (FLAG_CONTEXT if ctx is not None else 0))
    put_u64(p + 3, m.to)
    put_u64(p + 11, m.frm)
    put_u64(p + 19, m.term)
    put_u64(p + 27, m.log_term)
    put_u64(p + 35, m.index)
    put_u64(p + 43, m.commit)
    put_u64(p + 51, m.reject_hint)
    put_u32(p + 59, len(m.entries))
    p += HEADER
    for e in m.entries:
        p = put_entry(p, e)
    if ctx is not None:
        put_u32(p, len(ctx))
        memcpy(p + 4, PyBytes_AS_STRING(ctx), len(ctx))
        p += 4 + len(ctx)
    if m.snapshot is not None:
        put_snapshot(p, m.snapshot)
    return out


def decode_message(bytes data) -> Message:
    """Decode a peer's message; raises CodecError on anything malformed."""
    cdef Reader r = Reader(data, "message")
    r.version()
    cdef uint8_t kind = r.u8(), flags = r.u8()
    if kind > MAX_MESSAGE_TYPE:
        raise CodecError(f"message has unknown type {kind}")
    if flags & ~(FLAG_REJECT | FLAG_SNAPSHOT | FLAG_CONTEXT):
        raise CodecError(f"message has unknown flags {flags:#x}")
    cdef Message m = Message.__new__(Message)
    m.type = kind
    m.reject = flags & FLAG_REJECT
    m.to = r.u64()
    m.frm = r.u64()
    m.term = r.u64()
    m.log_term = r.u64()
    m.index = r.u64()
    m.commit = r.u64()
    m.reject_hint = r.u64()
    cdef uint32_t n = r.u32(), i
    r.need(<Py_ssize_t>n * ENTRY_HEAD)
    m.entries = [read_entry(r) for i in range(n)]
    m.context = r.blob() if flags & FLAG_CONTEXT else None
    m.snapshot = read_snapshot(r) if flags & FLAG_SNAPSHOT else None
    r.end()
    return m


def encode_entry(Entry e) -> bytes:
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + ENTRY_HEAD + len(e.data))
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = FORMAT
    put_entry(p + 1, e)
    return out


def decode_entry(bytes data) -> Entry:
    cdef Reader r = Reader(data, "entry")
    r.version()
    cdef Entry e = read_entry(r)
    r.end()
    return e


def encode_hard_state(HardState hs) -> bytes:
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 25)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = FORMAT
    put_u64(p + 1, hs.term)
    put_u64(p + 9, hs.vote)
    put_u64(p + 17, hs.commit)
    return out


def decode_hard_state(bytes data) -> HardState:
    cdef Reader r = Reader(data, "hard state")
    r.version()
    cdef uint64_t term = r.u64(), vote = r.u64(), commit = r.u64()
    r.end()
    return HardState(term, vote, commit)


def encode_snapshot(Snapshot s) -> bytes:
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + snapshot_size(s))
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = FORMAT
    put_snapshot(p + 1, s)
    return out


def decode_snapshot(bytes data) -> Snapshot:
    cdef Reader r = Reader(data, "snapshot")
    r.version()
    cdef Snapshot s = read_snapshot(r)
    r.end()
    return s
