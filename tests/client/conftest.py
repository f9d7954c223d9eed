"""Fixtures for the etcd v2 client tests: one real etcd for the session, unique key prefixes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from grozd.client import Client

T = TypeVar("T")


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses, so tests sharing one etcd stay independent."""
    return f"/test/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run(etcd_url: str) -> Callable[..., Any]:
    """run(fn, **client_options): asyncio.run(fn(client)) with a Client on the real etcd."""

    def runner(fn: Callable[[Client], Awaitable[T]], **options: Any) -> T:
        async def main() -> T:
            options.setdefault("endpoints", [etcd_url])
            async with Client(**options) as client:
                return await fn(client)

        return asyncio.run(main())

    return runner
