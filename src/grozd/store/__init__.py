"""The etcd v2 keyspace as a deterministic state machine (no Raft, no clock, no I/O).

    store = Store()
    result = store.apply(1, encode_command("set", "/a/b", value="1", now=time.time()))
    store.get("/a", recursive=True)
    watcher = store.watch("/a", recursive=True)   # await watcher -> Event | None

See `Store` for the operations and `grozd.store.commands` for the command format.
"""

from grozd.store.commands import (
    OPS,
    Command,
    CommandError,
    decode_command,
    encode_command,
    request_command,
)
from grozd.store.errors import MESSAGES, STATUSES, EtcdError
from grozd.store.event import Event
from grozd.store.store import Result, Store
from grozd.store.watch import Watcher

__all__ = [
    "MESSAGES",
    "OPS",
    "STATUSES",
    "Command",
    "CommandError",
    "EtcdError",
    "Event",
    "Result",
    "Store",
    "Watcher",
    "decode_command",
    "encode_command",
    "request_command",
]
