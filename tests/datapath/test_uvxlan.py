"""Userspace VXLAN (`UserVxlan`) between two hosts: against itself in each offload mode and against
the kernel's VXLAN device; the wire format against a hand-driven peer; ARP answers; completion of
partial checksums.

Host A always runs `UserVxlan`; host B runs `UserVxlan`, the kernel's ``vxlan`` device, or (for the
wire tests) nothing but a plain UDP socket playing a VTEP. The neighbour and route that lead into
the VTEP are programmed with ``ip``, as the daemon programs them (permanent neighbour
``<subnet>.0 -> VtepMAC``, then ``<subnet> via <subnet>.0 dev flannel.<VNI> onlink``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network

import pytest

from grozd.flannel.backends.uvxlan import UserVxlan

from .nsutil import (
    HOST_A,
    HOST_B,
    POD_A,
    POD_B,
    SUBNET_A,
    SUBNET_B,
    Hosts,
    icmp_error,
    ip,
    ns_socket,
    ping,
    snmp,
    tcp_transfer,
    two_hosts,
)

MB = 1 << 20
VNI = 1
FAKE_MAC = "0a:58:0a:4d:02:00"  # the hand-driven VTEP on host B

# mode -> (A's offload, B's kind: "user" with its offload, or "kernel"; B's veth tx offload)
MODES: dict[str, tuple[bool | None, str, bool | None, bool]] = {
    "offload": (True, "user", True, True),
    "per-packet": (False, "user", False, True),
    "mixed": (True, "user", False, True),
    "kernel": (None, "kernel", None, True),
    "kernel-tx-off": (None, "kernel", None, False),
    "kernel-per-packet": (False, "kernel", None, True),
}


@dataclass
class Pair:
    hosts: Hosts
    a: UserVxlan
    b: UserVxlan | None  # None: the kernel's device
    macs: dict[str, str] = field(default_factory=dict)
    mode: str = ""


def route_into_vtep(ns: str, subnet: IPv4Network, mac: str, dev: str = "flannel.1") -> None:
    """What the daemon installs per remote lease: the neighbour, then the on-link route."""
    gw = str(subnet.network_address)
    ip("-n", ns, "neigh", "replace", gw, "lladdr", mac, "dev", dev, "nud", "permanent")
    ip("-n", ns, "route", "replace", str(subnet), "via", gw, "dev", dev, "onlink")


def kernel_vtep(ns: str, local: str, subnet: IPv4Network) -> str:
    """The kernel backend's device on host ``ns``; returns its MAC."""
    ip("-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", str(VNI), "dstport", "8472",
       "local", local, "dev", "veth0", "nolearning")
    ip("-n", ns, "link", "set", "flannel.1", "mtu", "1450", "up")
    ip("-n", ns, "addr", "add", f"{subnet.network_address}/32", "dev", "flannel.1")
    return json.loads(ip("-j", "-n", ns, "link", "show", "flannel.1"))[0]["address"]


@pytest.fixture(scope="module", params=list(MODES))
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    offload_a, kind_b, offload_b, tx_b = MODES[request.param]
    with two_hosts() as hosts:
        a = UserVxlan(hosts.a, HOST_A, VNI, address=f"{SUBNET_A.network_address}/32",
                      offload=offload_a)
        b = None
        if kind_b == "user":
            b = UserVxlan(hosts.b, HOST_B, VNI, address=f"{SUBNET_B.network_address}/32",
                          offload=offload_b)
        with a:
            if b is not None:
                b.start()
            try:
                assert a.mac is not None
                if b is None:
                    mac_b = kernel_vtep(hosts.b, HOST_B, SUBNET_B)
                    subprocess.run(["bridge", "-n", hosts.b, "fdb", "append", a.mac, "dev",
                                    "flannel.1", "dst", HOST_A], check=True, timeout=10)
                else:
                    assert b.mac is not None
                    mac_b = b.mac
                    b.set_peer(SUBNET_A, a.mac, HOST_A)
                if not tx_b:
                    subprocess.run(["ip", "netns", "exec", hosts.b, "ethtool", "-K", "veth0",
                                    "tx", "off"], check=True, capture_output=True, timeout=10)
                a.set_peer(SUBNET_B, mac_b, HOST_B)
                route_into_vtep(hosts.a, SUBNET_B, mac_b)
                route_into_vtep(hosts.b, SUBNET_A, a.mac)
                yield Pair(hosts, a, b, {"a": a.mac, "b": mac_b}, request.param)
            finally:
                if b is not None:
                    b.stop()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_ping_both_ways(pair: Pair) -> None:
    assert ping(pair.hosts.a, POD_A, POD_B) == 3
    assert ping(pair.hosts.b, POD_B, POD_A) == 3


def test_tcp_20mb_each_way(pair: Pair) -> None:
    a, hosts = pair.a, pair.hosts
    before = a.counters()
    snmp_a, snmp_b = snmp(hosts.a), snmp(hosts.b)
    data = os.urandom(20 * MB)
    want = hashlib.sha256(data).hexdigest()
    assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
    assert tcp_transfer(hosts.b, POD_B, hosts.a, POD_A, data) == want
    d = delta(before, a.counters())
    assert d["tx_bytes"] > 20 * MB and d["rx_bytes"] > 20 * MB
    assert not {k: v for k, v in d.items() if k.startswith("drop_") and k != "drop_multicast"}
    for ns, old in ((hosts.a, snmp_a), (hosts.b, snmp_b)):
        now = snmp(ns)
        assert now["Tcp.InCsumErrors"] == old["Tcp.InCsumErrors"]
        assert now["Ip.InHdrErrors"] == old["Ip.InHdrErrors"]
    offloads = a.datapath.offloads if a.datapath is not None else {}
    if offloads.get("tun_tso"):
        assert d["tun_super_packets"] > 0 and d["tx_gso_sends"] > 0
    else:
        assert d.get("tun_super_packets", 0) == 0 and d.get("tx_gso_sends", 0) == 0
    if pair.mode in ("kernel", "kernel-per-packet"):
        # A kernel sender over veth: whole TSO frames in one datagram, partial checksums.
        assert d.get("rx_super_frames", 0) > 0 and d.get("rx_csum_completed", 0) > 0
    elif pair.mode == "kernel-tx-off":
        assert d.get("rx_super_frames", 0) == 0 and d.get("rx_csum_completed", 0) == 0
    if offloads.get("tun_gso_write") and pair.mode in ("offload", "mixed", "kernel-tx-off"):
        assert d["tun_gso_writes"] > 0  # same-flow segments coalesced into the TAP


def test_ttl_is_left_alone(pair: Pair) -> None:
    """A VXLAN hop is a layer-2 link: nothing on the way decrements the TTL, so TTL 1 reaches the
    peer's closed port (the udp backend would answer time-exceeded)."""
    err = icmp_error(pair.hosts.a, POD_A, POD_B, ttl=1)
    assert err is not None and (err.type, err.code, err.errno) == (3, 3, errno.ECONNREFUSED)


# -- the wire, against a hand-driven VTEP --------------------------------------------------------


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s >> 16) + (s & 0xFFFF)
    return s


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0x4000, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", ~csum(hdr) & 0xFFFF) + hdr[12:]
    return hdr + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes, check: str = "full") -> bytes:
    """A UDP datagram; ``check``: "full", "partial" (the pseudo-header sum only, as a kernel
    sender leaves it for the NIC) or "bad"."""
    length = 8 + len(data)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    raw = struct.pack("!HHHH", sport, dport, length, 0) + data
    if check == "partial":
        value = csum(pseudo)
    else:
        value = ~csum(pseudo + raw) & 0xFFFF or 0xFFFF
        if check == "bad":
            value ^= 0x0101
    return raw[:6] + struct.pack("!H", value) + raw[8:]


def vxlan(vni: int, dst_mac: str, src_mac: str, ethertype: int, payload: bytes,
          flags: int = 0x08) -> bytes:
    return (struct.pack("!B3xI", flags, vni << 8) + mac_bytes(dst_mac) + mac_bytes(src_mac)
            + struct.pack("!H", ethertype) + payload)


@pytest.fixture(scope="module")
def half() -> Iterator[tuple[Hosts, UserVxlan, socket.socket]]:
    """A `UserVxlan` (VNI 42) on host A; on host B only a UDP socket on 8472 playing the VTEP."""
    with two_hosts() as hosts:
        a = UserVxlan(hosts.a, HOST_A, 42, address=f"{SUBNET_A.network_address}/32")
        peer = ns_socket(hosts.b, socket.AF_INET, socket.SOCK_DGRAM)
        with a, peer:
            peer.bind((HOST_B, 8472))
            peer.settimeout(3)
            a.set_peer(SUBNET_B, FAKE_MAC, HOST_B)
            route_into_vtep(hosts.a, SUBNET_B, FAKE_MAC, "flannel.42")
            yield hosts, a, peer


def recv_vxlan(peer: socket.socket, want_proto: int) -> tuple[bytes, tuple[str, int]]:
    """The next datagram carrying an IPv4 packet of ``want_proto`` (skipping anything else)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        data, src = peer.recvfrom(65536)
        if len(data) >= 8 + 14 + 20 and data[20:22] == b"\x08\x00" and data[22 + 9] == want_proto:
            return data, src
    raise AssertionError("no such datagram")


def test_wire_format(half: tuple[Hosts, UserVxlan, socket.socket]) -> None:
    hosts, a, peer = half
    fake_pod = "10.77.2.7"
    with ns_socket(hosts.a, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((POD_A, 0))
        s.sendto(b"grozd-vxlan", (fake_pod, 9))
        sport = s.getsockname()[1]
    data, (src_ip, src_port) = recv_vxlan(peer, 17)
    assert (src_ip, src_port) == (HOST_A, 8472)
    assert data[:8] == bytes([0x08, 0, 0, 0, 0, 0, 42, 0])  # I flag, VNI 42 << 8
    frame = data[8:]
    assert frame[:6] == mac_bytes(FAKE_MAC) and frame[6:12] == mac_bytes(a.mac or "")
    pkt = frame[14:]
    ihl = (pkt[0] & 15) * 4
    assert csum(pkt[:ihl]) == 0xFFFF and pkt[8] == 64  # header intact, TTL untouched
    assert socket.inet_ntoa(pkt[12:16]) == POD_A and socket.inet_ntoa(pkt[16:20]) == fake_pod
    seg = pkt[ihl:]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 17, len(seg))
    assert struct.unpack("!HH", seg[:4]) == (sport, 9) and seg[8:] == b"grozd-vxlan"
    assert csum(pseudo + seg) == 0xFFFF  # completed, not left partial


def echo_request(src: str, dst: str, ident: int) -> bytes:
    body = struct.pack("!HH", ident, 1) + b"grozd"
    icmp = struct.pack("!BBH", 8, 0, ~csum(b"\x08\x00\x00\x00" + body) & 0xFFFF) + body
    return ipv4(src, dst, 1, icmp)


def test_accepts_any_source_port_and_answers_over_vxlan(
        half: tuple[Hosts, UserVxlan, socket.socket]) -> None:
    """An echo request wrapped by hand, sent from a port other than 8472, is answered; the reply
    comes back wrapped, to the VTEP's port."""
    hosts, a, peer = half
    frame = vxlan(42, a.mac or "", FAKE_MAC, 0x0800, echo_request("10.77.2.7", POD_A, 0x4242))
    with ns_socket(hosts.b, socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind((HOST_B, 40000))
        other.sendto(frame, (HOST_A, 8472))
    data, _ = recv_vxlan(peer, 1)
    pkt = data[22:]
    ihl = (pkt[0] & 15) * 4
    assert socket.inet_ntoa(pkt[16:20]) == "10.77.2.7"
    assert pkt[ihl] == 0 and struct.unpack("!H", pkt[ihl + 4:ihl + 6])[0] == 0x4242  # reply


@pytest.mark.parametrize("flags, vni", [(0x00, 42), (0x08, 43)], ids=["no-I-flag", "other-vni"])
def test_foreign_datagrams_are_dropped(half: tuple[Hosts, UserVxlan, socket.socket], flags: int,
                                       vni: int) -> None:
    hosts, a, peer = half
    before = a.counters()
    ident = 0x1000 + flags + vni
    frame = vxlan(vni, a.mac or "", FAKE_MAC, 0x0800, echo_request("10.77.2.7", POD_A, ident),
                  flags=flags)
    with ns_socket(hosts.b, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(frame, (HOST_A, 8472))
    deadline = time.monotonic() + 2
    while delta(before, a.counters()).get("drop_bad_vxlan", 0) < 1:
        assert time.monotonic() < deadline, "not counted"
        time.sleep(0.01)
    # Never delivered, so never answered (counters could still be catching up on earlier
    # traffic: the loops count after the kernel has taken a packet).
    peer.settimeout(0.3)
    try:
        while True:
            data = peer.recv(65536)
            pkt = data[22:]
            ihl = (pkt[0] & 15) * 4
            if pkt[9] == 1 and len(pkt) >= ihl + 6:
                assert struct.unpack("!H", pkt[ihl + 4:ihl + 6])[0] != ident
    except TimeoutError:
        pass
    finally:
        peer.settimeout(3)


@pytest.mark.parametrize("check, delivered", [("partial", True), ("full", True), ("bad", False)])
def test_partial_checksums_are_completed_and_bad_ones_kept_bad(
        half: tuple[Hosts, UserVxlan, socket.socket], check: str, delivered: bool) -> None:
    hosts, a, _ = half
    with ns_socket(hosts.a, socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((POD_A, 0))
        sink.settimeout(0.5 if not delivered else 3)
        port = sink.getsockname()[1]
        before, errors = a.counters(), snmp(hosts.a)["Udp.InCsumErrors"]
        payload = f"checksum {check}".encode()
        pkt = ipv4("10.77.2.7", POD_A, 17, udp("10.77.2.7", POD_A, 5555, port, payload, check))
        with ns_socket(hosts.b, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(vxlan(42, a.mac or "", FAKE_MAC, 0x0800, pkt), (HOST_A, 8472))
        if delivered:
            assert sink.recv(100) == payload
        else:
            with pytest.raises(TimeoutError):
                sink.recv(100)
            assert snmp(hosts.a)["Udp.InCsumErrors"] == errors + 1
    completed = delta(before, a.counters()).get("rx_csum_completed", 0)
    assert completed == (1 if check == "partial" else 0)


def test_arp_for_a_remote_gateway_is_answered(half: tuple[Hosts, UserVxlan, socket.socket]) -> None:
    """Without the permanent neighbour the kernel asks; the VTEP answers with the peer's MAC."""
    hosts, a, peer = half
    gw = str(SUBNET_B.network_address)
    before = a.counters()
    ip("-n", hosts.a, "neigh", "del", gw, "dev", "flannel.42")
    try:
        with ns_socket(hosts.a, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((POD_A, 0))
            s.sendto(b"after-arp", ("10.77.2.7", 9))
        data, _ = recv_vxlan(peer, 17)
        assert data[8:14] == mac_bytes(FAKE_MAC) and data[-9:] == b"after-arp"
        assert delta(before, a.counters()).get("arp_replies", 0) >= 1
        neigh = ip("-n", hosts.a, "neigh", "show", gw, "dev", "flannel.42")
        assert f"lladdr {FAKE_MAC}" in neigh and "PERMANENT" not in neigh
    finally:
        ip("-n", hosts.a, "neigh", "replace", gw, "lladdr", FAKE_MAC, "dev", "flannel.42", "nud",
           "permanent")


def test_unknown_macs_and_broadcasts_are_not_flooded(
        half: tuple[Hosts, UserVxlan, socket.socket]) -> None:
    hosts, a, peer = half
    before = a.counters()
    stray = "10.77.9.0"
    ip("-n", hosts.a, "neigh", "replace", stray, "lladdr", "0a:58:00:00:00:99", "dev",
       "flannel.42", "nud", "permanent")
    ip("-n", hosts.a, "route", "replace", "10.77.9.0/24", "via", stray, "dev", "flannel.42",
       "onlink")
    try:
        with ns_socket(hosts.a, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((POD_A, 0))
            s.sendto(b"nowhere", ("10.77.9.1", 9))
        deadline = time.monotonic() + 2
        while delta(before, a.counters()).get("drop_no_route", 0) < 1:
            assert time.monotonic() < deadline, "not counted"
            time.sleep(0.01)
        assert delta(before, a.counters()).get("tx_packets", 0) == 0
    finally:
        ip("-n", hosts.a, "route", "del", "10.77.9.0/24")
        ip("-n", hosts.a, "neigh", "del", stray, "dev", "flannel.42")


def test_runtime_fallback_when_offloads_are_refused() -> None:
    """A refused UDP GSO send and a refused coalesced TAP write switch those offloads off for
    good; frames then go one by one, still intact."""
    with two_hosts() as hosts:
        a = UserVxlan(hosts.a, HOST_A, VNI, address=f"{SUBNET_A.network_address}/32", offload=True)
        b = UserVxlan(hosts.b, HOST_B, VNI, address=f"{SUBNET_B.network_address}/32", offload=True)
        with a, b:
            assert a.mac is not None and b.mac is not None
            assert a.datapath is not None and b.datapath is not None
            a.set_peer(SUBNET_B, b.mac, HOST_B)
            b.set_peer(SUBNET_A, a.mac, HOST_A)
            route_into_vtep(hosts.a, SUBNET_B, b.mac)
            route_into_vtep(hosts.b, SUBNET_A, a.mac)
            data = os.urandom(4 * MB)
            want = hashlib.sha256(data).hexdigest()
            assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
            a.datapath._inject_refusal(send=True)
            b.datapath._inject_refusal(write=True)
            assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
            assert a.datapath.offloads["udp_gso"] is False
            assert b.datapath.offloads["tun_gso_write"] is False
            before_a, before_b = a.counters(), b.counters()
            assert tcp_transfer(hosts.a, POD_A, hosts.b, POD_B, data) == want
            da, db = delta(before_a, a.counters()), delta(before_b, b.counters())
            assert da["tun_super_packets"] > 0 and da.get("tx_gso_sends", 0) == 0
            assert db.get("tun_gso_writes", 0) == 0 and db["tun_writes"] > 4 * MB // 1500
