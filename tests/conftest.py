"""Fixtures shared by the test packages: one real etcd 3.4 (v2 API on) for the whole session.

Tests that use it keep to key prefixes of their own, so they stay independent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.realetcd import start_etcd


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Client URL of a real etcd 3.4 shared by the whole session."""
    with start_etcd(tmp_path_factory.mktemp("etcd")) as (_proc, url):
        yield url
