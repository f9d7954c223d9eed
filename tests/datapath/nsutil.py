"""Network namespaces standing for two hosts, "pods" on a bridge in each, and the udp backend.

Everything lives in namespaces named ``grozd-dp-<random>-<n>`` that this module creates and
deletes itself (also when a test fails); nothing touches the machine's own namespace, and traffic
goes only to addresses inside those namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network

import pytest

from grozd.flannel.backends.udp import UdpBackend, run_in_netns
from tests.flannel.nshelp import namespaces as shared_namespaces

PREFIX = "grozd-dp-"
NETWORK = IPv4Network("10.77.0.0/16")
SUBNET_A, SUBNET_B = IPv4Network("10.77.1.0/24"), IPv4Network("10.77.2.0/24")
HOST_A, HOST_B = "192.0.2.1", "192.0.2.2"
POD_A, POD_B = "10.77.1.1", "10.77.2.1"


def require_root() -> None:
    """Skip unless namespaces and TUN devices can be made here."""
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")


def ip(*args: str) -> str:
    """``ip ARGS`` (callers always pass ``-n <our namespace>`` or ``netns``)."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def our_namespaces() -> list[str]:
    """Namespaces with this module's prefix that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[str]]:
    """``count`` fresh namespaces with lo up, deleted afterwards."""
    require_root()
    with shared_namespaces(count, prefix=PREFIX) as names:
        yield names


@dataclass
class Hosts:
    """Two "hosts" (namespaces ``a`` and ``b``) joined by a veth pair, a pod bridge in each."""

    a: str
    b: str
    backends: dict[str, UdpBackend] = field(default_factory=dict)
    mode: str = ""


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """veth0 in each (192.0.2.1/24, 192.0.2.2/24), and a port-less bridge cbr0 holding the pod
    address (10.77.1.1/24, 10.77.2.1/24)."""
    with namespaces(2) as (a, b):
        ip("-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b)
        for ns, host, pod in ((a, HOST_A, POD_A), (b, HOST_B, POD_B)):
            ip("-n", ns, "addr", "add", f"{host}/24", "dev", "veth0")
            ip("-n", ns, "link", "set", "veth0", "up")
            ip("-n", ns, "link", "add", "cbr0", "type", "bridge")
            ip("-n", ns, "addr", "add", f"{pod}/24", "dev", "cbr0")
            ip("-n", ns, "link", "set", "cbr0", "up")
        yield Hosts(a, b)


@contextlib.contextmanager
def udp_overlay(hosts: Hosts, offload_a: bool | None, offload_b: bool | None,
                vnet_a: bool | None = None, vnet_b: bool | None = None) -> Iterator[Hosts]:
    """The udp backend on both hosts, each routing the other's subnet."""
    backends = {
        "a": UdpBackend(hosts.a, NETWORK, SUBNET_A, HOST_A, offload=offload_a, vnet_hdr=vnet_a),
        "b": UdpBackend(hosts.b, NETWORK, SUBNET_B, HOST_B, offload=offload_b, vnet_hdr=vnet_b),
    }
    backends["a"].add_peer(SUBNET_B, HOST_B)
    backends["b"].add_peer(SUBNET_A, HOST_A)
    started: list[UdpBackend] = []
    try:
        for backend in backends.values():
            backend.start()
            started.append(backend)
        hosts.backends = backends
        yield hosts
    finally:
        hosts.backends = {}
        for backend in started:
            backend.stop()


def ns_socket(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket created inside namespace ``ns`` (it stays there; use it from any thread)."""
    return run_in_netns(ns, lambda: socket.socket(family, kind, proto))


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(ns: str, src: str, dst: str, count: int = 3, timeout: float = 2.0) -> int:
    """ICMP echo from ``src`` to ``dst`` in ``ns`` over a raw socket; the number of replies."""
    s = ns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    replies = 0
    with s:
        s.bind((src, 0))
        ident = (os.getpid() ^ id(s)) & 0xFFFF
        for seq in range(count):
            body = struct.pack("!HH", ident, seq) + b"grozd-datapath"
            head = struct.pack("!BBH", 8, 0, 0)
            csum = _icmp_checksum(head + body)
            s.sendto(struct.pack("!BBH", 8, 0, csum) + body, (dst, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    pkt, (frm, _) = s.recvfrom(2048)
                except TimeoutError:
                    break
                ihl = (pkt[0] & 15) * 4
                typ, _, _, pid, pseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
                if typ == 0 and pid == ident and pseq == seq and frm == dst:
                    replies += 1
                    break
    return replies


IP_RECVERR = 11  # <linux/in.h>; not exported by Python's socket module


@dataclass(frozen=True)
class IcmpError:
    """An ICMP error as queued on a socket with IP_RECVERR."""

    errno: int
    type: int
    code: int
    offender: str  # the address the ICMP error came from


def icmp_error(ns: str, src: str, dst: str, ttl: int = 64,
               timeout: float = 3.0) -> IcmpError | None:
    """Sends one UDP datagram ``src`` -> ``dst``:9 with ``ttl`` from ``ns``; the ICMP error it
    provoked (read from the socket's error queue), or None if none came."""
    s = ns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        s.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
        s.bind((src, 0))
        s.connect((dst, 9))
        s.send(b"grozd-probe")
        poller = select.poll()
        poller.register(s, select.POLLERR)
        if not poller.poll(timeout * 1000):
            return None
        _, ancdata, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
        for level, kind, data in ancdata:
            if level == socket.SOL_IP and kind == IP_RECVERR:
                err, _origin, typ, code = struct.unpack_from("=IBBB", data)
                offender = socket.inet_ntoa(data[20:24])  # sockaddr_in after sock_extended_err
                return IcmpError(err, typ, code, offender)
    return None


def tcp_transfer(src_ns: str, src: str, dst_ns: str, dst: str, data: bytes,
                 timeout: float = 30.0) -> str:
    """Sends ``data`` over TCP from ``src`` (in ``src_ns``) to ``dst`` (in ``dst_ns``); returns the
    sha256 of what the receiver got."""
    server = ns_socket(dst_ns)
    got: dict[str, object] = {}
    with server:
        server.bind((dst, 0))
        server.listen(1)
        server.settimeout(timeout)
        port = server.getsockname()[1]

        def receive() -> None:
            try:
                conn, _ = server.accept()
                digest = hashlib.sha256()
                with conn:
                    conn.settimeout(timeout)
                    while chunk := conn.recv(1 << 20):
                        digest.update(chunk)
                got["sha256"] = digest.hexdigest()
            except OSError as exc:
                got["error"] = exc

        thread = threading.Thread(target=receive, name="tcp-receiver")
        thread.start()
        try:
            client = ns_socket(src_ns)
            with client:
                client.settimeout(timeout)
                client.bind((src, 0))
                client.connect((dst, port))
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
        finally:
            thread.join(timeout)
    if "error" in got:
        raise got["error"]  # type: ignore[misc]
    assert "sha256" in got, "the receiver did not finish"
    return str(got["sha256"])


def snmp(ns: str) -> dict[str, int]:
    """The namespace's /proc/net/snmp counters as ``Proto.Name``."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True, timeout=10).stdout
    lines = text.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto = names.split(":", 1)[0]
        for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
            out[f"{proto}.{name}"] = int(value)
    return out
