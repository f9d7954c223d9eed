"""The write-ahead log: round trips, group commit, segments, rewrites, snapshot markers,
torn tails at every offset, byte flips everywhere, refused formats and disk failures."""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import crc32c
import msgpack
import pytest

from grozd.raft import codec
from grozd.raft.core import Entry, HardState
from grozd.raft.wal import (
    WAL,
    RecordType,
    Recovered,
    SnapshotMarker,
    WALCorruptError,
    WALError,
    WALExistsError,
    WALFormatError,
    WALLockedError,
    WALWriteError,
)

HDR = struct.Struct("<IIB")
META = b"cluster=1 member=2"


def ents(term: int, lo: int, hi: int, size: int = 8) -> list[Entry]:
    return [Entry(term, i, bytes([i % 251]) * size, 0) for i in range(lo, hi + 1)]


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, type) of each record of an intact segment."""
    out, off = [], 0
    while off < len(data):
        length, _, rtype = HDR.unpack_from(data, off)
        out.append((off, off + HDR.size + length, rtype))
        off += HDR.size + length
    return out


def record(rtype: int, payload: bytes) -> bytes:
    body = bytes((rtype,)) + payload
    return struct.pack("<II", len(payload), crc32c.crc32c(body)) + body


def reopen(d: Path, **kw: int) -> Recovered:
    """Open, recover, close."""
    wal, rec = WAL.open(d, **kw)
    wal.close()
    return rec


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    return tmp_path / "member" / "wal"


# ---- round trips and creation --------------------------------------------------------------


def test_round_trip(wal_dir: Path) -> None:
    assert not WAL.exists(wal_dir)
    with WAL.create(wal_dir, META) as wal:
        assert wal.metadata == META
        wal.save(HardState(1, 1, 0), ents(1, 1, 3))
        wal.save(HardState(1, 1, 3), [])
        wal.save(None, ents(1, 4, 5))
    assert WAL.exists(wal_dir)
    assert [p.name for p in wal_dir.iterdir()] == ["0000000000000000-0000000000000000.wal"]
    assert not wal_dir.with_name("wal.tmp").exists()
    rec = reopen(wal_dir)
    assert rec.metadata == META
    assert rec.hard_state == HardState(1, 1, 3)
    assert rec.entries == ents(1, 1, 5)
    assert rec.snapshot is None and rec.repaired is None


def test_fresh_wal_recovers_empty(wal_dir: Path) -> None:
    WAL.create(wal_dir, b"").close()
    rec = reopen(wal_dir)
    assert (rec.metadata, rec.hard_state, rec.snapshot, rec.entries) == (b"", None, None, [])


def test_create_refuses_existing_and_open_refuses_missing(wal_dir: Path) -> None:
    with pytest.raises(WALError, match="no WAL segments"):
        WAL.open(wal_dir)
    WAL.create(wal_dir, META).close()
    with pytest.raises(WALExistsError):
        WAL.create(wal_dir, META)


def test_create_replaces_leftovers_of_a_crashed_create(wal_dir: Path) -> None:
    wal_dir.mkdir(parents=True)  # empty: no WAL yet
    junk = wal_dir.with_name("wal.tmp")
    junk.mkdir()
    (junk / "0000000000000000-0000000000000000.wal").write_bytes(b"half")
    WAL.create(wal_dir, META).close()
    assert not junk.exists()
    assert reopen(wal_dir).metadata == META


def test_second_open_is_refused_while_locked(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META)
    with pytest.raises(WALLockedError):
        WAL.open(wal_dir)
    wal.close()
    wal.close()  # idempotent
    with pytest.raises(WALError, match="closed"):
        wal.save(None, ents(1, 1, 1))
    reopen(wal_dir)


# ---- group commit and counters ---------------------------------------------------------------


def test_group_commit_is_one_write_and_one_fdatasync_per_save(wal_dir: Path, monkeypatch) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=3000)
    calls = {"fdatasync": 0, "write": 0}
    real_sync, real_write = os.fdatasync, os.write

    def fdatasync(fd: int) -> None:
        calls["fdatasync"] += 1
        real_sync(fd)

    def write(fd: int, data: bytes) -> int:
        calls["write"] += 1
        return real_write(fd, data)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "write", write)
    saves = 0
    nxt = 1
    for size in (1, 5, 50, 1, 20, 3, 40):
        wal.save(HardState(2, 1, nxt - 1), ents(2, nxt, nxt + size - 1))
        nxt += size
        saves += 1
        assert calls["fdatasync"] == saves
    assert len(wal.segments) > 1  # cuts happened, and cost no extra fdatasync
    wal.save(None, [])  # nothing to do: no I/O at all
    assert calls["fdatasync"] == saves
    before = dict(calls)
    wal.save(HardState(2, 1, 7), [])
    assert calls["fdatasync"] == before["fdatasync"] + 1
    assert calls["write"] == before["write"] + 1
    wal.close()
    rec = reopen(wal_dir)
    assert rec.entries == ents(2, 1, nxt - 1)
    assert rec.hard_state == HardState(2, 1, 7)


def test_counters(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META)
    size0 = wal.segments[0].stat().st_size
    wal.save(HardState(1, 0, 0), ents(1, 1, 4))
    wal.save_snapshot(2, 1)
    assert wal.fsyncs == 2
    assert wal.bytes_written == wal.segments[0].stat().st_size - size0
    wal.close()


# ---- segments ---------------------------------------------------------------------------------


def test_segments_are_cut_and_recovered(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=400)
    hs = None
    for i in range(1, 61, 3):
        hs = HardState(3, 2, i - 1)
        wal.save(hs, ents(3, i, i + 2))
    names = [p.name for p in wal.segments]
    wal.close()
    assert len(names) >= 5
    assert names == sorted(p.name for p in wal_dir.iterdir())
    seqs = [int(n[:16], 16) for n in names]
    assert seqs == list(range(len(names)))
    firsts = [int(n[17:33], 16) for n in names]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    for name, first in zip(names[1:], firsts[1:], strict=True):
        data = (wal_dir / name).read_bytes()
        fr = frames(data)
        # Each segment stands alone: header, metadata, the hard state so far, then entries.
        assert [t for _, _, t in fr[:3]] == [RecordType.SEGMENT, RecordType.METADATA,
                                             RecordType.HARD_STATE]
        assert data[fr[1][0] + HDR.size:fr[1][1]] == META
        if len(fr) > 3:
            e = codec.decode_entry(data[fr[3][0] + HDR.size:fr[3][1]])
            assert e.index == first  # named after the first entry it holds
    rec = reopen(wal_dir, segment_bytes=400)
    assert rec.entries == ents(3, 1, 60)
    assert rec.hard_state == hs


def test_appending_after_reopen_continues_the_last_segment(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META, segment_bytes=300) as wal:
        wal.save(HardState(1, 1, 0), ents(1, 1, 10))
        n = len(wal.segments)
    for lo in range(11, 40, 4):
        wal, rec = WAL.open(wal_dir, segment_bytes=300)
        assert rec.entries == ents(1, 1, lo - 1)
        wal.save(None, ents(1, lo, lo + 3))
        wal.close()
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 42)
    assert len(sorted(wal_dir.iterdir())) > n


# ---- rewrites (a follower's log truncated and rewritten) ------------------------------------


def test_rewrite_replaces_the_index_and_everything_after(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META) as wal:
        wal.save(HardState(1, 0, 0), ents(1, 1, 10))
        wal.save(HardState(2, 0, 0), ents(2, 6, 8))
        assert wal.last_index == 8
        wal.save(None, ents(2, 9, 9))
        wal.save(HardState(3, 0, 0), ents(3, 9, 9))  # rewrite of the last entry alone
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 5) + ents(2, 6, 8) + ents(3, 9, 9)
    assert rec.hard_state == HardState(3, 0, 0)


def test_rewrite_reaching_back_into_an_older_segment(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META, segment_bytes=300) as wal:
        wal.save(None, ents(1, 1, 40))
        wal.save(None, ents(1, 41, 80))
        assert len(wal.segments) == 3
        wal.save(None, ents(2, 20, 25))
        wal.save(None, ents(2, 26, 30))
    rec = reopen(wal_dir, segment_bytes=300)
    assert rec.entries == ents(1, 1, 19) + ents(2, 20, 30)


def test_save_refuses_gaps_and_leaves_the_file_alone(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META)
    wal.save(None, ents(1, 1, 3))
    size = wal.segments[-1].stat().st_size
    with pytest.raises(ValueError, match="gap"):
        wal.save(None, ents(1, 5, 6))
    with pytest.raises(ValueError, match="contiguous"):
        wal.save(None, ents(1, 4, 4) + ents(1, 6, 6))
    with pytest.raises(ValueError, match="at or below"):
        wal.save(None, [Entry(1, 0, b"", 0)])
    assert wal.segments[-1].stat().st_size == size
    wal.close()
    assert reopen(wal_dir).entries == ents(1, 1, 3)


# ---- snapshot markers and release ------------------------------------------------------------


def test_compaction_marker_keeps_later_entries(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META) as wal:
        wal.save(HardState(1, 1, 8), ents(1, 1, 10))
        wal.save_snapshot(6, 1)
        wal.save_snapshot(6, 1)  # repeated: no-op
        assert wal.snapshot == SnapshotMarker(6, 1)
    rec = reopen(wal_dir)
    assert rec.snapshot == SnapshotMarker(6, 1) and rec.snapshot[0] == 6
    assert rec.entries == ents(1, 7, 10)


def test_installed_snapshot_discards_a_conflicting_log(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META) as wal:
        wal.save(HardState(1, 1, 2), ents(1, 1, 10))
        wal.save_snapshot(8, 3)  # term 3 at index 8: the local entries 1..10 conflict
        assert wal.last_index == 8
        with pytest.raises(ValueError, match="at or below"):
            wal.save(None, ents(3, 8, 8))
        wal.save(HardState(3, 0, 9), ents(3, 9, 9))
    rec = reopen(wal_dir)
    assert rec.snapshot == (8, 3)
    assert rec.entries == ents(3, 9, 9)  # not the stale 9..10 of term 1


def test_snapshot_beyond_the_log_then_entries(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META) as wal:
        wal.save(HardState(1, 0, 0), ents(1, 1, 3))
        with pytest.raises(ValueError, match="gap"):
            wal.save(None, ents(4, 101, 101))
        wal.save_snapshot(100, 4)
        wal.save(None, ents(4, 101, 102))
        wal.save_snapshot(50, 2)  # older than the current marker: ignored
        with pytest.raises(ValueError, match="conflicts"):
            wal.save_snapshot(100, 5)
    rec = reopen(wal_dir)
    assert (rec.snapshot, rec.entries) == ((100, 4), ents(4, 101, 102))


def test_release_keeps_max_wals_and_what_the_snapshot_does_not_cover(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=300, max_wals=2)
    for lo in range(1, 200, 10):
        wal.save(HardState(1, 1, lo - 1), ents(1, lo, lo + 9))
    n = len(wal.segments)
    assert n > 6
    assert wal.release_to(150) == 0  # no snapshot marker yet: nothing is covered
    wal.save_snapshot(120, 1)
    firsts = [int(p.name[17:33], 16) for p in wal.segments]
    removed = wal.release_to(1000)  # clamped to the marker at 120
    assert removed == sum(1 for f in firsts[1:] if f - 1 <= 120)
    assert removed > 0
    rest = [int(p.name[17:33], 16) for p in wal.segments]
    assert rest[0] <= 121  # the segment that may hold 121 stays
    wal.save_snapshot(200, 1)
    wal.release_to(200)
    assert len(wal.segments) == 2  # max_wals
    assert wal.segments == sorted(wal_dir.iterdir())
    wal.save(HardState(1, 1, 200), ents(1, 201, 203))
    wal.close()
    rec = reopen(wal_dir)
    assert rec.metadata == META
    assert rec.snapshot == (200, 1)
    assert rec.entries == ents(1, 201, 203)
    assert rec.hard_state == HardState(1, 1, 200)


def test_release_after_reopen_and_recovery_from_a_middle_segment(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=250, max_wals=1)
    for lo in range(1, 31, 5):
        wal.save(HardState(1, 1, 0), ents(1, lo, lo + 4))
    wal.save_snapshot(10, 1)
    for lo in range(31, 61, 5):
        wal.save(HardState(1, 1, 30), ents(1, lo, lo + 4))
    wal.close()
    wal, rec = WAL.open(wal_dir, segment_bytes=250, max_wals=1)
    assert wal.release_to(100) >= 1  # clamped to 10
    assert int(wal.segments[0].name[17:33], 16) <= 11
    wal.close()
    rec = reopen(wal_dir)
    assert rec.snapshot == (10, 1)
    assert rec.entries == ents(1, 11, 60)
    assert rec.hard_state == HardState(1, 1, 30)


# ---- torn tails -----------------------------------------------------------------------------


def _two_segment_wal(wal_dir: Path) -> tuple[list[Entry], HardState]:
    """A WAL whose last save is one batch [e41, e42, hard state] in the second segment."""
    with WAL.create(wal_dir, META, segment_bytes=800) as wal:
        wal.save(HardState(1, 1, 0), ents(1, 1, 30))
        wal.save(HardState(1, 1, 20), ents(1, 31, 40))
        assert len(wal.segments) == 2
        wal.save(HardState(2, 3, 38), ents(2, 41, 42))
    return ents(1, 1, 40), HardState(1, 1, 20)


def test_torn_tail_at_every_offset_of_the_last_batch(wal_dir: Path, caplog) -> None:
    before, hs_before = _two_segment_wal(wal_dir)
    last = sorted(wal_dir.iterdir())[-1]
    data = last.read_bytes()
    fr = frames(data)
    batch = fr[-3:]
    assert [t for _, _, t in batch] == [RecordType.ENTRY, RecordType.ENTRY,
                                       RecordType.HARD_STATE]
    ends = {end for _, end, _ in fr}
    caplog.set_level(logging.WARNING, logger="grozd.raft.wal")
    for cut in range(batch[0][0], len(data) + 1):
        last.write_bytes(data[:cut])
        rec = reopen(wal_dir)
        complete = sum(1 for _, end, _ in batch if end <= cut)
        assert rec.entries == before + ents(2, 41, 42)[:min(complete, 2)], cut
        assert rec.hard_state == (HardState(2, 3, 38) if complete == 3 else hs_before)
        if cut in ends:
            assert rec.repaired is None
        else:
            r = rec.repaired
            assert r is not None and r.file == last
            start = max(s for s, _, _ in batch if s <= cut)
            assert (r.offset, r.dropped) == (start, cut - start), cut
            assert last.stat().st_size == start  # truncated on disk
            assert f"offset={start}" in caplog.text
            assert reopen(wal_dir).repaired is None  # repaired once and for all


def test_zero_filled_tail_is_repaired(wal_dir: Path) -> None:
    before, _ = _two_segment_wal(wal_dir)
    last = sorted(wal_dir.iterdir())[-1]
    data = last.read_bytes()
    start = frames(data)[-2][0]  # an entry record: longer than 15 bytes
    # Zeros (a preallocated or size-extended file), or a torn record then zeros.
    for tail, reason in ((b"\0" * 4096, "zero-filled tail"),
                         (data[start:start + 12] + b"\0" * 3, "incomplete record"),
                         (data[start:start + 12] + b"\0" * 100, "crc mismatch")):
        last.write_bytes(data + tail)
        rec = reopen(wal_dir)
        assert rec.entries == before + ents(2, 41, 42)
        assert rec.hard_state == HardState(2, 3, 38)
        assert (rec.repaired.offset, rec.repaired.dropped) == (len(data), len(tail))
        assert rec.repaired.reason.startswith(reason)
        assert last.read_bytes() == data


def test_valid_record_after_damage_is_corruption_not_a_torn_tail(wal_dir: Path) -> None:
    _two_segment_wal(wal_dir)
    last = sorted(wal_dir.iterdir())[-1]
    data = bytearray(last.read_bytes())
    start, end, _ = frames(bytes(data))[-2]  # the second-to-last record
    data[end - 1] ^= 0x40
    last.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match=f"offset {start}.*followed by a valid record"):
        WAL.open(wal_dir)
    assert last.read_bytes() == bytes(data)  # a failed recovery changes nothing


# ---- byte flips everywhere --------------------------------------------------------------------


def test_every_byte_flip_is_detected_or_repaired_never_misread(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META, segment_bytes=700) as wal:
        wal.save(HardState(1, 1, 0), ents(1, 1, 40, size=4))
        wal.save_snapshot(5, 1)
        wal.save(HardState(2, 1, 9), ents(2, 10, 64, size=4))
        wal.save(None, ents(2, 65, 65, size=4))
        assert len(wal.segments) == 3
    good = reopen(wal_dir)
    assert good.entries == ents(1, 6, 9, size=4) + ents(2, 10, 65, size=4)
    segs = sorted(wal_dir.iterdir())
    originals = {p: p.read_bytes() for p in segs}
    rng = random.Random(20240607)
    outcomes = {"corrupt": 0, "repaired": 0}
    for p in segs:
        data = originals[p]
        fr = frames(data)
        for pos in range(len(data)):
            flipped = bytearray(data)
            flipped[pos] ^= rng.randrange(1, 256)
            p.write_bytes(bytes(flipped))
            start = max(s for s, _, _ in fr if s <= pos)
            in_tail = p == segs[-1] and start == fr[-1][0]
            try:
                rec = reopen(wal_dir)
            except WALCorruptError as e:
                assert p.name in str(e) and f"offset {start}:" in str(e), (pos, str(e))
                assert p.read_bytes() == bytes(flipped)
                outcomes["corrupt"] += 1
            else:
                assert in_tail, (p.name, pos)  # only the very last record may be dropped
                assert rec.repaired is not None and rec.repaired.offset == start
                assert rec.entries == good.entries[:-1]
                assert (rec.hard_state, rec.snapshot) == (good.hard_state, good.snapshot)
                outcomes["repaired"] += 1
            p.write_bytes(data)
    assert outcomes["repaired"] > 0 and outcomes["corrupt"] > 1000


def test_absurd_record_length_is_corruption(wal_dir: Path) -> None:
    _two_segment_wal(wal_dir)
    last = sorted(wal_dir.iterdir())[-1]
    data = bytearray(last.read_bytes())
    start = frames(bytes(data))[-1][0]  # even in the last record
    struct.pack_into("<I", data, start, 0xFFFFFFF0)
    last.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match=f"{last.name}: corrupt WAL record at offset"
                       f" {start}: record length 4294967280 is absurd"):
        WAL.open(wal_dir)


def test_damage_in_an_older_segment_is_never_repaired(wal_dir: Path) -> None:
    _two_segment_wal(wal_dir)
    first = sorted(wal_dir.iterdir())[0]
    data = first.read_bytes()
    first.write_bytes(data[:-3])  # looks like a torn tail, but it is not the last segment
    with pytest.raises(WALCorruptError, match="not the last segment") as ei:
        WAL.open(wal_dir)
    assert ei.value.path == first and ei.value.offset == frames(data)[-1][0]


def test_missing_middle_segment(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META, segment_bytes=200) as wal:
        for lo in range(1, 60, 5):
            wal.save(None, ents(1, lo, lo + 4))
        assert len(wal.segments) >= 3
    sorted(wal_dir.iterdir())[1].unlink()
    with pytest.raises(WALCorruptError, match="a segment is missing"):
        WAL.open(wal_dir)


def test_renamed_segment_is_refused(wal_dir: Path) -> None:
    WAL.create(wal_dir, META).close()
    seg = next(wal_dir.iterdir())
    seg.rename(wal_dir / "0000000000000000-0000000000000005.wal")
    with pytest.raises(WALCorruptError, match="file name says otherwise"):
        WAL.open(wal_dir)


# ---- formats this version cannot read ---------------------------------------------------------


def test_unknown_record_type_is_refused(wal_dir: Path) -> None:
    WAL.create(wal_dir, META).close()
    seg = next(wal_dir.iterdir())
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(record(99, b"from the future"))
    with pytest.raises(WALFormatError, match=f"offset {size}: unknown record type 99"):
        WAL.open(wal_dir)


def test_unknown_payload_format_is_refused(wal_dir: Path) -> None:
    WAL.create(wal_dir, META).close()
    seg = next(wal_dir.iterdir())
    future = bytes((codec.FORMAT + 1,)) + msgpack.packb([1, 1, 0, b"x"])
    with open(seg, "ab") as f:
        f.write(record(RecordType.ENTRY, future))
    with pytest.raises(WALFormatError, match=f"entry has format {codec.FORMAT + 1}"):
        WAL.open(wal_dir)
    seg.write_bytes(seg.read_bytes()[:-len(record(RecordType.ENTRY, future))]
                    + record(RecordType.SNAPSHOT, b"\x07" + msgpack.packb([1, 1, True])))
    with pytest.raises(WALFormatError, match="snapshot marker has format 7"):
        WAL.open(wal_dir)


def test_stale_temp_segment_from_a_crashed_cut_is_removed(wal_dir: Path) -> None:
    with WAL.create(wal_dir, META) as wal:
        wal.save(None, ents(1, 1, 2))
    stale = wal_dir / "0000000000000001-0000000000000003.wal.tmp"
    stale.write_bytes(b"partial")
    assert reopen(wal_dir).entries == ents(1, 1, 2)
    assert not stale.exists()


# ---- disk failures ----------------------------------------------------------------------------


def test_failed_fdatasync_rolls_back_and_the_wal_stays_usable(wal_dir: Path,
                                                               monkeypatch) -> None:
    wal = WAL.create(wal_dir, META)
    wal.save(HardState(1, 1, 0), ents(1, 1, 3))
    seg = wal.segments[-1]
    size = seg.stat().st_size
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(WALWriteError, match="Input/output error") as ei:
        wal.save(HardState(1, 1, 3), ents(1, 4, 9))
    assert ei.value.errno == errno.EIO
    assert seg.stat().st_size == size
    monkeypatch.setattr(os, "fdatasync", real)
    wal.save(HardState(1, 1, 5), ents(1, 4, 6))
    wal.close()
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 6) and rec.hard_state == HardState(1, 1, 5)


def test_short_write_then_enospc_leaves_no_half_record(wal_dir: Path, monkeypatch) -> None:
    wal = WAL.create(wal_dir, META)
    wal.save(None, ents(1, 1, 3))
    seg = wal.segments[-1]
    size = seg.stat().st_size
    real = os.write
    calls = []

    def filling(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[:len(data) // 2])  # the disk takes half ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then is full

    monkeypatch.setattr(os, "write", filling)
    with pytest.raises(WALWriteError, match="No space left on device"):
        wal.save(HardState(1, 0, 0), ents(1, 4, 20))
    monkeypatch.setattr(os, "write", real)
    assert len(calls) == 2 and seg.stat().st_size == size
    wal.save(None, ents(1, 4, 5))
    wal.close()
    assert reopen(wal_dir).entries == ents(1, 1, 5)


def test_failed_cut_keeps_writing_the_current_segment(wal_dir: Path, monkeypatch,
                                                      caplog) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=200)
    real = os.fsync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with caplog.at_level(logging.WARNING, logger="grozd.raft.wal"):
        wal.save(HardState(1, 0, 0), ents(1, 1, 20))  # acknowledged: the batch is durable
    assert "event=wal_cut_failed" in caplog.text
    assert len(wal.segments) == 1 and not list(wal_dir.glob("*.tmp"))
    monkeypatch.setattr(os, "fsync", real)
    wal.save(None, ents(1, 21, 22))
    assert len(wal.segments) == 2
    wal.close()
    assert reopen(wal_dir).entries == ents(1, 1, 22)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, to run out of space for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\xaa" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk(tiny_fs: Path) -> None:
    d = tiny_fs / "member" / "wal"
    wal = WAL.create(d, META, segment_bytes=1 << 20)
    try:
        acked = ents(1, 1, 10, size=100)
        wal.save(HardState(1, 1, 5), acked)
        seg = wal.segments[-1]
        size = seg.stat().st_size
        filler = tiny_fs / "filler"
        _fill(filler)
        batch = ents(1, 11, 60, size=200)  # > 10 KiB: cannot fit in the segment's last page
        for _ in range(2):
            with pytest.raises(WALWriteError, match="No space left on device") as ei:
                wal.save(HardState(1, 1, 10), batch)
            assert ei.value.errno == errno.ENOSPC
            assert seg.stat().st_size == size
        filler.unlink()
        wal.save(HardState(1, 1, 10), batch)
        acked += batch
    finally:
        wal.close()
    rec = reopen(d)
    assert rec.entries == acked
    assert rec.hard_state == HardState(1, 1, 10)
    assert rec.repaired is None


def test_write_then_finish_is_a_save_with_the_sync_done_elsewhere(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META)
    pending = wal.write(HardState(1, 1, 0), ents(1, 1, 3))
    assert pending is not None and pending.size > 0
    os.fdatasync(pending.fd)
    wal.finish(pending, 0)
    assert wal.last_index == 3 and wal.fsyncs >= 1
    assert wal.write(None, []) is None
    wal.close()
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 3) and rec.hard_state == HardState(1, 1, 0)


def test_a_failed_sync_reported_to_finish_rolls_the_batch_back(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META)
    wal.save(HardState(1, 1, 0), ents(1, 1, 3))
    size = wal.segments[-1].stat().st_size
    pending = wal.write(HardState(1, 1, 3), ents(1, 4, 9))
    with pytest.raises(WALWriteError, match="Input/output error"):
        wal.finish(pending, errno.EIO)
    assert wal.segments[-1].stat().st_size == size and wal.last_index == 3
    wal.save(HardState(1, 1, 4), ents(1, 4, 5))  # usable, and not locked by the failure
    wal.close()
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 5) and rec.hard_state == HardState(1, 1, 4)


# ---- zeros written ahead of the end --------------------------------------------------------

PRE = 4096


def log_end(data: bytes) -> int:
    """Where the records of a segment end (zeros after them are preallocated space)."""
    off = 0
    while off + HDR.size <= len(data):
        length, _, rtype = HDR.unpack_from(data, off)
        if rtype == 0:
            break
        off += HDR.size + length
    return off


def copy_open(src: Path, dst: Path, **kw: int) -> tuple[WAL, Recovered]:
    """Open a copy of a WAL's files as they are now: what a crash would leave."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return WAL.open(dst, **kw)


def test_preallocated_space_is_kept_reused_and_trimmed_at_close(wal_dir: Path,
                                                               tmp_path: Path) -> None:
    wal = WAL.create(wal_dir, META, preallocate=PRE)
    wal.save(HardState(1, 1, 0), ents(1, 1, 3))
    seg = wal.segments[-1]
    data = seg.read_bytes()
    assert len(data) >= PRE and data.endswith(b"\0" * 64)  # zeros ahead of the end
    # A crash now: the zeros are space, not damage, and appending goes on where the log ends.
    crashed, rec = copy_open(wal_dir, tmp_path / "crashed", preallocate=PRE)
    assert rec.entries == ents(1, 1, 3) and rec.repaired is None
    assert crashed.segments[-1].stat().st_size == len(data)
    crashed.save(HardState(1, 1, 3), ents(1, 4, 5))
    crashed.close()
    assert reopen(tmp_path / "crashed").entries == ents(1, 1, 5)
    # Opened without preallocation, the same zeros are a repaired tail, as before.
    _, plain = copy_open(wal_dir, tmp_path / "plain")
    assert plain.repaired is not None and plain.repaired.reason == "zero-filled tail"
    wal.save(HardState(1, 1, 5), ents(1, 4, 9))
    wal.close()
    data = seg.read_bytes()
    assert log_end(data) == len(data)  # trimmed: a closed WAL ends with its log
    rec = reopen(wal_dir)
    assert rec.entries == ents(1, 1, 9) and rec.repaired is None


def test_a_torn_record_in_preallocated_space_is_repaired(wal_dir: Path, tmp_path: Path) -> None:
    wal = WAL.create(wal_dir, META, preallocate=PRE)
    wal.save(HardState(1, 1, 0), ents(1, 1, 3))
    seg = wal.segments[-1]
    torn = bytearray(seg.read_bytes())
    logical = log_end(bytes(torn))
    half = record(RecordType.ENTRY, b"x" * 40)[:20]
    torn[logical:logical + len(half)] = half  # half a record, then zeros
    copy = tmp_path / "torn"
    copy.mkdir()
    for p in wal_dir.iterdir():
        (copy / p.name).write_bytes(bytes(torn) if p.name == seg.name else p.read_bytes())
    wal.close()
    rec = reopen(copy, preallocate=PRE)
    assert rec.entries == ents(1, 1, 3) and rec.repaired is not None
    assert rec.repaired.offset == logical and rec.hard_state == HardState(1, 1, 0)


def test_cut_segments_end_with_their_log(wal_dir: Path) -> None:
    wal = WAL.create(wal_dir, META, segment_bytes=2048, preallocate=PRE)
    for i in range(1, 60, 3):
        wal.save(HardState(1, 1, i), ents(1, i, i + 2, size=64))
    assert len(wal.segments) >= 3
    for seg in wal.segments[:-1]:
        data = seg.read_bytes()
        assert log_end(data) == len(data)  # never ends in zeros
    wal.close()
    assert reopen(wal_dir, segment_bytes=2048).entries == ents(1, 1, 60, size=64)


def test_preallocation_is_best_effort_on_a_full_disk(wal_dir: Path, monkeypatch) -> None:
    wal = WAL.create(wal_dir, META, preallocate=PRE)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    wal.save(HardState(1, 1, 0), ents(1, 1, 3))  # appended plainly
    wal.close()
    assert reopen(wal_dir).entries == ents(1, 1, 3)
