"""Snapshot files: round trips, retention, fallback past broken files, errors naming the file."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import lz4.frame
import msgpack
import pytest

from grozd.raft.core import ConfState, Snapshot
from grozd.raft.snapshot import (
    FORMAT,
    MAGIC,
    SnapshotCorruptError,
    SnapshotFormatError,
    SnapshotNotFoundError,
    SnapshotStore,
)


def snap(index: int, term: int = 1, data: bytes | None = None) -> Snapshot:
    payload = data if data is not None else b"state at %d " % index * 50
    return Snapshot(index, term, ConfState([1, 2, 3], [4]), payload)


def fields(s: Snapshot) -> tuple:
    return (s.index, s.term, s.conf_state.voters, s.conf_state.learners, s.data)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "member" / "snap", keep=3)


def test_round_trip_and_file_layout(store: SnapshotStore) -> None:
    assert store.list() == [] and store.load_newest() is None
    s = snap(42, 7)
    path = store.save(s)
    assert path.name == "0000000000000007-000000000000002a.snap"
    assert fields(store.load_newest()) == fields(s)
    assert fields(store.load(42)) == fields(s)
    raw = path.read_bytes()
    magic, fmt, length = struct.unpack_from("<8sHQ", raw)
    assert (magic, fmt) == (MAGIC, FORMAT)
    body = raw[18:18 + length]
    assert len(raw) == 18 + length + 4
    assert msgpack.unpackb(lz4.frame.decompress(body)) == [42, 7, [1, 2, 3], [4], s.data]
    assert len(body) < len(s.data)  # compressed
    assert not list(store.dir.glob("*.tmp"))


def test_empty_conf_state_and_data(store: SnapshotStore) -> None:
    s = Snapshot(1, 1, ConfState([], []), b"")
    store.save(s)
    assert fields(store.load(1)) == fields(s)


def test_retention_keeps_the_newest(store: SnapshotStore) -> None:
    for i in range(1, 8):
        store.save(snap(i * 10, term=1 + i // 3))
    assert [p.name[17:] for p in store.list()] == [
        f"{i * 10:016x}.snap" for i in (7, 6, 5)]
    assert store.load_newest().index == 70
    with pytest.raises(SnapshotNotFoundError, match="index 10"):
        store.load(10)


def test_leftover_temp_file_is_cleaned(store: SnapshotStore) -> None:
    store.save(snap(1))
    (store.dir / "0000000000000001-0000000000000002.snap.tmp").write_bytes(b"half")
    store.save(snap(2))
    assert not list(store.dir.glob("*.tmp"))
    assert store.load_newest().index == 2


def _break(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0:8] = b"NOTASNAP"
    elif how == "crc":
        raw[30] ^= 0x01
    elif how == "truncated":
        raw = raw[:-5]
    elif how == "format":
        struct.pack_into("<H", raw, 8, FORMAT + 1)
    elif how == "trailing":
        raw += b"x"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, reason", [
    ("magic", "bad magic"),
    ("crc", "crc mismatch"),
    ("truncated", "truncated"),
    ("format", f"format {FORMAT + 1}"),
    ("trailing", "unexpected bytes"),
])
def test_broken_newest_falls_back_and_is_named(store: SnapshotStore, caplog, how: str,
                                               reason: str) -> None:
    store.save(snap(10))
    newest = store.save(snap(20))
    _break(newest, how)
    with caplog.at_level(logging.WARNING, logger="grozd.raft.snapshot"):
        got = store.load_newest()
    assert fields(got) == fields(snap(10))
    assert newest.name in caplog.text and reason in caplog.text
    with pytest.raises(SnapshotCorruptError, match=reason) as ei:
        store.load(20)
    assert ei.value.path == newest and newest.name in str(ei.value)
    if how == "format":
        assert isinstance(ei.value, SnapshotFormatError)


def test_all_broken_raises_naming_every_file(store: SnapshotStore) -> None:
    paths = [store.save(snap(i)) for i in (1, 2)]
    for p in paths:
        _break(p, "crc")
    with pytest.raises(SnapshotCorruptError, match="every snapshot file is broken") as ei:
        store.load_newest()
    assert all(p.name in str(ei.value) for p in paths)


def test_file_renamed_to_another_index_is_refused(store: SnapshotStore) -> None:
    p = store.save(snap(5))
    p.rename(store.dir / "0000000000000001-0000000000000009.snap")
    with pytest.raises(SnapshotCorruptError, match="file name says otherwise"):
        store.load(9)


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, keep=0)
