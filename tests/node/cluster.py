"""In-process members on loopback for node tests: real WAL, real TCP, one event loop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import msgpack

from grozd.raft.node import NodeConfig, RaftNode


class KV:
    """A tiny state machine: set key to value; apply returns the entry index."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, data: bytes) -> int:
        key, value = msgpack.unpackb(data)
        self.data[key] = value
        return index

    def snapshot(self) -> bytes:
        return msgpack.packb(self.data)

    def restore(self, data: bytes) -> None:
        self.data = msgpack.unpackb(data)


def put(key: str, value: str) -> bytes:
    return msgpack.packb([key, value])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """N members on 127.0.0.1 with fast timers (heartbeat 20 ms, election 200 ms)."""

    def __init__(self, root: Path, size: int = 3, token: str = "test-cluster",
                 **overrides: object) -> None:
        self.root = root
        self.token = token
        self.overrides = overrides
        self.urls = {f"m{i}": f"http://127.0.0.1:{free_port()}" for i in range(1, size + 1)}
        self.nodes: dict[str, RaftNode] = {}

    def config(self, name: str, state: str = "new", cluster: dict | None = None) -> NodeConfig:
        url = self.urls[name]
        members = cluster or {n: [u] for n, u in self.urls.items()}
        cfg = NodeConfig(
            name=name, data_dir=self.root / name, listen_peer_urls=[url],
            initial_advertise_peer_urls=[url], initial_cluster=members,
            initial_cluster_state=state, initial_cluster_token=self.token,
            heartbeat_interval_ms=20, election_timeout_ms=200, seed=hash(name) & 0xFFFF,
        )
        for k, v in self.overrides.items():
            setattr(cfg, k, v)
        return cfg

    async def start(self, name: str, **kw: object) -> RaftNode:
        node = RaftNode(self.config(name, **kw), KV())
        await node.start()
        self.nodes[name] = node
        return node

    async def start_all(self) -> None:
        for name in self.urls:
            await self.start(name)

    async def leader(self, timeout: float = 5.0) -> RaftNode:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for node in self.nodes.values():
                if not node.stopped.is_set() and node.is_leader:
                    return node
            await asyncio.sleep(0.01)
        raise AssertionError("no leader elected")

    async def stop(self, name: str) -> None:
        await self.nodes.pop(name).stop()

    async def stop_all(self) -> None:
        for name in list(self.nodes):
            await self.stop(name)

    async def converge(self, index: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(n.applied >= index for n in self.nodes.values()):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"members did not all apply {index}: "
                             f"{ {k: n.applied for k, n in self.nodes.items()} }")
