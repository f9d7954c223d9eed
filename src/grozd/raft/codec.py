"""The versioned binary wire format of the Raft core's values (never pickle).

Messages, entries, hard states and snapshots are encoded by hand-written Cython
(grozd.raft._codec): fixed little-endian fields and length-prefixed bytes, every read
bounds-checked. Each value starts with a format byte, so a peer or a WAL of another version is
refused with a clear error instead of being misread.
"""

from grozd.raft._codec import (
    FORMAT_VERSION,
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

FORMAT = FORMAT_VERSION

__all__ = [
    "FORMAT", "CodecError", "decode_entry", "decode_hard_state", "decode_message",
    "decode_snapshot", "encode_entry", "encode_hard_state", "encode_message", "encode_snapshot",
]
