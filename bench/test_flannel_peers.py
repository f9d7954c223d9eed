"""Programming 1,000 remote leases with the kernel VXLAN backend, and withdrawing them.

A fresh network namespace (``grozd-peers-bench-<random>-a``) stands for the host, with a veth
pair to a second one (``...-b``) as its underlay (192.0.2.1/24 and 192.0.2.2/24). The vxlan
backend brings up ``flannel.1`` there, then PEERS remote leases arrive as one burst of ADDED
events and go again as one burst of REMOVED events, each applied as the daemon applies a burst
of lease events (`grozd.flannel.daemon.apply_events`). Printed: the time for each burst. Checked
once after each (not per peer), with ``ip``/``bridge``: one permanent neighbour, one FDB entry
and one on-link route per peer after the adds, none after the removals.

Both namespaces are created here and deleted afterwards, also on failure; nothing touches the
machine's own namespace. Root only (skipped otherwise).

Run:
    .venv/bin/python -m pytest bench/test_flannel_peers.py -q -s
``GROZD_BENCH_PEERS`` changes the number of peers (default 1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from grozd.flannel.backends import make_backend
from grozd.flannel.backends.vxlan import VxlanBackend
from grozd.flannel.config import BackendConfig
from grozd.flannel.daemon import apply_events
from grozd.flannel.leases import EventType, Lease, LeaseAttrs, LeaseEvent
from grozd.flannel.netlink import Netlink

PEERS = int(os.environ.get("GROZD_BENCH_PEERS", "1000"))
NETWORK = IPv4Network("10.0.0.0/8")
OWN = IPv4Network("10.255.255.0/24")
DEVICE = "flannel.1"


def ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def host_with_underlay() -> Iterator[str]:
    """A namespace with veth0 (192.0.2.1/24) whose peer is in a second namespace."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        pytest.skip("iproute2 (`ip`, `bridge`) is not installed")
    tag = uuid.uuid4().hex[:8]
    names = [f"grozd-peers-bench-{tag}-a", f"grozd-peers-bench-{tag}-b"]
    created: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", names[0], "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
           "netns", names[1])
        for name, addr in zip(names, ("192.0.2.1", "192.0.2.2"), strict=True):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", "veth0")
            ip("-n", name, "link", "set", "veth0", "up")
        yield names[0]
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def peer_lease(i: int) -> Lease:
    """Peer ``i``: subnet 10.<1 + i // 250>.<i % 250>.0/24, its own VtepMAC and PublicIP."""
    subnet = IPv4Network(f"10.{1 + i // 250}.{i % 250}.0/24")
    n = i + 2
    mac = f"0a:58:00:00:{n >> 8:02x}:{n & 0xFF:02x}"
    public = IPv4Address(f"198.18.{n >> 8}.{n & 0xFF}")
    attrs = LeaseAttrs(public, "vxlan", {"VtepMAC": mac})
    return Lease(subnet, attrs, attrs.to_json())


def count(ns: str) -> dict[str, int]:
    """Permanent neighbours, FDB entries with a remote dst, and routes on the device."""
    neigh = ip("-n", ns, "neigh", "show", "dev", DEVICE, "nud", "permanent")
    fdb = subprocess.run(["bridge", "-n", ns, "fdb", "show", "dev", DEVICE],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    routes = ip("-n", ns, "route", "show", "dev", DEVICE)
    return {
        "neighbours": sum(1 for line in neigh.splitlines() if "lladdr" in line),
        "fdb": sum(1 for line in fdb.splitlines() if " dst 198.18." in line),
        "routes": sum(1 for line in routes.splitlines() if "onlink" in line),
    }


async def program(ns: str) -> tuple[float, float, dict[str, int], dict[str, int]]:
    leases = [peer_lease(i) for i in range(PEERS)]
    async with Netlink(ns) as nl:
        underlay = await nl.find_underlay("veth0")
        backend = make_backend(BackendConfig("vxlan"), nl, underlay, NETWORK)
        assert isinstance(backend, VxlanBackend)
        await backend.setup()
        attrs = LeaseAttrs(underlay.public_ip, "vxlan", {"VtepMAC": backend.mac})
        await backend.configure(Lease(OWN, attrs, attrs.to_json()))

        adds = [LeaseEvent(EventType.ADDED, lease) for lease in leases]
        start = time.perf_counter()
        errors = await apply_events(backend, adds)
        add_time = time.perf_counter() - start
        assert errors == [], errors[:3]
        after_add = count(ns)

        removes = [LeaseEvent(EventType.REMOVED, lease) for lease in leases]
        start = time.perf_counter()
        errors = await apply_events(backend, removes)
        remove_time = time.perf_counter() - start
        assert errors == [], errors[:3]
        after_remove = count(ns)
    return add_time, remove_time, after_add, after_remove


def test_program_and_withdraw_peers() -> None:
    with host_with_underlay() as ns:
        add_time, remove_time, after_add, after_remove = asyncio.run(program(ns))
    print(f"\n{PEERS} peers: add {add_time:.3f} s ({PEERS / add_time:,.0f} peers/s),"
          f" remove {remove_time:.3f} s ({PEERS / remove_time:,.0f} peers/s)")
    assert after_add == {"neighbours": PEERS, "fdb": PEERS, "routes": PEERS}
    assert after_remove == {"neighbours": 0, "fdb": 0, "routes": 0}
