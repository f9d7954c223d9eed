"""What the HTTP API needs from the member it serves: the `Backend` protocol.

The API never touches Raft. Writes go through `Backend.propose` (replicate a store
command, return what `Store.apply` gave for it once applied here), ``quorum=true`` reads
through `Backend.read_index`, and the rest is membership and status. `LocalBackend` is
the single-process implementation: commands apply at once, reads need no barrier.

Failures a backend raises are answered as etcd does: an exception with an ``etcd_code``
attribute (such as `BackendError` and its subclasses) becomes that v2 error code (HTTP
500 for 300/301) with ``str(exc)`` as the cause; `TimeoutError` becomes 300 with etcd's
"etcdserver: request timed out"; anything else becomes 300 with its message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from grozd.store import Store
from grozd.store.errors import LEADER_ELECT, RAFT_INTERNAL

# Called with (result, None) or (None, error) when a proposal or read is settled.
Done = Callable[[object, BaseException | None], None]


def _call_back(task: asyncio.Future[Any], done: Done) -> None:
    def settled(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            done(None, asyncio.CancelledError())
        elif task.exception() is not None:
            done(None, task.exception())
        else:
            done(task.result(), None)

    task.add_done_callback(settled)


class BackendError(Exception):
    """A proposal or read that did not complete (etcd error 300, HTTP 500)."""

    etcd_code = RAFT_INTERNAL


class ProposalTimeout(BackendError):
    """The command was not applied in time; it may or may not be applied later."""

    def __init__(self, message: str = "etcdserver: request timed out") -> None:
        super().__init__(message)


class NoLeader(BackendError):
    """No leader is known (etcd error 301 "During Leader Election", HTTP 500)."""

    etcd_code = LEADER_ELECT

    def __init__(self, message: str = "etcdserver: no leader") -> None:
        super().__init__(message)


class MemberError(Exception):
    """A membership change that cannot be made; ``status`` is the HTTP answer."""

    status = 500


class MemberNotFound(MemberError):
    """No member has that ID (404 "No such member: <id>")."""

    status = 404


class MemberExists(MemberError):
    """The ID or a peer URL is already in use (409, message as given)."""

    status = 409


class MemberRemoved(MemberError):
    """The member was removed and cannot come back (410)."""

    status = 410


@runtime_checkable
class Backend(Protocol):
    """The member behind the API.

    Member IDs are ints (shown as lowercase hex like etcd). ``members()`` returns dicts
    with ``id`` (int or hex str), ``name``, ``peerURLs`` and ``clientURLs``.

    Ordering: the API proposes one write per connection at a time, in request order, and
    the store applies in log order, so a client sees its own writes in order.
    """

    async def propose(self, command: bytes, timeout: float | None = None) -> object:
        """Replicate ``command``; return what `Store.apply` returned for it here.

        Raise on failure (see the module docstring for how errors are answered), and
        `TimeoutError` (or a timeout error of the backend's own) after ``timeout`` seconds
        (None: the backend's default).
        """
        ...

    def submit(self, command: bytes, timeout: float | None, done: Done) -> None:
        """`propose` without a coroutine: ``done(result, error)`` is called with the same
        result or failure, as soon as there is one (possibly before this returns)."""
        ...

    async def read_index(self) -> None:
        """Return once this member has applied everything committed when it was called;
        give up (raising) after the backend's own request timeout."""
        ...

    def read_submit(self, done: Done) -> None:
        """`read_index` without a coroutine, answered through ``done`` like `submit`."""
        ...

    @property
    def raft_index(self) -> int:
        """The committed Raft index (X-Raft-Index)."""
        ...

    @property
    def raft_term(self) -> int:
        """The current Raft term (X-Raft-Term)."""
        ...

    @property
    def cluster_id(self) -> int:
        """The cluster ID (X-Etcd-Cluster-ID)."""
        ...

    @property
    def member_id(self) -> int:
        """This member's ID."""
        ...

    @property
    def name(self) -> str:
        """This member's name."""
        ...

    @property
    def leader_id(self) -> int:
        """The leader's member ID, 0 when there is none."""
        ...

    def members(self) -> list[dict[str, Any]]:
        """The cluster's members."""
        ...

    async def add_member(self, peer_urls: list[str]) -> dict[str, Any]:
        """Add a member with these peer URLs; return it (as in `members`)."""
        ...

    async def remove_member(self, id: int) -> None:
        """Remove a member (raise `MemberNotFound`, `MemberRemoved`...)."""
        ...

    async def update_member(self, id: int, peer_urls: list[str]) -> None:
        """Change a member's peer URLs."""
        ...

    def stats(self) -> dict[str, Any]:
        """``{"self": {...}, "leader": {...} or None}``: the bodies of /v2/stats/self and
        /v2/stats/leader (None: not the leader, answered 403 like etcd)."""
        ...


def _go_time(ts: float) -> str:
    """A wall-clock time as Go's time.Time JSON (RFC 3339, nanoseconds, UTC)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` for the common cases (e.g. "38.7s")."""
    if seconds < 1:
        return f"{seconds * 1000:.6f}".rstrip("0").rstrip(".") + "ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


class LocalBackend:
    """A one-member "cluster" in this process: every command applies immediately.

    Log indices count up from the store's applied index, so a store restored from a
    snapshot keeps going. Membership changes are recorded but change nothing else.
    """

    def __init__(
        self,
        store: Store,
        *,
        name: str = "default",
        member_id: int = 0x8E9E05C52164694D,
        cluster_id: int = 0xCDF818194E3A8C32,
        peer_urls: Sequence[str] = ("http://127.0.0.1:2380",),
        client_urls: Sequence[str] = ("http://127.0.0.1:2379",),
        term: int = 1,
    ) -> None:
        self.store = store
        self._name = name
        self._member_id = member_id
        self._cluster_id = cluster_id
        self._term = term
        self._index = store.applied_index
        self._members: dict[int, dict[str, Any]] = {
            member_id: {
                "id": member_id,
                "name": name,
                "peerURLs": list(peer_urls),
                "clientURLs": list(client_urls),
            }
        }
        self._removed: set[int] = set()
        self._started = time.time()
        self._next_member_id = member_id
        self.proposals = 0

    async def propose(self, command: bytes, timeout: float | None = None) -> object:
        """Apply at the next log index and return the store's result (at once: no timeout)."""
        self._index += 1
        self.proposals += 1
        return self.store.apply(self._index, command)

    def submit(self, command: bytes, timeout: float | None, done: Done) -> None:
        _call_back(asyncio.ensure_future(self.propose(command, timeout)), done)

    def read_submit(self, done: Done) -> None:
        _call_back(asyncio.ensure_future(self.read_index()), done)

    async def read_index(self) -> None:
        """Nothing to wait for: everything committed is applied."""

    @property
    def raft_index(self) -> int:
        return self._index

    @property
    def raft_term(self) -> int:
        return self._term

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def member_id(self) -> int:
        return self._member_id

    @property
    def name(self) -> str:
        return self._name

    @property
    def leader_id(self) -> int:
        return self._member_id

    def members(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._members.values()]

    async def add_member(self, peer_urls: list[str]) -> dict[str, Any]:
        for member in self._members.values():
            for url in peer_urls:
                if url in member["peerURLs"]:
                    raise MemberExists("membership: peerURL exists")
        # Deterministic, distinct IDs (etcd hashes the URLs and the time).
        self._next_member_id = (self._next_member_id * 6364136223846793005 + 1) % 2**64 or 1
        member = {"id": self._next_member_id, "name": "", "peerURLs": list(peer_urls),
                  "clientURLs": []}
        self._members[self._next_member_id] = member
        self._index += 1
        return dict(member)

    async def remove_member(self, id: int) -> None:
        if id in self._removed:
            raise MemberRemoved(f"Member permanently removed: {id:x}")
        if id not in self._members:
            raise MemberNotFound(f"No such member: {id:x}")
        del self._members[id]
        self._removed.add(id)
        self._index += 1

    async def update_member(self, id: int, peer_urls: list[str]) -> None:
        if id not in self._members:
            raise MemberNotFound(f"No such member: {id:x}")
        for other_id, member in self._members.items():
            if other_id != id and any(u in member["peerURLs"] for u in peer_urls):
                raise MemberExists("membership: peerURL exists")
        self._members[id]["peerURLs"] = list(peer_urls)
        self._index += 1

    def stats(self) -> dict[str, Any]:
        now = time.time()
        member = f"{self._member_id:x}"
        return {
            "self": {
                "name": self._name,
                "id": member,
                "state": "StateLeader",
                "startTime": _go_time(self._started),
                "leaderInfo": {
                    "leader": member,
                    "uptime": _go_duration(now - self._started),
                    "startTime": _go_time(self._started),
                },
                "recvAppendRequestCnt": 0,
                "sendAppendRequestCnt": 0,
            },
            "leader": {"leader": member, "followers": {}},
        }
