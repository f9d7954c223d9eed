"""Snapshot files: `<data-dir>/member/snap/%016x-%016x.snap` (term, index), as etcd names them.

File format::

    magic b"GROZDSNP" | format u16 LE | body length u64 LE | body | crc32c(body) u32 LE
    body = lz4 frame of msgpack [index, term, voters, learners, data]

A file is written to a temporary name, fsynced, renamed into place and the directory fsynced,
so a crash leaves either the old set of files or the new one. The newest `keep` files are kept.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from pathlib import Path

import crc32c
import lz4.frame
import msgpack

from grozd.raft.core import ConfState, Snapshot

log = logging.getLogger("grozd.raft.snapshot")

MAGIC = b"GROZDSNP"
FORMAT = 1
_HEAD = struct.Struct("<8sHQ")  # magic, format, body length
_CRC = struct.Struct("<I")
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_TMP = ".tmp"


class SnapshotError(Exception):
    """Base class of the snapshot store's errors."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot file for the index asked for."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file that cannot be read back; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: broken snapshot file: {reason}")
        self.path = Path(path)
        self.reason = reason


class SnapshotFormatError(SnapshotCorruptError):
    """A snapshot file of a format version this version cannot read."""


def _name(term: int, index: int) -> str:
    return f"{term:016x}-{index:016x}.snap"


def _parse_name(path: Path) -> tuple[int, int] | None:
    """(term, index) from a snapshot file name, or None for other files."""
    m = _NAME.match(path.name)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entries survive a crash."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def encode(snapshot: Snapshot) -> bytes:
    """The bytes of a snapshot file."""
    cs = snapshot.conf_state
    voters = list(cs.voters) if cs is not None else []
    learners = list(cs.learners) if cs is not None else []
    raw = msgpack.packb([snapshot.index, snapshot.term, voters, learners, snapshot.data],
                        use_bin_type=True)
    body = lz4.frame.compress(raw)
    return _HEAD.pack(MAGIC, FORMAT, len(body)) + body + _CRC.pack(crc32c.crc32c(body))


def decode(data: bytes, path: Path | str = "<bytes>") -> Snapshot:
    """Parse a snapshot file's bytes; raises SnapshotCorruptError naming `path`."""
    if len(data) < _HEAD.size:
        raise SnapshotCorruptError(path, f"truncated: {len(data)} bytes, shorter than the header")
    magic, fmt, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotCorruptError(path, f"bad magic {magic!r}")
    if fmt != FORMAT:
        raise SnapshotFormatError(path, f"format {fmt}, this version reads format {FORMAT}")
    want = _HEAD.size + length + _CRC.size
    if len(data) < want:
        raise SnapshotCorruptError(path, f"truncated: {len(data)} of {want} bytes")
    if len(data) > want:
        raise SnapshotCorruptError(path, f"{len(data) - want} unexpected bytes after the end")
    body = data[_HEAD.size:_HEAD.size + length]
    (crc,) = _CRC.unpack_from(data, _HEAD.size + length)
    if crc32c.crc32c(body) != crc:
        raise SnapshotCorruptError(path, "crc mismatch")
    try:
        raw = lz4.frame.decompress(body)
        fields = msgpack.unpackb(raw, use_list=True, raw=False)
    except Exception as e:  # lz4 and msgpack raise several types for garbage
        raise SnapshotCorruptError(path, f"undecodable body: {e}") from None
    if (not isinstance(fields, list) or len(fields) != 5
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in fields[:2])
            or not all(isinstance(v, list) and all(isinstance(x, int) for x in v)
                       for v in fields[2:4])
            or not isinstance(fields[4], bytes)):
        raise SnapshotCorruptError(path, f"malformed body {fields!r:.80}")
    index, term, voters, learners, payload = fields
    return Snapshot(index, term, ConfState(voters, learners), payload)


class SnapshotStore:
    """Snapshot files in one directory (created on the first save)."""

    def __init__(self, dir: Path | str, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.dir = Path(dir)
        self.keep = keep

    def list(self) -> list[Path]:
        """Snapshot files, newest (highest index) first."""
        if not self.dir.is_dir():
            return []
        named = []
        for p in self.dir.iterdir():
            tn = _parse_name(p)
            if tn is not None:
                named.append((tn[1], tn[0], p))
        named.sort(reverse=True)
        return [p for _, _, p in named]

    def save(self, snapshot: Snapshot) -> Path:
        """Write a snapshot durably, then delete all but the newest `keep` files."""
        _makedirs(self.dir)
        for p in self.dir.glob("*.snap" + _TMP):  # left by a crashed save
            p.unlink(missing_ok=True)
        path = self.dir / _name(snapshot.term, snapshot.index)
        tmp = path.with_name(path.name + _TMP)
        data = encode(snapshot)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        for old in self.list()[self.keep:]:
            if old != path:
                old.unlink(missing_ok=True)
        _fsync_dir(self.dir)
        log.debug("event=snapshot_file_saved file=%s bytes=%d", path, len(data))
        return path

    def read(self, path: Path | str) -> Snapshot:
        """Read one file; raises SnapshotCorruptError naming it if it is broken."""
        p = Path(path)
        snap = decode(p.read_bytes(), p)
        tn = _parse_name(p)
        if tn is not None and tn != (snap.term, snap.index):
            raise SnapshotCorruptError(p, f"holds term {snap.term} index {snap.index}, the file"
                                       " name says otherwise")
        return snap

    def load(self, index: int) -> Snapshot:
        """The snapshot at `index` (the highest term if several)."""
        for p in self.list():
            tn = _parse_name(p)
            if tn is not None and tn[1] == index:
                return self.read(p)
        raise SnapshotNotFoundError(f"{self.dir}: no snapshot file for index {index}")

    def load_newest(self) -> Snapshot | None:
        """The newest readable snapshot, falling back past broken files; None if there are none.

        Raises SnapshotCorruptError only if every file is broken.
        """
        paths = self.list()
        errors = []
        for p in paths:
            try:
                return self.read(p)
            except (SnapshotCorruptError, OSError) as e:
                log.warning("event=snapshot_file_skipped file=%s error=%r", p, str(e))
                errors.append(str(e))
        if not paths:
            return None
        raise SnapshotCorruptError(self.dir, "every snapshot file is broken: "
                                   + "; ".join(errors))
