"""Fixtures for the data path tests: two "hosts" (namespaces) running the udp backend, in each
mode: offloads on both, per-packet on both (the TUN without a virtio header, as stock flannel
opens it), and mixed (offloads on one, per-packet with a virtio header on the other)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .nsutil import Hosts, two_hosts, udp_overlay

MODES: dict[str, dict[str, bool | None]] = {
    "offload": {"offload_a": True, "offload_b": True},
    "per-packet": {"offload_a": False, "offload_b": False},
    "mixed": {"offload_a": True, "offload_b": False, "vnet_b": True},
}


@pytest.fixture(scope="module", params=list(MODES))
def overlay(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """Both hosts with the udp backend up and routing each other's subnet."""
    with two_hosts() as hosts, udp_overlay(hosts, **MODES[request.param]) as hosts:
        hosts.mode = request.param
        yield hosts
