"""A store member: the v2 keyspace replicated by a Raft node, served over HTTP.

`Member(config)` is what `grozd etcd` runs: `await start()`, `await stopped()`, `await stop()`.
`RaftBackend` is the API's `Backend` over a `RaftNode`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from grozd.api.app import ApiServer, make_app
from grozd.api.backend import (
    BackendError,
    Done,
    MemberError,
    MemberExists,
    MemberNotFound,
    MemberRemoved,
    NoLeader,
    ProposalTimeout,
    _go_duration,
    _go_time,
)
from grozd.api.expiry import expiry_loop
from grozd.http.config import ApiConfig
from grozd.raft.core import ConfChangeType
from grozd.raft.node import (
    DataDirMismatchError,
    NodeConfig,
    NodeError,
    NoLeaderError,
    ProposalTimeoutError,
    RaftNode,
)
from grozd.raft.snapshot import SnapshotError
from grozd.raft.transport import parse_url
from grozd.raft.wal import WALError
from grozd.store import Store

log = logging.getLogger("grozd.api.member")

__all__ = ["Member", "MemberError", "RaftBackend", "StartError"]


class StartError(Exception):
    """The member cannot start; the message says why and what to do."""


def _backend_error(e: NodeError) -> BackendError:
    if isinstance(e, NoLeaderError):
        return NoLeader()
    if isinstance(e, ProposalTimeoutError):
        return ProposalTimeout()
    return BackendError(str(e))


def _translated(done: Done) -> Done:
    """``done``, called with the node's errors as the API's."""

    def settled(result: object, error: BaseException | None) -> None:
        done(result, _backend_error(error) if isinstance(error, NodeError) else error)

    return settled


class RaftBackend:
    """The API's view of a Raft member."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self.started = time.time()
        self.removed: set[int] = set()

    async def propose(self, command: bytes, timeout: float | None = None) -> object:
        try:
            return await self.node.propose(command, timeout)
        except NodeError as e:
            raise _backend_error(e) from None

    def submit(self, command: bytes, timeout: float | None, done: Done) -> None:
        try:
            self.node.submit(command, timeout, _translated(done))
        except NodeError as e:
            raise _backend_error(e) from None

    def read_submit(self, done: Done) -> None:
        try:
            self.node.read_submit(None, _translated(done))
        except NodeError as e:
            raise _backend_error(e) from None

    async def read_index(self) -> None:
        try:
            await self.node.read_index()
        except NodeError as e:
            raise _backend_error(e) from None

    @property
    def raft_index(self) -> int:
        return self.node.core.committed

    @property
    def raft_term(self) -> int:
        return self.node.term

    @property
    def cluster_id(self) -> int:
        return self.node.cluster_id

    @property
    def member_id(self) -> int:
        return self.node.id

    @property
    def name(self) -> str:
        return self.node.config.name

    @property
    def leader_id(self) -> int:
        return self.node.leader

    def members(self) -> list[dict[str, Any]]:
        return [{"id": m.id, "name": m.name, "peerURLs": m.peer_urls,
                 "clientURLs": m.client_urls} for m in self.node.members.values()]

    async def add_member(self, peer_urls: list[str]) -> dict[str, Any]:
        for m in self.node.members.values():
            if set(peer_urls) & set(m.peer_urls):
                raise MemberExists("membership: peerURL exists")
        try:
            m = await self.node.add_member(peer_urls)
        except NodeError as e:
            raise MemberError(str(e)) from None
        return {"id": m.id, "name": m.name, "peerURLs": m.peer_urls, "clientURLs": []}

    async def remove_member(self, id: int) -> None:
        if id in self.removed:
            raise MemberRemoved(f"Member permanently removed: {id:x}")
        if id not in self.node.members:
            raise MemberNotFound(f"No such member: {id:x}")
        try:
            await self.node.remove_member(id)
        except NodeError as e:
            raise MemberError(str(e)) from None
        self.removed.add(id)

    async def update_member(self, id: int, peer_urls: list[str]) -> None:
        member = self.node.members.get(id)
        if member is None:
            raise MemberNotFound(f"No such member: {id:x}")
        for other in self.node.members.values():
            if other.id != id and set(peer_urls) & set(other.peer_urls):
                raise MemberExists("membership: peerURL exists")
        await self.publish(replace(member, peer_urls=list(peer_urls)))

    async def publish(self, member: Any, timeout: float | None = None) -> None:
        """Record a member's attributes cluster-wide: a configuration entry naming a member
        already in place changes no vote, only what the others know of it."""
        kind = ConfChangeType.ADD_LEARNER if member.learner else ConfChangeType.ADD_NODE
        try:
            await self.node.change_membership(kind, member.id, member, timeout=timeout)
        except NodeError as e:
            raise MemberError(str(e)) from None

    def stats(self) -> dict[str, Any]:
        node, now = self.node, time.time()
        me = f"{node.id:x}"
        leader = f"{node.leader:x}" if node.leader else ""
        core_stats = node.stats
        out: dict[str, Any] = {
            "self": {
                "name": node.config.name, "id": me,
                "state": "StateLeader" if node.is_leader else "StateFollower",
                "startTime": _go_time(self.started),
                "leaderInfo": {"leader": leader, "uptime": _go_duration(now - self.started),
                               "startTime": _go_time(self.started)},
                "recvAppendRequestCnt": node.transport.frames_received,
                "sendAppendRequestCnt": node.transport.frames_sent,
            },
            "leader": None,
        }
        if node.is_leader:
            followers = {}
            for pid, pr in node.core.progress().items():
                if pid != node.id:
                    followers[f"{pid:x}"] = {"counts": {"fail": 0, "success": pr.match},
                                             "latency": {"current": 0, "average": 0,
                                                         "standardDeviation": 0, "minimum": 0,
                                                         "maximum": 0}}
            out["leader"] = {"leader": me, "followers": followers}
        # Not part of etcd's stats bodies: only /metrics reads it.
        out["raft"] = {**core_stats, "fsync_seconds": node.fsync_seconds}
        return out


class Member:
    """Store + Raft node + HTTP API + TTL expiry, as one member process runs them."""

    def __init__(self, config: NodeConfig, listen_client_urls: list[str] | None = None,
                 max_request_bytes: int = 1572864) -> None:
        self.config = config
        self.listen_client_urls = listen_client_urls or ["http://127.0.0.1:2379"]
        self.store = Store()
        self.node = RaftNode(config, self.store)
        self.backend = RaftBackend(self.node)
        self.api_config = ApiConfig(max_body_bytes=max_request_bytes)
        self.server: ApiServer | None = None
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        try:
            await self.node.start()
        except (DataDirMismatchError, NodeError, WALError, SnapshotError, OSError) as e:
            raise StartError(str(e)) from None
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(expiry_loop(
            self.store, self.backend, self.api_config.clock, lambda: self.node.is_leader)))
        # Like etcd, serve clients only once this member's client URLs are known cluster-wide:
        # a client syncing its endpoints from /v2/members must find them.
        publish = loop.create_task(self.publish_self())
        self.tasks.append(publish)
        stopped = loop.create_task(self.node.stopped.wait())
        await asyncio.wait([publish, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not publish.done():
            raise StartError("the member stopped before it could join the cluster")
        self.server = make_app(self.store, self.backend, self.api_config)
        for url in self.listen_client_urls:
            host, port = parse_url(url)
            try:
                await self.server.start(host, port)
            except OSError as e:
                await self.stop()
                raise StartError(f"cannot listen for clients on {url}: {e.strerror}") from None
        log.info("event=serving_clients member=%x urls=%s", self.node.id,
                 ",".join(self.listen_client_urls))

    async def publish_self(self) -> None:
        """Tell the cluster this member's name and client URLs (as etcd publishes them)."""
        delay = 0.1
        while True:
            me = self.node.members.get(self.node.id)
            if me is None:
                await asyncio.sleep(delay)
                continue
            if me.client_urls == self.config.client_urls and me.name == self.config.name:
                return
            desired = replace(me, client_urls=list(self.config.client_urls),
                              name=self.config.name)
            try:
                # Short attempts: a leader busy with another change turns ours into a no-op.
                await self.backend.publish(desired, timeout=1.0)
                return
            except MemberError as e:
                log.debug("event=publish_retry error=%r", str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def stopped(self) -> None:
        await self.node.stopped.wait()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            await self.server.stop()
        await self.node.stop()
