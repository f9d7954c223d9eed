"""Fixtures for the flannel tests: one real etcd for the session, unique key prefixes,
and pairs of network namespaces (root only) that stand for two hosts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from grozd.client import Client

from .nshelp import HostPair, host_pair

T = TypeVar("T")


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """An etcd prefix (flannel's --etcd-prefix) no other test uses."""
    return f"/test-flannel/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


def run_async(coro: Awaitable[T], *, uv: bool = False) -> T:
    """asyncio.run, optionally on uvloop (as the daemon runs)."""

    async def main() -> T:
        return await coro

    factory = uvloop.new_event_loop if uv else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@pytest.fixture
def run(etcd_url: str) -> Callable[..., Any]:
    """run(fn): asyncio.run(fn(client)) with a Client on the real etcd."""

    def runner(fn: Callable[[Client], Awaitable[T]], **options: Any) -> T:
        async def main() -> T:
            options.setdefault("endpoints", [etcd_url])
            async with Client(**options) as client:
                return await fn(client)

        return run_async(main())

    return runner


@pytest.fixture
def hosts() -> Iterator[HostPair]:
    """Two namespaces joined by a veth pair (192.0.2.1/24 and 192.0.2.2/24), root only."""
    with host_pair() as pair:
        yield pair
