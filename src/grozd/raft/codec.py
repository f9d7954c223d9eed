"""The versioned binary wire format of the Raft core's values (msgpack inside; never pickle).

Every encoded value starts with one format byte, so a peer or a WAL of another version is
refused with a clear error instead of being misread.
"""

from __future__ import annotations

import msgpack

from grozd.raft.core import ConfState, Entry, HardState, Message, MessageType, Snapshot

FORMAT = 1
_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class CodecError(ValueError):
    """Bytes that are not a valid encoding of the expected value."""


def _entry(e: Entry) -> list:
    return [e.term, e.index, e.type, e.data]


def _snapshot(s: Snapshot) -> list:
    return [s.index, s.term, list(s.conf_state.voters), list(s.conf_state.learners), s.data]


def encode_message(m: Message) -> bytes:
    """Encode a message for a peer."""
    snap = _snapshot(m.snapshot) if m.snapshot is not None else None
    body = [m.type, m.to, m.frm, m.term, m.log_term, m.index, [_entry(e) for e in m.entries],
            m.commit, m.reject, m.reject_hint, snap, m.context]
    return bytes((FORMAT,)) + msgpack.packb(body, use_bin_type=True)


def encode_entry(e: Entry) -> bytes:
    return bytes((FORMAT,)) + msgpack.packb(_entry(e), use_bin_type=True)


def encode_hard_state(hs: HardState) -> bytes:
    return bytes((FORMAT,)) + msgpack.packb([hs.term, hs.vote, hs.commit])


def encode_snapshot(s: Snapshot) -> bytes:
    return bytes((FORMAT,)) + msgpack.packb(_snapshot(s), use_bin_type=True)


def _unpack(data: bytes, what: str) -> list:
    if not data:
        raise CodecError(f"empty {what}")
    if data[0] != FORMAT:
        raise CodecError(f"{what} has format {data[0]}, this version reads format {FORMAT}")
    try:
        body = msgpack.unpackb(data[1:], use_list=True, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise CodecError(f"{what} is not valid msgpack: {e}") from None
    if not isinstance(body, list):
        raise CodecError(f"{what} is not an array")
    return body


def _check(values: list, types: tuple, what: str) -> None:
    if len(values) != len(types):
        raise CodecError(f"{what} has {len(values)} fields, expected {len(types)}")
    for i, (v, t) in enumerate(zip(values, types, strict=True)):
        if not isinstance(v, t) or (t is int and (isinstance(v, bool) or v < 0)):
            raise CodecError(f"{what} field {i} is {type(v).__name__} {v!r:.40}")


_ENTRY = (int, int, int, bytes)
_SNAPSHOT = (int, int, list, list, bytes)
_MESSAGE = (int, int, int, int, int, int, list, int, bool, int, (list, type(None)),
            (bytes, type(None)))


def _decode_entry(body: list) -> Entry:
    _check(body, _ENTRY, "entry")
    return Entry(body[0], body[1], body[3], body[2])


def _decode_snapshot(body: list) -> Snapshot:
    _check(body, _SNAPSHOT, "snapshot")
    return Snapshot(body[0], body[1], ConfState(body[2], body[3]), body[4])


def decode_message(data: bytes) -> Message:
    """Decode a peer's message; raises CodecError on anything malformed."""
    b = _unpack(data, "message")
    _check(b, _MESSAGE, "message")
    if b[0] not in _KNOWN_TYPES:
        raise CodecError(f"message has unknown type {b[0]}")
    entries = []
    for raw in b[6]:
        if not isinstance(raw, list):
            raise CodecError("message entry is not an array")
        entries.append(_decode_entry(raw))
    snap = _decode_snapshot(b[10]) if b[10] is not None else None
    return Message(b[0], b[1], b[2], b[3], b[4], b[5], entries, b[7], b[8], b[9], snap, b[11])


def decode_entry(data: bytes) -> Entry:
    return _decode_entry(_unpack(data, "entry"))


def decode_hard_state(data: bytes) -> HardState:
    b = _unpack(data, "hard state")
    _check(b, (int, int, int), "hard state")
    return HardState(*b)


def decode_snapshot(data: bytes) -> Snapshot:
    return _decode_snapshot(_unpack(data, "snapshot"))
