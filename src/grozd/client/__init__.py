"""Client for the etcd v2 HTTP API (keys, watches, members, stats).

`Client` is the asyncio client; `SyncClient` wraps it for blocking code::

    async with Client(["http://127.0.0.1:2379"]) as etcd:
        await etcd.set("/config/answer", "42")
        print((await etcd.get("/config/answer")).node.value)
"""

from grozd.client.client import Client, key_path
from grozd.client.errors import (
    DirNotEmptyError,
    EtcdError,
    EtcdInterrupted,
    EtcdUnavailable,
    EventIndexClearedError,
    InvalidRequestError,
    KeyNotFoundError,
    LeaderElectionError,
    NodeExistError,
    NotDirError,
    NotFileError,
    RaftInternalError,
    RootReadOnlyError,
    TestFailedError,
    UnauthorizedError,
    WatcherClearedError,
    error_class,
)
from grozd.client.models import Member, Node, Response
from grozd.client.sync import SyncClient

__all__ = [
    "Client",
    "DirNotEmptyError",
    "EtcdError",
    "EtcdInterrupted",
    "EtcdUnavailable",
    "EventIndexClearedError",
    "InvalidRequestError",
    "KeyNotFoundError",
    "LeaderElectionError",
    "Member",
    "Node",
    "NodeExistError",
    "NotDirError",
    "NotFileError",
    "RaftInternalError",
    "Response",
    "RootReadOnlyError",
    "SyncClient",
    "TestFailedError",
    "UnauthorizedError",
    "WatcherClearedError",
    "error_class",
    "key_path",
]
