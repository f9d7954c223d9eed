"""Fixtures for the fleet tests: one real etcd for the session, a key prefix per test
(deleted afterwards), and in-process clusters of agents and engines on that etcd."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from grozd.client import Client, KeyNotFoundError, SyncClient
from grozd.fleet.agent import Agent
from grozd.fleet.engine import Engine
from grozd.fleet.registry import MachineState, Registry
from grozd.fleet.runners import Runner, StateCallback, UnitState

T = TypeVar("T")


@pytest.fixture
def prefix(request: pytest.FixtureRequest, etcd_url: str) -> Iterator[str]:
    """A fleet key prefix no other test uses; removed when the test ends."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name[:40])
    key = f"/test-fleet/{name}-{uuid.uuid4().hex[:8]}"
    yield key
    with SyncClient([etcd_url]) as client, contextlib.suppress(KeyNotFoundError):
        client.delete(key, recursive=True)


def run_async(coro: Awaitable[T]) -> T:
    """Run one coroutine on a fresh event loop."""

    async def main() -> T:
        return await coro

    return asyncio.run(main())


def machine_id(n: int) -> str:
    """A recognisable 32-hex machine ID: machine 1 is 'aaaa0001...'."""
    return f"{n:04d}".rjust(8, "a") + uuid.uuid4().hex[:24]


class FakeRunner(Runner):
    """An in-memory runner: units become active on start, inactive on stop."""

    def __init__(self) -> None:
        self.loaded: dict[str, tuple[str, UnitState]] = {}
        self.callbacks: list[StateCallback] = []
        self.starts: list[str] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for name in list(self.loaded):
            await self.unload(name)

    def _set(self, name: str, active: str, sub: str) -> None:
        text, old = self.loaded[name]
        state = UnitState(old.load_state, active, sub, old.hash)
        self.loaded[name] = (text, state)
        for cb in self.callbacks:
            cb(name, state)

    async def load(self, name: str, text: str) -> None:
        from grozd.fleet.unit import content_hash

        self.loaded[name] = (text, UnitState("loaded", "inactive", "dead", content_hash(text)))
        for cb in self.callbacks:
            cb(name, self.loaded[name][1])

    async def unload(self, name: str) -> None:
        if self.loaded.pop(name, None) is not None:
            for cb in self.callbacks:
                cb(name, None)

    async def start(self, name: str) -> None:
        self.starts.append(name)
        self._set(name, "active", "running")

    async def stop(self, name: str) -> None:
        self._set(name, "inactive", "dead")

    def units(self) -> dict[str, UnitState]:
        return {name: state for name, (_, state) in self.loaded.items()}

    def subscribe(self, callback: StateCallback) -> None:
        self.callbacks.append(callback)

    async def status(self, name: str) -> tuple[str, int]:
        state = self.loaded.get(name)
        if state is None:
            return f"Unit {name} could not be found.\n", 4
        return f"{name}: {state[1].active_state}\n", 0 if state[1].is_active else 3

    async def journal(self, name: str, lines: int = 10, follow: bool = False) -> AsyncIterator[str]:
        if False:  # pragma: no cover - an empty async generator
            yield ""


class Node:
    """One in-process machine: agent (+ runner) and engine candidate."""

    def __init__(self, cluster: Cluster, mid: str, metadata: dict[str, str], runner: Runner,
                 engine: bool) -> None:  # fmt: skip
        self.cluster = cluster
        self.id = mid
        self.runner = runner
        self.registry = cluster.registry
        self.agent = Agent(
            cluster.registry,
            runner,
            MachineState(mid, f"10.0.0.{len(cluster.nodes) + 1}", metadata),
            ttl=cluster.ttl,
            reconcile_interval=cluster.interval,
        )
        self.engine = (
            Engine(cluster.registry, mid, lease_ttl=cluster.lease_ttl,
                   reconcile_interval=cluster.interval)  # fmt: skip
            if engine
            else None
        )
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.runner.open()
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self.agent.run()))
        if self.engine is not None:
            self.tasks.append(loop.create_task(self.engine.run()))

    async def kill(self) -> None:
        """Die without cleaning up (presence then expires by TTL)."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks = []
        await self.runner.close()

    async def stop(self) -> None:
        """Shut down cleanly, as fleetd does on SIGTERM."""
        if self.engine is not None:
            self.engine.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks = []
        await self.agent.shutdown()
        await self.runner.close()


class Cluster:
    """Machines sharing one registry (prefix) on the real etcd."""

    def __init__(self, client: Client, prefix: str, *, ttl: int = 2, lease_ttl: int = 2,
                 interval: float = 5.0) -> None:  # fmt: skip
        self.client = client
        self.registry = Registry(client, prefix)
        self.ttl = ttl
        self.lease_ttl = lease_ttl
        self.interval = interval
        self.nodes: list[Node] = []

    async def add(self, metadata: dict[str, str] | None = None, *, runner: Runner | None = None,
                  engine: bool = True, mid: str | None = None) -> Node:  # fmt: skip
        node = Node(self, mid or machine_id(len(self.nodes) + 1), metadata or {},
                    runner or FakeRunner(), engine)  # fmt: skip
        self.nodes.append(node)
        await node.start()
        return node

    async def close(self) -> None:
        for node in self.nodes:
            if node.tasks:
                await node.stop()

    async def placements(self) -> dict[str, str | None]:
        jobs, _ = await self.registry.jobs()
        return {name: job.target for name, job in jobs.items() if job.submitted}

    async def wait(self, check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                   what: str = "condition") -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not await check():
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def settle(self, timeout: float = 10.0) -> dict[str, str | None]:
        """Wait until every wanted unit is placed or has a reason, and agents agree."""

        async def settled() -> bool:
            jobs, _ = await self.registry.jobs()
            states = await self.registry.unit_states()
            for job in jobs.values():
                if not job.submitted or job.desired_state == "inactive":
                    continue
                if job.target is None and job.reason is None:
                    text = await self.registry.unit_text(job.hash or "")
                    if text is None or "Global=true" not in text:
                        return False
                if job.target is not None and (job.name, job.target) not in states:
                    return False
            return True

        await self.wait(settled, timeout, "the cluster to settle")
        return await self.placements()


@pytest.fixture
def cluster(etcd_url: str, prefix: str) -> Callable[..., Any]:
    """cluster(fn, **options): run ``await fn(Cluster)`` on a fresh loop, then tear down."""

    def runner(fn: Callable[[Cluster], Awaitable[T]], **options: Any) -> T:
        async def main() -> T:
            async with Client([etcd_url]) as client:
                c = Cluster(client, prefix, **options)
                try:
                    return await fn(c)
                finally:
                    await c.close()

        return run_async(main())

    return runner
