"""The wire codec: round trips of every message shape, and clear refusals of bad bytes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grozd.raft.codec import (
    FORMAT,
    CodecError,
    decode_entry,
    decode_hard_state,
    decode_message,
    decode_snapshot,
    encode_entry,
    encode_hard_state,
    encode_message,
    encode_snapshot,
)
from grozd.raft.core import ConfState, Entry, HardState, Message, MessageType, Snapshot

u64 = st.integers(min_value=0, max_value=2**64 - 1)
entries = st.builds(Entry, u64, u64, st.binary(max_size=64), st.integers(0, 1))
snapshots = st.builds(
    Snapshot, u64, u64,
    st.builds(ConfState, st.lists(u64, max_size=5), st.lists(u64, max_size=3)),
    st.binary(max_size=64),
)


def same_message(a: Message, b: Message) -> bool:
    fields = ("type", "to", "frm", "term", "log_term", "index", "entries", "commit", "reject",
              "reject_hint", "context")
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    if (a.snapshot is None) != (b.snapshot is None):
        return False
    return a.snapshot is None or encode_snapshot(a.snapshot) == encode_snapshot(b.snapshot)


@given(
    st.sampled_from(list(MessageType)), u64, u64, u64, u64, u64, st.lists(entries, max_size=5),
    u64, st.booleans(), u64, st.none() | snapshots, st.none() | st.binary(max_size=16),
)
def test_message_round_trip(t, to, frm, term, log_term, index, ents, commit, reject, hint, snap,
                            ctx) -> None:
    m = Message(int(t), to, frm, term, log_term, index, ents, commit, reject, hint, snap, ctx)
    assert same_message(decode_message(encode_message(m)), m)


@given(entries)
def test_entry_round_trip(e: Entry) -> None:
    assert decode_entry(encode_entry(e)) == e


@given(u64, u64, u64)
def test_hard_state_round_trip(term: int, vote: int, commit: int) -> None:
    hs = HardState(term, vote, commit)
    assert decode_hard_state(encode_hard_state(hs)) == hs


@given(snapshots)
def test_snapshot_round_trip(s: Snapshot) -> None:
    back = decode_snapshot(encode_snapshot(s))
    assert (back.index, back.term, back.conf_state, back.data) == (
        s.index, s.term, s.conf_state, s.data)


def test_other_format_is_refused_by_name() -> None:
    data = bytes((FORMAT + 1,)) + encode_message(Message(MessageType.APP))[1:]
    with pytest.raises(CodecError, match=f"format {FORMAT + 1}, this version reads format"):
        decode_message(data)


def valid() -> bytes:
    return encode_message(Message(MessageType.APP, 1, 2, 3, entries=[Entry(1, 1, b"abc")],
                                  context=b"c"))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty message"),
        (valid()[:-1], "truncated: 1 bytes needed"),
        (valid()[:40], "truncated"),
        (valid() + b"x", "1 trailing bytes"),
        (valid()[:1] + bytes((99,)) + valid()[2:], "unknown type 99"),
        (valid()[:2] + bytes((0x80,)) + valid()[3:], "unknown flags 0x80"),
        # An entry count far beyond the bytes present is refused before anything is allocated.
        (valid()[:59] + (2**31).to_bytes(4, "little") + valid()[63:], "truncated"),
    ],
)
def test_malformed_messages_get_precise_errors(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_message(data)


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        decode_message(bytes((FORMAT,)) + data)
    except CodecError:
        pass


def test_pickle_is_never_involved() -> None:
    import pickle

    with pytest.raises(CodecError):
        decode_message(pickle.dumps(Message(MessageType.APP)))
