"""The public face of the compiled Raft core (grozd.raft._core).

The core is a deterministic state machine in the shape of etcd's raft library: feed it `tick()`,
`step(message)`, `propose(data)`, `read_index(ctx)`, `transfer_leadership(to)` and
`propose_conf_change(change)`; collect a `Ready` (hard state, entries and snapshot to persist,
messages to send, committed entries to apply, read states, soft state); persist, send, apply,
then `advance()`. It reads no clock, no global random state, no files and no sockets.
"""

from __future__ import annotations

from enum import IntEnum

from grozd.raft._core import (
    CONF_CHANGE_TYPES,
    ENTRY_TYPES,
    MESSAGE_TYPES,
    PROGRESS_STATES,
    ROLES,
    CompactedError,
    ConfChange,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    ProposalDroppedError,
    Raft,
    RaftError,
    ReadState,
    Ready,
    Snapshot,
    SnapshotTemporarilyUnavailableError,
    SoftState,
    UnavailableError,
)

MessageType = IntEnum("MessageType", MESSAGE_TYPES)
Role = IntEnum("Role", ROLES)
EntryType = IntEnum("EntryType", ENTRY_TYPES)
ProgressState = IntEnum("ProgressState", PROGRESS_STATES)
ConfChangeType = IntEnum("ConfChangeType", CONF_CHANGE_TYPES)

# Messages that only ever come from the local caller, never from a peer.
LOCAL_MESSAGES = frozenset(
    {MessageType.HUP, MessageType.BEAT, MessageType.CHECK_QUORUM, MessageType.UNREACHABLE,
     MessageType.SNAP_STATUS}
)

__all__ = [
    "CompactedError", "ConfChange", "ConfChangeType", "ConfState", "Entry", "EntryType",
    "HardState", "LOCAL_MESSAGES", "MemoryStorage", "Message", "MessageType",
    "ProgressState", "ProposalDroppedError", "Raft", "RaftError", "ReadState", "Ready", "Role",
    "Snapshot", "SnapshotTemporarilyUnavailableError", "SoftState", "UnavailableError",
]
