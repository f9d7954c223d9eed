"""The write-ahead log: etcd's segment layout and recovery rules, with group commit.

Layout: `<dir>/%016x-%016x.wal` segment files (sequence number, index of the first entry the
segment may hold), appended to until one reaches `segment_bytes`, then a new one is cut.

Every record is framed as::

    length u32 LE | crc32c u32 LE | type u8 | payload
    (length = len(payload); the crc32c covers the type byte and the payload)

Record types (`RecordType`):

* SEGMENT    -- first record of every segment: WAL_FORMAT byte + msgpack
                [seq, first_index, head_len]; head_len is the byte length of the records that
                follow it and were written with it (the segment's "head").
* METADATA   -- the caller's opaque bytes given at creation (cluster id, member id ...).
* ENTRY      -- `codec.encode_entry` (its own format byte first).
* HARD_STATE -- `codec.encode_hard_state`.
* SNAPSHOT   -- marker of a snapshot saved elsewhere: WAL_FORMAT byte + msgpack
                [index, term, keep]; keep says whether the log entries after `index` survive
                (the snapshot matched the log: a compaction) or are discarded (the snapshot
                replaced a conflicting log: a follower installing the leader's snapshot).

A segment's head is SEGMENT, METADATA, the latest SNAPSHOT marker (if any) and the latest
HARD_STATE (if any), so each segment stands alone once older ones are released. A head is
written to a temporary file, fsynced and renamed into place, so damage inside a head is never a
torn write and is always reported as corruption.

Recovery replays every segment in order. A torn tail (the last segment ends in an incomplete
record, a record failing its CRC, or zeros, with no valid record after it) is truncated away and
reported; any other damage raises `WALCorruptError` naming the file and byte offset. Files are
changed only once the whole recovery has succeeded.

Writes: `save` is one write() and one fdatasync() for the whole batch. If either fails, the
segment is truncated back to its size before the call and `WALWriteError` is raised; the WAL
stays usable. Segment cuts and directory changes use fsync(), and a failed cut only logs: the
batch before it is already durable, and the next write retries the cut.

Release: `release_to(index)` deletes the oldest segments whose entries are all <= index, but
never past the latest snapshot marker, never the current segment, and always keeps `max_wals`.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple, NoReturn, TypeVar

import crc32c
import msgpack

from grozd.raft import codec
from grozd.raft.core import Entry, HardState

log = logging.getLogger("grozd.raft.wal")

WAL_FORMAT = 1
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
ZERO_TAIL = "zero-filled tail"
DEFAULT_MAX_WALS = 5
# Bigger payloads are refused on write; a bigger length on read is damage, not a torn write.
MAX_RECORD_BYTES = 64 * 1024 * 1024

_HEADER = struct.Struct("<IIB")  # payload length, crc32c(type + payload), type
_HDR = _HEADER.size
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
_TMP = ".tmp"
T = TypeVar("T")


class RecordType(IntEnum):
    """Record types; 0 is never written, so a zero-filled region never parses as a record."""

    SEGMENT = 1
    METADATA = 2
    ENTRY = 3
    HARD_STATE = 4
    SNAPSHOT = 5


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)


class WALError(Exception):
    """Base class of the WAL's errors."""


class WALCorruptError(WALError):
    """Damaged or inconsistent data that recovery refuses to guess about."""

    def __init__(self, path: Path | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt WAL record at offset {offset}: {reason}")
        self.path = Path(path)
        self.offset = offset
        self.reason = reason


class WALFormatError(WALError):
    """A record of a type or payload format this version cannot read (a newer writer)."""

    def __init__(self, path: Path | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: unreadable WAL record at offset {offset}: {reason}")
        self.path = Path(path)
        self.offset = offset
        self.reason = reason


class WALExistsError(WALError, FileExistsError):
    """`WAL.create` on a directory that already holds a WAL."""


class WALLockedError(WALError):
    """Another open WAL (this process or another) holds the directory."""


class WALWriteError(WALError):
    """A write or fsync failed; nothing of that call was kept and the WAL remains usable."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SnapshotMarker(NamedTuple):
    """Index and term of a snapshot saved outside the WAL."""

    index: int
    term: int


@dataclass(frozen=True)
class Repair:
    """What recovery cut off the end of the last segment."""

    file: Path
    offset: int
    dropped: int
    reason: str

    def __str__(self) -> str:
        return (f"truncated torn tail of {self.file} at offset {self.offset}"
                f" ({self.dropped} bytes dropped: {self.reason})")


@dataclass(frozen=True)
class Recovered:
    """The state a WAL held when opened."""

    metadata: bytes
    hard_state: HardState | None  # None if no hard state was ever saved
    snapshot: SnapshotMarker | None  # the latest marker
    entries: list[Entry]  # the log after snapshot.index (or from index 1), contiguous
    repaired: Repair | None


# ---- encoding ---------------------------------------------------------------------------------


def _record(rtype: RecordType, payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"WAL record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    body = bytes((rtype,)) + payload
    return struct.pack("<II", len(payload), crc32c.crc32c(body)) + body


def _segment_name(seq: int, first_index: int) -> str:
    return f"{seq:016x}-{first_index:016x}.wal"


def _head(seq: int, first_index: int, metadata: bytes, marker: SnapshotMarker | None,
          hard_state: HardState | None) -> bytes:
    rest = [_record(RecordType.METADATA, metadata)]
    if marker is not None:
        rest.append(_record(RecordType.SNAPSHOT, _marker_payload(marker, keep=True)))
    if hard_state is not None:
        rest.append(_record(RecordType.HARD_STATE, codec.encode_hard_state(hard_state)))
    body = b"".join(rest)
    seg = bytes((WAL_FORMAT,)) + msgpack.packb([seq, first_index, len(body)])
    return _record(RecordType.SEGMENT, seg) + body


def _marker_payload(marker: SnapshotMarker, keep: bool) -> bytes:
    return bytes((WAL_FORMAT,)) + msgpack.packb([marker.index, marker.term, keep])


# ---- small durable-filesystem helpers ---------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entries survive a crash."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # never seen in practice; guard against spinning
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[n:]


# ---- reading ------------------------------------------------------------------------------------


class _Segment(NamedTuple):
    seq: int
    first_index: int
    path: Path


def _list_segments(d: Path) -> list[_Segment]:
    segs = []
    for name in os.listdir(d):
        m = _NAME.match(name)
        if m:
            segs.append(_Segment(int(m.group(1), 16), int(m.group(2), 16), d / name))
    segs.sort()
    return segs


def _valid_record_end(data: memoryview, off: int) -> int | None:
    """End offset of a complete, CRC-valid record starting at `off`, else None."""
    n = len(data)
    if n - off < _HDR:
        return None
    length, crc, _ = _HEADER.unpack_from(data, off)
    end = off + _HDR + length
    if length > MAX_RECORD_BYTES or end > n:
        return None
    return end if crc32c.crc32c(data[off + 8:end]) == crc else None


def _parse_segment(seg: _Segment, data: bytes, is_last: bool
                   ) -> tuple[list[tuple[int, int, bytes]], Repair | None]:
    """Frame a segment into (offset, type, payload) records, classifying any damage."""
    view = memoryview(data)
    n = len(data)
    records: list[tuple[int, int, bytes]] = []
    head_end: int | None = None  # unknown until the SEGMENT record is read: all of it is head
    off = 0

    def damaged(reason: str) -> Repair:
        if not is_last:
            raise WALCorruptError(seg.path, off, reason + " (not the last segment)")
        if head_end is None or off < head_end:
            raise WALCorruptError(seg.path, off, reason + " (inside the segment head)")
        # A torn write only ever damages the very end; a valid record after the damage means
        # the damage is in the middle, and truncating would drop acknowledged data.
        if data.count(0, off) == n - off:  # zeros never parse as a record: skip the scan
            return Repair(seg.path, off, n - off, ZERO_TAIL)
        for y in range(off + 1, n - _HDR + 1):
            if _valid_record_end(view, y) is not None:
                raise WALCorruptError(seg.path, off, f"{reason}, followed by a valid record at"
                                      f" offset {y}")
        return Repair(seg.path, off, n - off, reason)

    while off < n:
        if n - off < _HDR:
            return records, damaged(f"incomplete record header ({n - off} of {_HDR} bytes)")
        length, crc, rtype = _HEADER.unpack_from(view, off)
        if length > MAX_RECORD_BYTES:
            raise WALCorruptError(seg.path, off, f"record length {length} is absurd"
                                  f" (max {MAX_RECORD_BYTES})")
        end = off + _HDR + length
        if end > n:
            return records, damaged(f"incomplete record ({n - off - _HDR} of {length} payload"
                                    " bytes)")
        if crc32c.crc32c(view[off + 8:end]) != crc:
            return records, damaged("crc mismatch")
        payload = bytes(view[off + _HDR:end])
        if off == 0:
            head_end = end + _check_segment_record(seg, rtype, payload)
        elif head_end is not None and off < head_end < end:
            raise WALCorruptError(seg.path, off, "record crosses the end of the segment head")
        records.append((off, rtype, payload))
        off = end
    if head_end is None or head_end > n:
        raise WALCorruptError(seg.path, n, "segment ends inside its head")
    return records, None


def _check_segment_record(seg: _Segment, rtype: int, payload: bytes) -> int:
    """Validate a segment's first record against its file name; return the head length."""
    if rtype != RecordType.SEGMENT:
        raise WALCorruptError(seg.path, 0, f"segment starts with record type {rtype}, not"
                              " a segment header")
    body = _versioned(seg.path, 0, payload, "segment header", 3)
    seq, first, head_len = body
    if (seq, first) != (seg.seq, seg.first_index):
        raise WALCorruptError(seg.path, 0, f"segment header says seq {seq:x} first index"
                              f" {first:x}, the file name says otherwise")
    return head_len


def _versioned(path: Path, off: int, payload: bytes, what: str, fields: int) -> list:
    if not payload or payload[0] != WAL_FORMAT:
        got = payload[0] if payload else "none"
        raise WALFormatError(path, off, f"{what} has format {got}, this version reads format"
                             f" {WAL_FORMAT}")
    try:
        body = msgpack.unpackb(payload[1:], use_list=True, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WALCorruptError(path, off, f"{what} is not valid msgpack: {e}") from None
    if (not isinstance(body, list) or len(body) != fields
            or not all(isinstance(v, int) and v >= 0 for v in body)):
        raise WALCorruptError(path, off, f"{what} is malformed: {body!r:.80}")
    return body


def _decode(path: Path, off: int, payload: bytes, what: str, decode: Callable[[bytes], T]) -> T:
    if not payload or payload[0] != codec.FORMAT:
        got = payload[0] if payload else "none"
        raise WALFormatError(path, off, f"{what} has format {got}, this version reads format"
                             f" {codec.FORMAT}")
    try:
        return decode(payload)
    except codec.CodecError as e:
        raise WALCorruptError(path, off, str(e)) from None


class _Replay:
    """The log as the records rebuild it: the latest marker and the entries after it."""

    def __init__(self) -> None:
        self.base: SnapshotMarker | None = None
        self.ents: list[Entry] = []

    @property
    def base_index(self) -> int:
        return self.base.index if self.base is not None else 0

    def entry(self, e: Entry, path: Path, off: int) -> None:
        if e.index <= self.base_index:
            raise WALCorruptError(path, off, f"entry {e.index} is at or below the snapshot"
                                  f" index {self.base_index}")
        ents = self.ents
        # An index below what is known can only follow released segments: it replaces all.
        if not ents or e.index < ents[0].index:
            self.ents = [e]
            return
        if e.index > ents[-1].index + 1:
            raise WALCorruptError(path, off, f"entry {e.index} leaves a gap after entry"
                                  f" {ents[-1].index}")
        del ents[e.index - ents[0].index:]  # a rewrite replaces that index and all after it
        ents.append(e)

    def marker(self, m: SnapshotMarker, keep: bool, path: Path, off: int) -> None:
        if m == self.base:
            return  # the copy at the head of a segment
        if self.base is not None and m.index <= self.base.index:
            raise WALCorruptError(path, off, f"snapshot marker {tuple(m)} does not follow"
                                  f" {tuple(self.base)}")
        ents = self.ents
        if keep and ents:
            first = ents[0].index
            if first <= m.index <= ents[-1].index and ents[m.index - first].term != m.term:
                raise WALCorruptError(path, off, f"snapshot marker {tuple(m)} disagrees with"
                                      f" the logged term {ents[m.index - first].term}")
            self.ents = ents[max(0, m.index + 1 - first):]
        else:
            self.ents = []
        self.base = m


# ---- the log ------------------------------------------------------------------------------------


class PendingSave(NamedTuple):
    """A batch written by `WAL.write`, waiting for its fdatasync."""

    fd: int  # the segment written to, for the caller to fdatasync
    start: int
    size: int
    hard_state: HardState | None
    entries: list[Entry]


class WAL:
    """An open write-ahead log (one writer; methods are serialised by a lock).

    Get one from `WAL.create` or `WAL.open`. Call `save_snapshot` before `save` when a Ready
    carries both a snapshot and entries (the entries follow the snapshot's index).
    """

    def __init__(self, dir: Path, *, segment_bytes: int, max_wals: int, dir_fd: int,
                 metadata: bytes, segments: list[_Segment], fd: int, size: int,
                 replay: _Replay, hard_state: HardState | None, preallocate: int = 0,
                 allocated: int = 0) -> None:
        self._dir = dir
        # Zeros written ahead of the end, `preallocate` bytes at a time: a record then
        # overwrites them and its fdatasync need not also record a new file size (about
        # half the time). `_allocated` is the file's size; `_size` where the log ends.
        self._preallocate = preallocate
        self._allocated = max(allocated, size)
        self._segment_bytes = segment_bytes
        self._max_wals = max_wals
        self._dir_fd = dir_fd
        self._metadata = metadata
        self._segments = segments
        self._fd = fd
        self._size = size
        self._hard_state = hard_state
        self._base = replay.base
        ents = replay.ents
        self._last_index = ents[-1].index if ents else replay.base_index
        # The live log's terms as runs of (first index, term): enough to tell whether a
        # snapshot matches the log, without keeping the entries in memory.
        self._runs: list[tuple[int, int]] = []
        for e in ents:
            if not self._runs or self._runs[-1][1] != e.term:
                self._runs.append((e.index, e.term))
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False
        self.fsyncs = 0  # fsync/fdatasync calls that succeeded (files and directory)
        self.bytes_written = 0  # bytes durably appended to segments

    # ---- opening ----

    @staticmethod
    def exists(dir: Path | str) -> bool:
        """Whether `dir` holds WAL segments."""
        d = Path(dir)
        return d.is_dir() and any(_NAME.match(n) for n in os.listdir(d))

    @classmethod
    def create(cls, dir: Path | str, metadata: bytes, *,
               segment_bytes: int = DEFAULT_SEGMENT_BYTES,
               max_wals: int = DEFAULT_MAX_WALS, preallocate: int = 0) -> WAL:
        """Create an empty WAL atomically: built in `<dir>.tmp`, fsynced, renamed to `dir`."""
        _check_limits(segment_bytes, max_wals)
        d = Path(dir)
        if cls.exists(d):
            raise WALExistsError(f"{d}: a WAL already exists here")
        _makedirs(d.parent)
        tmp = d.with_name(d.name + _TMP)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed create: never a usable WAL
        tmp.mkdir()
        seg = tmp / _segment_name(0, 0)
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, _head(0, 0, bytes(metadata), None, None))
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(tmp)
        if d.exists():
            try:
                d.rmdir()  # empty, as exists() said: rename needs it gone
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise WALError(f"{d}: cannot create a WAL here: {e.strerror}") from e
        os.rename(tmp, d)
        _fsync_dir(d.parent)
        wal, _ = cls.open(d, segment_bytes=segment_bytes, max_wals=max_wals,
                          preallocate=preallocate)
        return wal

    @classmethod
    def open(cls, dir: Path | str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
             max_wals: int = DEFAULT_MAX_WALS, preallocate: int = 0) -> tuple[WAL, Recovered]:
        """Open for appending after recovering every segment; repairs a torn tail.

        ``preallocate`` > 0: keep that many zero bytes ahead of the end (see `__init__`); a
        zero-filled tail is then taken as such space, kept and not reported as a repair.

        Raises WALCorruptError / WALFormatError without touching any file if recovery fails,
        WALLockedError if another open WAL holds the directory.
        """
        _check_limits(segment_bytes, max_wals)
        d = Path(dir)
        if not cls.exists(d):
            raise WALError(f"{d}: no WAL segments here")
        dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                # Two writers appending to one log would interleave records: refuse the second.
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WALLockedError(f"{d}: the WAL is open elsewhere") from None
            return cls._recover(d, dir_fd, segment_bytes, max_wals, preallocate)
        except BaseException:
            os.close(dir_fd)
            raise

    @classmethod
    def _recover(cls, d: Path, dir_fd: int, segment_bytes: int, max_wals: int,
                 preallocate: int) -> tuple[WAL, Recovered]:
        segs = _list_segments(d)
        for a, b in zip(segs, segs[1:], strict=False):
            if b.seq != a.seq + 1:
                raise WALCorruptError(b.path, 0, f"segment sequence jumps from {a.seq:x} to"
                                      f" {b.seq:x}: a segment is missing")
        replay = _Replay()
        metadata: bytes | None = None
        hard_state: HardState | None = None
        repair: Repair | None = None
        last_size = file_size = 0
        for i, seg in enumerate(segs):
            data = seg.path.read_bytes()
            records, rep = _parse_segment(seg, data, is_last=i == len(segs) - 1)
            if rep is not None:
                repair = rep
            last_size = rep.offset if rep is not None else len(data)
            file_size = len(data)
            seen_meta = False
            for off, rtype, payload in records[1:]:
                if rtype == RecordType.ENTRY:
                    e = _decode(seg.path, off, payload, "entry", codec.decode_entry)
                    replay.entry(e, seg.path, off)
                elif rtype == RecordType.HARD_STATE:
                    hard_state = _decode(seg.path, off, payload, "hard state",
                                         codec.decode_hard_state)
                elif rtype == RecordType.SNAPSHOT:
                    index, term, keep = _versioned(seg.path, off, payload, "snapshot marker", 3)
                    replay.marker(SnapshotMarker(index, term), bool(keep), seg.path, off)
                elif rtype == RecordType.METADATA:
                    if metadata is not None and payload != metadata:
                        raise WALCorruptError(seg.path, off, "metadata differs from the"
                                              " earlier segments'")
                    metadata = payload
                    seen_meta = True
                elif rtype == RecordType.SEGMENT:
                    raise WALCorruptError(seg.path, off, "segment header in mid-segment")
                else:
                    raise WALFormatError(seg.path, off, f"unknown record type {rtype}")
            if not seen_meta:
                raise WALCorruptError(seg.path, 0, "segment has no metadata record")
        if replay.ents and replay.ents[0].index != replay.base_index + 1:
            raise WALCorruptError(segs[0].path, 0, f"log starts at entry {replay.ents[0].index}"
                                  f" but the snapshot marker is at {replay.base_index}:"
                                  " segments were removed past the snapshot")
        assert metadata is not None
        if preallocate and repair is not None and repair.reason == ZERO_TAIL:
            repair = None  # the space written ahead of the end: kept as it is
        # Recovery succeeded: only now change files.
        last = segs[-1].path
        fd = os.open(last, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, last_size, os.SEEK_SET)  # appends go where the log ends
            if repair is not None:
                os.ftruncate(fd, repair.offset)
                os.fsync(fd)
                file_size = repair.offset
                log.warning("event=wal_torn_tail_repaired file=%s offset=%d dropped=%d"
                            " reason=%r", repair.file, repair.offset, repair.dropped,
                            repair.reason)
            stale = [n for n in os.listdir(d) if n.endswith(".wal" + _TMP)]
            for n in stale:  # a cut that crashed before its rename: never part of the log
                log.warning("event=wal_stale_temp_removed file=%s", d / n)
                os.unlink(d / n)
            if stale:
                os.fsync(dir_fd)
        except BaseException:
            os.close(fd)
            raise
        wal = cls(d, segment_bytes=segment_bytes, max_wals=max_wals, dir_fd=dir_fd,
                  metadata=metadata, segments=segs, fd=fd, size=last_size, replay=replay,
                  hard_state=hard_state, preallocate=preallocate, allocated=file_size)
        rec = Recovered(metadata=metadata, hard_state=hard_state, snapshot=replay.base,
                        entries=replay.ents, repaired=repair)
        return wal, rec

    # ---- state ----

    @property
    def dir(self) -> Path:
        return self._dir

    @property
    def metadata(self) -> bytes:
        return self._metadata

    @property
    def last_index(self) -> int:
        """Index of the last entry in the log (or of the snapshot, if the log is empty)."""
        return self._last_index

    @property
    def snapshot(self) -> SnapshotMarker | None:
        return self._base

    @property
    def hard_state(self) -> HardState | None:
        return self._hard_state

    @property
    def segments(self) -> list[Path]:
        return [s.path for s in self._segments]

    def _term_at(self, index: int) -> int | None:
        if self._base is not None and index == self._base.index:
            return self._base.term
        base = self._base.index if self._base is not None else 0
        if not self._runs or not base < index <= self._last_index:
            return None
        k = bisect.bisect_right(self._runs, (index, float("inf"))) - 1
        return self._runs[k][1] if k >= 0 else None

    # ---- writing ----

    def save(self, hard_state: HardState | None, entries: Sequence[Entry], *,
             sync: bool = True) -> None:
        """Append entries, then the hard state, with one write and one fdatasync.

        sync=False skips the fdatasync: for a batch that only moves the commit index, which a
        member re-learns from its leader if a crash loses it (etcd does the same).

        An entry index at or below the last one replaces it and everything after it. Raises
        ValueError (nothing written) for a batch that would leave a gap in the log, and
        WALWriteError if the disk refuses it (nothing of the batch is kept).
        """
        pending = self.write(hard_state, entries)
        if pending is None:
            return
        error = 0
        if sync:
            try:
                os.fdatasync(pending.fd)
            except OSError as e:
                error = e.errno or errno.EIO
        self.finish(pending, error, synced=sync)

    def write(self, hard_state: HardState | None, entries: Sequence[Entry]) -> PendingSave | None:
        """`save` in two halves, for a caller that syncs `fd` elsewhere: this one writes the
        batch (not yet durable) and holds the WAL until `finish` is called with the outcome
        of the fdatasync. None when there is nothing to write."""
        if hard_state is None and not entries:
            return None
        self._lock.acquire()
        try:
            self._check_usable()
            base = self._base.index if self._base is not None else 0
            if entries:
                first = entries[0].index
                for a, b in zip(entries, entries[1:], strict=False):
                    if b.index != a.index + 1:
                        raise ValueError(f"entries are not contiguous: {a.index} then {b.index}")
                if first <= base:
                    raise ValueError(f"entry {first} is at or below the snapshot index {base}")
                if first > self._last_index + 1:
                    raise ValueError(f"entry {first} would leave a gap after {self._last_index}"
                                     " (save the snapshot marker first)")
            parts = [_record(RecordType.ENTRY, codec.encode_entry(e)) for e in entries]
            # Entries before the hard state: a torn batch never keeps a commit index without
            # the entries it covers.
            if hard_state is not None:
                parts.append(_record(RecordType.HARD_STATE, codec.encode_hard_state(hard_state)))
            data = b"".join(parts)
            start = self._size
            self._make_room(len(data))
            try:
                _write_all(self._fd, data)
            except OSError as e:
                self._undo(start, e, "save")
            self._size = start + len(data)
            return PendingSave(self._fd, start, len(data), hard_state, list(entries))
        except BaseException:
            self._lock.release()
            raise

    def finish(self, pending: PendingSave, sync_error: int = 0, *, synced: bool = True) -> None:
        """The second half of `save`: ``sync_error`` is the fdatasync's errno (0: it worked).
        On an error the batch is cut off again and WALWriteError raised."""
        try:
            if sync_error:
                self._undo(pending.start, OSError(sync_error, os.strerror(sync_error)), "save")
            self.fsyncs += synced
            self.bytes_written += pending.size
            entries = pending.entries
            if entries:
                first = entries[0].index
                runs = self._runs
                while runs and runs[-1][0] >= first:
                    runs.pop()
                for e in entries:
                    if not runs or runs[-1][1] != e.term:
                        runs.append((e.index, e.term))
                self._last_index = entries[-1].index
            if pending.hard_state is not None:
                self._hard_state = pending.hard_state
            self._maybe_cut()
        finally:
            self._lock.release()

    def save_snapshot(self, index: int, term: int) -> None:
        """Record (synced) that a snapshot at index/term is saved elsewhere.

        If the log holds `index` with the same term, the entries after it stay (a compaction);
        otherwise they are discarded (the snapshot replaces a conflicting or shorter log).
        A marker older than the current one is ignored.
        """
        if index <= 0:
            raise ValueError("snapshot index must be > 0")
        with self._lock:
            self._check_usable()
            m = SnapshotMarker(index, term)
            if self._base is not None:
                if m == self._base:
                    return
                if index == self._base.index:
                    raise ValueError(f"snapshot {tuple(m)} conflicts with the saved marker"
                                     f" {tuple(self._base)}")
                if index < self._base.index:
                    log.warning("event=wal_stale_snapshot_marker index=%d current=%d", index,
                                self._base.index)
                    return
            keep = self._term_at(index) == term
            self._append(_record(RecordType.SNAPSHOT, _marker_payload(m, keep)), "snapshot")
            if keep:
                trimmed = []
                for k, (start, t) in enumerate(self._runs):
                    end = self._runs[k + 1][0] - 1 if k + 1 < len(self._runs) else self._last_index
                    if end > index:
                        trimmed.append((max(start, index + 1), t))
                self._runs = trimmed
            else:
                self._runs = []
                self._last_index = index
            self._base = m
            self._maybe_cut()

    def _check_usable(self) -> None:
        if self._closed:
            raise WALError(f"{self._dir}: the WAL is closed")
        if self._broken is not None:
            raise WALWriteError(f"{self._dir}: the WAL is unusable ({self._broken});"
                                " reopen it")

    def _append(self, data: bytes, what: str, sync: bool = True) -> None:
        """Write and fdatasync, or put the segment back as it was and raise WALWriteError."""
        start = self._size
        self._make_room(len(data))
        try:
            _write_all(self._fd, data)
            if sync:
                os.fdatasync(self._fd)
        except OSError as e:
            self._undo(start, e, what)
        self.fsyncs += sync
        self.bytes_written += len(data)
        self._size = start + len(data)

    def _make_room(self, n: int) -> None:
        """Write zeros ahead of the end when a record would reach past them. Best effort: on
        a full disk the record itself then meets the error, and is undone cleanly."""
        if not self._preallocate or self._size + n <= self._allocated:
            return
        grow = max(self._preallocate, self._size + n - self._allocated)
        try:
            # pwrite: the file offset stays where the log ends.
            written = os.pwrite(self._fd, bytes(grow), self._allocated)
            self._allocated += written
        except OSError as e:
            log.debug("event=wal_preallocate_failed error=%r", e.strerror)
            self._allocated = os.fstat(self._fd).st_size

    def _undo(self, start: int, e: OSError, what: str) -> NoReturn:
        """Cut the open segment back to ``start`` (no half record stays) and raise."""
        self._size = start
        path = self._segments[-1].path
        try:
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
            self._allocated = start
        except OSError as e2:
            self._broken = f"truncating {path} back to {start} bytes failed: {e2.strerror}"
            raise WALWriteError(f"{path}: {what} failed: {e.strerror}; then {self._broken}",
                                e.errno) from e
        log.warning("event=wal_write_failed file=%s op=%s error=%r kept_bytes=%d", path,
                    what, e.strerror, start)
        raise WALWriteError(f"{path}: {what} failed: {e.strerror} (errno {e.errno});"
                            f" truncated back to {start} bytes, nothing of it was saved",
                            e.errno) from e

    def _maybe_cut(self) -> None:
        if self._size < self._segment_bytes:
            return
        try:
            self._cut()
        except OSError as e:
            # The batch itself is durable; keep appending to this segment and retry later.
            log.warning("event=wal_cut_failed dir=%s error=%r", self._dir, e.strerror)

    def _cut(self) -> None:
        seq = self._segments[-1].seq + 1
        first = self._last_index + 1
        path = self._dir / _segment_name(seq, first)
        tmp = path.with_name(path.name + _TMP)
        data = _head(seq, first, self._metadata, self._base, self._hard_state)
        self._trim()  # an older segment never ends in zeros: recovery would call that damage
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            self.fsyncs += 1
            os.rename(tmp, path)
        except OSError:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        try:
            os.fsync(self._dir_fd)
            self.fsyncs += 1
        except OSError:
            # Its name may not survive a crash: do not put acknowledged records in it.
            os.close(fd)
            _unlink_quiet(path)
            raise
        old = self._fd
        self._fd = fd
        self._size = self._allocated = len(data)
        self._segments.append(_Segment(seq, first, path))
        self.bytes_written += len(data)
        os.close(old)
        log.debug("event=wal_cut file=%s", path)

    def release_to(self, index: int) -> int:
        """Delete the oldest segments whose entries are all <= index; return how many.

        Only entries covered by the latest snapshot marker are ever released (index is
        clamped to it), the current segment is never deleted, and at least `max_wals`
        segments are kept. A segment's entries are all below the next segment's first index.
        """
        with self._lock:
            if self._closed:
                raise WALError(f"{self._dir}: the WAL is closed")
            limit = min(index, self._base.index if self._base is not None else 0)
            segs = self._segments
            n = 0
            while (len(segs) - n > self._max_wals and n + 1 < len(segs)
                   and segs[n + 1].first_index - 1 <= limit):
                n += 1
            removed = 0
            try:
                for seg in segs[:n]:  # oldest first, so what is left is always contiguous
                    os.unlink(seg.path)
                    removed += 1
            except OSError as e:
                log.warning("event=wal_release_failed file=%s error=%r", segs[removed].path,
                            e.strerror)
            del segs[:removed]
            if removed:
                try:
                    os.fsync(self._dir_fd)
                    self.fsyncs += 1
                except OSError as e:
                    log.warning("event=wal_release_dir_sync_failed dir=%s error=%r", self._dir,
                                e.strerror)
                log.debug("event=wal_released segments=%d index=%d", removed, limit)
            return removed

    def close(self) -> None:
        """Close the files and release the directory lock (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._trim()
            except OSError as e:  # the zeros stay; recovery takes them as preallocated
                log.warning("event=wal_trim_failed dir=%s error=%r", self._dir, e.strerror)
            os.close(self._fd)
            os.close(self._dir_fd)

    def _trim(self) -> None:
        """Drop the zeros written ahead of the end of the open segment, durably."""
        if self._allocated > self._size:
            os.ftruncate(self._fd, self._size)
            os.fdatasync(self._fd)
            self._allocated = self._size

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_limits(segment_bytes: int, max_wals: int) -> None:
    if segment_bytes <= 0 or max_wals < 1:
        raise ValueError("segment_bytes must be > 0 and max_wals >= 1")


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
