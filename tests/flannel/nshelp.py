"""Network namespaces standing for hosts, and ping between them.

Everything is created inside namespaces named ``grozd-t-<random>`` that this module
created itself, and deleted afterwards even when a test fails; nothing touches the
machine's own namespace. Traffic goes only to addresses inside those namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from grozd.flannel.backends.udp import run_in_netns

UNDERLAY = "veth0"
ADDR_A, ADDR_B = "192.0.2.1", "192.0.2.2"

# Run in a namespace when `ping` is not installed: one ICMP echo per attempt over a raw
# socket, exit 0 on the first reply.
_PY_PING = r"""
import os, socket, struct, sys, time
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
for seq in range(count):
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq); data = b"grozd-ping"
    s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + data), ident, seq) + data, (dst, 0))
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try: pkt, (src, _) = s.recvfrom(2048)
        except socket.timeout: break
        ihl = (pkt[0] & 15) * 4
        typ, _, _, pid, _ = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if typ == 0 and pid == ident and src == dst: sys.exit(0)
sys.exit(1)
"""


def require_root() -> None:
    """Skip unless we may create namespaces."""
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` (callers always pass ``-n <our namespace>``)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def tool(*args: str) -> str:
    """stdout of a read-only command (`ip -n NS route`, `bridge -n NS fdb`)."""
    return subprocess.run(list(args), capture_output=True, text=True, check=True,
                          timeout=10).stdout


@contextlib.contextmanager
def namespaces(count: int, prefix: str = "grozd-t-") -> Iterator[list[str]]:
    """``count`` fresh namespaces named ``<prefix><random>-<n>``, lo up, deleted afterwards;
    skips the test if they cannot be made."""
    require_root()
    tag = uuid.uuid4().hex[:8]
    created: list[str] = []
    try:
        for i in range(count):
            name = f"{prefix}{tag}-{i}"
            res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                                 timeout=10)
            if res.returncode != 0:
                pytest.skip(f"cannot create network namespaces: {res.stderr.strip()}")
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        yield created
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass(frozen=True)
class HostPair:
    """Two "hosts": namespaces ``a`` and ``b``, veth0 each, on 192.0.2.0/24."""

    a: str
    b: str

    def add_pod_bridge(self, ns: str, pod_cidr: str) -> None:
        """A bridge holding a "pod" address (e.g. 10.5.3.1/24), as docker's would."""
        add_pod_bridge(ns, pod_cidr)


def add_pod_bridge(ns: str, pod_cidr: str) -> None:
    """A port-less bridge cbr0 in ``ns`` holding a "pod" address (e.g. 10.5.3.1/24), as docker's
    bridge would (this kernel has no dummy driver)."""
    ip("-n", ns, "link", "add", "cbr0", "type", "bridge")
    ip("-n", ns, "addr", "add", pod_cidr, "dev", "cbr0")
    ip("-n", ns, "link", "set", "cbr0", "up")


@contextlib.contextmanager
def host_pair() -> Iterator[HostPair]:
    """Two namespaces joined by a veth pair, each end called veth0."""
    with namespaces(2) as (a, b):
        ip("-n", a, "link", "add", UNDERLAY, "type", "veth", "peer", "name", UNDERLAY,
           "netns", b)
        for ns, addr in ((a, ADDR_A), (b, ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", UNDERLAY)
            ip("-n", ns, "link", "set", UNDERLAY, "up")
        yield HostPair(a, b)


def ping_command(ns: str, addr: str, count: int = 2, wait: int = 2) -> list[str]:
    """``ip netns exec NS ping -c COUNT -W WAIT ADDR`` (a Python stand-in without ping)."""
    if shutil.which("ping"):
        return ["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.2",
                "-W", str(wait), addr]
    return ["ip", "netns", "exec", ns, sys.executable, "-c", _PY_PING, addr, str(count),
            str(wait)]


@dataclass(frozen=True)
class Cluster:
    """Hosts (namespaces, veth0 each, on 192.0.2.0/24) plugged into one bridge in ``switch``."""

    switch: str
    hosts: tuple[str, ...]
    addrs: tuple[str, ...]


@contextlib.contextmanager
def cluster(count: int = 3) -> Iterator[Cluster]:
    """``count`` hosts, 192.0.2.1 and up, joined by bridge br0 in a namespace of its own."""
    with namespaces(count + 1) as (switch, *hosts):
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        addrs = []
        for i, ns in enumerate(hosts):
            port = f"port{i}"
            ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", UNDERLAY,
               "netns", ns)
            ip("-n", switch, "link", "set", port, "master", "br0")
            ip("-n", switch, "link", "set", port, "up")
            addr = f"192.0.2.{i + 1}"
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", UNDERLAY)
            ip("-n", ns, "link", "set", UNDERLAY, "up")
            addrs.append(addr)
        yield Cluster(switch, tuple(hosts), tuple(addrs))


def ns_socket(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket created inside namespace ``ns`` (it stays there; use it from any thread)."""
    return run_in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))


def tcp_transfer(src_ns: str, src: str, dst_ns: str, dst: str, data: bytes,
                 timeout: float = 30.0) -> tuple[str, str]:
    """Sends ``data`` over TCP from ``src`` (in ``src_ns``) to ``dst`` (in ``dst_ns``); returns
    the sha256 of what the receiver got and the client address the receiver saw."""
    got: dict[str, object] = {}
    with ns_socket(dst_ns) as server:
        server.bind((dst, 0))  # the pod address: answers must come from it (see the notes)
        server.listen(1)
        server.settimeout(timeout)
        port = server.getsockname()[1]

        def receive() -> None:
            try:
                conn, peer = server.accept()
                got["peer"] = peer[0]
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
            with ns_socket(src_ns) as client:
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
    return str(got["sha256"]), str(got["peer"])
