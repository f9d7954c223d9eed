"""Two hosts joined by the udp backend: reachability, bulk TCP, ICMP errors, TTL, routes, counters.

Every test runs in each mode of the ``overlay`` fixture (offload, per-packet, mixed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from ipaddress import IPv4Network

import pytest

from grozd.flannel.backends.udp import UdpBackend

from .nsutil import (
    HOST_A,
    HOST_B,
    POD_A,
    POD_B,
    SUBNET_B,
    Hosts,
    icmp_error,
    our_namespaces,
    ping,
    snmp,
    tcp_transfer,
    two_hosts,
    udp_overlay,
)

MB = 1 << 20
ICMP_UNREACH, ICMP_TIME_EXCEEDED = 3, 11


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def counted(backend: UdpBackend, before: dict[str, int], **want: int) -> dict[str, int]:
    """The counters' change since ``before`` once it includes ``want`` (a loop counts an ICMP
    error after writing it, so the prober may see the error first); gives up after a second."""
    deadline = time.monotonic() + 1.0
    while True:
        d = delta(before, backend.counters())
        if all(d.get(k, 0) >= v for k, v in want.items()) or time.monotonic() > deadline:
            return d
        time.sleep(0.01)


def test_ping_both_ways(overlay: Hosts) -> None:
    assert ping(overlay.a, POD_A, POD_B) == 3
    assert ping(overlay.b, POD_B, POD_A) == 3


def test_tcp_20mb_each_way(overlay: Hosts) -> None:
    a, b = overlay.backends["a"], overlay.backends["b"]
    before_a, before_b = a.counters(), b.counters()
    snmp_a, snmp_b = snmp(overlay.a), snmp(overlay.b)
    data = os.urandom(20 * MB)
    want = hashlib.sha256(data).hexdigest()
    assert tcp_transfer(overlay.a, POD_A, overlay.b, POD_B, data) == want
    assert tcp_transfer(overlay.b, POD_B, overlay.a, POD_A, data) == want
    da, db = delta(before_a, a.counters()), delta(before_b, b.counters())
    # Both directions carried the data (payload plus headers), nothing was dropped on the way.
    for d in (da, db):
        assert d["tx_bytes"] > 20 * MB and d["rx_bytes"] > 20 * MB
        assert d["tx_packets"] > 20 * MB // 1500 and d["rx_packets"] > 20 * MB // 1500
        assert not {k: v for k, v in d.items() if k.startswith("drop_") and k != "drop_not_ipv4"}
    # The kernels found no bad checksum in what the data paths wrote into their TUNs (segments
    # are checksummed by the sender's data path, the receiver's kernel verifies them).
    for ns, old in ((overlay.a, snmp_a), (overlay.b, snmp_b)):
        now = snmp(ns)
        assert now["Tcp.InCsumErrors"] == old["Tcp.InCsumErrors"]
        assert now["Ip.InHdrErrors"] == old["Ip.InHdrErrors"]
    offload_a = a.datapath is not None and a.datapath.offloads["tun_tso"]
    offload_b = b.datapath is not None and b.datapath.offloads["tun_tso"]
    if offload_a:  # super-packets read from the TUN, sent as UDP GSO trains
        assert da["tun_super_packets"] > 0 and da["tx_gso_sends"] > 0
    else:
        assert da.get("tun_super_packets", 0) == 0 and da.get("tx_gso_sends", 0) == 0
    if offload_b:
        assert db["tun_super_packets"] > 0 and db["tx_gso_sends"] > 0
        # GRO on the socket, coalesced writes into the TUN.
        assert da["tun_gso_writes"] > 0 and db["tun_gso_writes"] > 0
        assert db["rx_gro_buffers"] > 0
    else:
        assert db.get("tun_gso_writes", 0) == 0 and db.get("rx_gro_buffers", 0) == 0


def test_unknown_destination_gets_net_unreachable(overlay: Hosts) -> None:
    a = overlay.backends["a"]
    before = a.counters()
    err = icmp_error(overlay.a, POD_A, "10.77.9.1")
    assert err is not None
    # Like flannel: type 3 code 0, from the unreachable destination itself.
    assert (err.type, err.code, err.errno) == (ICMP_UNREACH, 0, errno.ENETUNREACH)
    assert err.offender == "10.77.9.1"
    d = counted(a, before, drop_no_route=1, icmp_unreachable=1)
    assert d["drop_no_route"] == 1 and d["icmp_unreachable"] == 1


@pytest.mark.parametrize("ttl, where", [(1, "a"), (2, "b")])
def test_expiring_ttl_gets_time_exceeded(overlay: Hosts, ttl: int, where: str) -> None:
    """Each data path decrements the TTL (as flannel): TTL 1 dies on the sender's, TTL 2 on the
    receiver's, and either way the sender hears ICMP time-exceeded."""
    backend = overlay.backends[where]
    before = backend.counters()
    err = icmp_error(overlay.a, POD_A, POD_B, ttl=ttl)
    assert err is not None
    assert (err.type, err.code, err.errno) == (ICMP_TIME_EXCEEDED, 0, errno.EHOSTUNREACH)
    assert err.offender == POD_B
    d = counted(backend, before, drop_ttl=1, icmp_time_exceeded=1)
    assert d["drop_ttl"] == 1 and d["icmp_time_exceeded"] == 1


def test_ttl_3_reaches_the_peer(overlay: Hosts) -> None:
    # Two decrements leave TTL 1, enough for local delivery: port 9 is closed there.
    err = icmp_error(overlay.a, POD_A, POD_B, ttl=3)
    assert err is not None
    assert (err.type, err.code, err.errno) == (ICMP_UNREACH, 3, errno.ECONNREFUSED)


def test_remove_and_add_peer(overlay: Hosts) -> None:
    a = overlay.backends["a"]
    a.remove_peer(SUBNET_B)
    try:
        err = icmp_error(overlay.a, POD_A, POD_B)
        assert err is not None and err.type == ICMP_UNREACH and err.code == 0
        assert ping(overlay.a, POD_A, POD_B, count=1, timeout=0.5) == 0
    finally:
        a.add_peer(SUBNET_B, HOST_B)
    assert ping(overlay.a, POD_A, POD_B) == 3


def test_longest_prefix_wins(overlay: Hosts) -> None:
    a = overlay.backends["a"]
    catch_all = IPv4Network("10.77.0.0/16")
    a.add_peer(catch_all, "192.0.2.99")  # nobody there
    try:
        assert ping(overlay.a, POD_A, POD_B) == 3
        assert icmp_error(overlay.a, POD_A, "10.77.9.1", timeout=0.5) is None  # sent to .99
    finally:
        a.remove_peer(catch_all)


def test_route_swaps_under_traffic(overlay: Hosts) -> None:
    """Replacing the table while the TUN loop forwards never loses the live route."""
    a = overlay.backends["a"]
    data = os.urandom(8 * MB)
    stop = threading.Event()
    swaps = 0

    def churn() -> None:
        nonlocal swaps
        while not stop.is_set():
            for i in range(16):
                a.add_peer(IPv4Network(f"10.77.{100 + i}.0/24"), HOST_A)
            for i in range(16):
                a.remove_peer(IPv4Network(f"10.77.{100 + i}.0/24"))
            swaps += 32

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        got = tcp_transfer(overlay.a, POD_A, overlay.b, POD_B, data)
    finally:
        stop.set()
        thread.join()
    assert got == hashlib.sha256(data).hexdigest()
    assert swaps > 0
    assert a.peers == {SUBNET_B: a.peers[SUBNET_B]}


def test_counters_are_complete(overlay: Hosts) -> None:
    from grozd.flannel.datapath import COUNTER_NAMES

    for backend in overlay.backends.values():
        counters = backend.counters()
        assert tuple(counters) == COUNTER_NAMES
        assert all(v >= 0 for v in counters.values())
        assert counters["tun_reads"] > 0 and counters["rx_datagrams"] > 0


def test_runtime_fallback_when_offloads_are_refused() -> None:
    """A refused UDP GSO send and a refused coalesced TUN write switch those offloads off for
    good, and traffic goes on per packet."""
    with two_hosts() as hosts, udp_overlay(hosts, True, True) as hosts:
        a, b = hosts.backends["a"], hosts.backends["b"]
        assert a.datapath is not None and b.datapath is not None
        data = os.urandom(4 * MB)
        want = hashlib.sha256(data).hexdigest()
        assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want  # offloads in use
        a.datapath._inject_refusal(send=True)
        b.datapath._inject_refusal(write=True)
        assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
        assert a.datapath.offloads["udp_gso"] is False
        assert b.datapath.offloads["tun_gso_write"] is False
        assert a.counters()["gso_send_fallbacks"] == 1
        assert b.counters()["gso_write_fallbacks"] == 1
        before_a, before_b = a.counters(), b.counters()
        assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
        da, db = delta(before_a, a.counters()), delta(before_b, b.counters())
        assert da["tun_super_packets"] > 0 and da.get("tx_gso_sends", 0) == 0
        assert db.get("tun_gso_writes", 0) == 0 and db["tun_writes"] > 4 * MB // 1500


def test_teardown_leaves_nothing() -> None:
    with two_hosts() as hosts:
        names = {hosts.a, hosts.b}
        with udp_overlay(hosts, None, None):
            assert names <= set(our_namespaces())
        assert ping(hosts.a, HOST_A, HOST_B) == 3  # the hosts themselves are still fine
    assert not names & set(our_namespaces())
