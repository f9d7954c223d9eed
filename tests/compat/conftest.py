"""Fixtures: a real etcd 3.4 and a grozd API server (LocalBackend), both fresh per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: make tests/realetcd.py and tests/api/ importable.
TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from api.grozdserver import GrozdServer  # noqa: E402
from realetcd import start_etcd  # noqa: E402

from .harness import request  # noqa: E402

WARMUP_WRITES = 20


def warm_up(url: str) -> None:
    """A few writes, so both servers start well above the small indices tests use."""
    for i in range(WARMUP_WRITES):
        status, _, _ = request(url, "PUT", f"/v2/keys/__warmup__/{i}", b"value=x",
                               {"Content-Type": "application/x-www-form-urlencoded"})
        assert status in (200, 201)


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_etcd(tmp_path_factory.mktemp("compat-etcd"), name="compat") as (_proc, url):
        warm_up(url)
        yield url


@pytest.fixture(scope="session")
def grozd_url() -> Iterator[str]:
    with GrozdServer() as server:
        warm_up(server.url)
        yield server.url
