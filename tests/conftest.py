"""Fixtures shared by the test packages: one real etcd 3.4 (v2 API on) for the whole session.

Tests that use it keep to key prefixes of their own, so they stay independent. A session does
not start while a compiled module is older than its source (it would test the old code).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import grozd
from tests.realetcd import start_etcd


def stale_compiled_modules(package: Path) -> list[str]:
    """Compiled modules older than the .py beside them: they would run instead of the edit."""
    stale = []
    for compiled in package.rglob("*.so"):
        source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_compiled_modules(Path(grozd.__file__).parent)
    if stale:
        pytest.exit(f"compiled from older sources: {', '.join(stale)}; rebuild with "
                    "`.venv/bin/pip install -e .`", returncode=4)


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Client URL of a real etcd 3.4 shared by the whole session."""
    with start_etcd(tmp_path_factory.mktemp("etcd")) as (_proc, url):
        yield url
