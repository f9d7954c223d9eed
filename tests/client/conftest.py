"""Fixtures for the etcd v2 client tests: one real etcd for the session, unique key prefixes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

# tests/ itself is not a package: make the shared tests/realetcd.py importable whatever
# pytest's import mode.
TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from realetcd import start_etcd  # noqa: E402

from grozd.client import Client  # noqa: E402

T = TypeVar("T")


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Client URL of a real etcd 3.4 (v2 API on) shared by the whole session."""
    with start_etcd(tmp_path_factory.mktemp("etcd")) as (_proc, url):
        yield url


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
