"""Pod-to-pod throughput (iperf3) between two hosts over each overlay data path.

Two network namespaces joined by a veth pair (192.0.2.1/24, 192.0.2.2/24) stand for the hosts,
each with a "pod" address on a port-less bridge (10.77.1.1/24, 10.77.2.1/24). Paths: the raw veth
(host to host, the ceiling here), kernel VXLAN laid out as flannel's vxlan backend does, grozd's
udp backend with offloads and per packet, and grozd's userspace VXLAN (``uvxlan``) on both hosts,
and between a uvxlan host and a kernel VXLAN host, each way ("uvxlan->kernel" sends from the
uvxlan host, "kernel->uvxlan" from the kernel one). 1 and 4 TCP streams, and 64-byte
UDP datagrams sent as fast as iperf3 can (received packets per second), SECONDS each; the table
gives each figure's ratio to kernel VXLAN. Everything lives in namespaces this module creates
(``grozd-dp-bench-<random>-<n>``) and deletes, also on failure.

Run (root; needs iperf3):
    .venv/bin/python -m pytest bench/test_overlay.py -q -s
GROZD_BENCH_SECONDS=10 makes the runs longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from grozd.flannel.backends.udp import UdpBackend
from grozd.flannel.backends.uvxlan import UserVxlan

SECONDS = int(os.environ.get("GROZD_BENCH_SECONDS", "5"))
STREAMS = (1, 4)
UDP64 = "udp64"  # the column of 64-byte UDP packet rates
COLUMNS: tuple[int | str, ...] = (*STREAMS, UDP64)
PATHS = ("veth", "vxlan", "udp-offload", "udp-per-packet", "uvxlan", "uvxlan->kernel",
         "kernel->uvxlan")
NETWORK = IPv4Network("10.77.0.0/16")
HOSTS = {"a": ("192.0.2.1", IPv4Network("10.77.1.0/24"), "10.77.1.1"),
         "b": ("192.0.2.2", IPv4Network("10.77.2.0/24"), "10.77.2.1")}
PORT = 5201

Endpoints = tuple[str, str, str, str]  # client namespace and address, server namespace and address


def ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def two_hosts() -> Iterator[dict[str, str]]:
    """Namespaces "a" and "b": veth0 between them, and the pod bridge cbr0 in each."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"grozd-dp-bench-{tag}-{k}" for k in HOSTS}
    created: list[str] = []
    try:
        for name in names.values():
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", names["a"], "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
           "netns", names["b"])
        for key, ns in names.items():
            host, subnet, pod = HOSTS[key]
            ip("-n", ns, "addr", "add", f"{host}/24", "dev", "veth0")
            ip("-n", ns, "link", "set", "veth0", "up")
            ip("-n", ns, "link", "add", "cbr0", "type", "bridge")
            ip("-n", ns, "addr", "add", f"{pod}/{subnet.prefixlen}", "dev", "cbr0")
            ip("-n", ns, "link", "set", "cbr0", "up")
        yield names
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def setup_vxlan(names: dict[str, str], only: tuple[str, ...] = tuple(HOSTS),
                macs: dict[str, str] | None = None) -> dict[str, str]:
    """Kernel VXLAN as flannel's vxlan backend programs it: flannel.1 (learning off) holding
    <subnet>.0/32; per peer a permanent neighbour, an FDB entry, then the on-link route. ``only``
    the hosts named; ``macs`` has the VtepMACs of the others (userspace VTEPs)."""
    macs = dict(macs or {})
    for key in only:
        ns = names[key]
        host, subnet, _ = HOSTS[key]
        ip("-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472",
           "local", host, "dev", "veth0", "nolearning")
        ip("-n", ns, "link", "set", "flannel.1", "mtu", "1450")
        ip("-n", ns, "addr", "add", f"{subnet.network_address}/32", "dev", "flannel.1")
        ip("-n", ns, "link", "set", "flannel.1", "up")
        macs[key] = json.loads(ip("-j", "-n", ns, "link", "show", "flannel.1"))[0]["address"]
    for key in only:
        ns = names[key]
        for peer, (host, subnet, _) in HOSTS.items():
            if peer == key:
                continue
            gw = str(subnet.network_address)
            ip("-n", ns, "neigh", "replace", gw, "lladdr", macs[peer], "dev", "flannel.1",
               "nud", "permanent")
            subprocess.run(["bridge", "-n", ns, "fdb", "append", macs[peer], "dev", "flannel.1",
                            "dst", host], check=True, capture_output=True, timeout=10)
            ip("-n", ns, "route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")
    return macs


def route_into_vtep(ns: str, subnet: IPv4Network, mac: str) -> None:
    """flannel's per-peer entries on flannel.1: the permanent neighbour, the on-link route."""
    gw = str(subnet.network_address)
    ip("-n", ns, "neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
    ip("-n", ns, "route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")


Backends = list[UdpBackend | UserVxlan]


@contextlib.contextmanager
def uvxlan_path(names: dict[str, str], kernel_b: bool) -> Iterator[Backends]:
    """Userspace VXLAN on host a, and on host b too unless ``kernel_b`` (the kernel's there)."""
    keys = ("a",) if kernel_b else tuple(HOSTS)
    with contextlib.ExitStack() as stack:
        vteps: dict[str, UserVxlan] = {}
        for key in keys:
            host, subnet, _ = HOSTS[key]
            vteps[key] = stack.enter_context(
                UserVxlan(names[key], host, 1, address=f"{subnet.network_address}/32"))
        macs = {key: vtep.mac or "" for key, vtep in vteps.items()}
        if kernel_b:
            macs = setup_vxlan(names, ("b",), macs)
        for key, vtep in vteps.items():
            for peer, (host, subnet, _) in HOSTS.items():
                if peer != key:
                    vtep.set_peer(subnet, macs[peer], host)
                    route_into_vtep(names[key], subnet, macs[peer])
        yield list(vteps.values())


@contextlib.contextmanager
def path(kind: str) -> Iterator[tuple[Endpoints, Backends]]:
    """Two hosts with ``kind`` set up; the iperf3 endpoints and any userspace data paths."""
    with two_hosts() as names:
        (ha, _, pa), (hb, _, pb) = HOSTS["a"], HOSTS["b"]
        if kind == "veth":
            yield (names["a"], ha, names["b"], hb), []
            return
        if kind == "vxlan":
            setup_vxlan(names)
            yield (names["a"], pa, names["b"], pb), []
            return
        if "uvxlan" in kind:
            with uvxlan_path(names, kernel_b="kernel" in kind) as vteps:
                if kind.startswith("kernel"):  # the kernel host (b) is the client
                    yield (names["b"], pb, names["a"], pa), vteps
                else:
                    yield (names["a"], pa, names["b"], pb), vteps
            return
        offload = kind == "udp-offload"
        backends = []
        with contextlib.ExitStack() as stack:
            for key, ns in names.items():
                host, subnet, _ = HOSTS[key]
                backend = UdpBackend(ns, NETWORK, subnet, host, offload=offload)
                for peer, (phost, psubnet, _) in HOSTS.items():
                    if peer != key:
                        backend.add_peer(psubnet, phost)
                stack.enter_context(backend)
                backends.append(backend)
            yield (names["a"], pa, names["b"], pb), backends


def iperf3(ends: Endpoints, streams: int) -> float:
    """Gbit/s received over SECONDS with ``streams`` parallel TCP streams."""
    report = run_iperf3(ends, "-P", str(streams))
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def iperf3_udp64(ends: Endpoints) -> float:
    """Millions of 64-byte UDP datagrams received per second (the sender sends flat out)."""
    report = run_iperf3(ends, "-u", "-l", "64", "-b", "0")
    got = report["end"]["sum_received"]
    return (got["packets"] - got["lost_packets"]) / got["seconds"] / 1e6


def run_iperf3(ends: Endpoints, *args: str) -> dict:
    """One iperf3 run of SECONDS from the client end to the server end; its JSON report."""
    cns, caddr, sns, saddr = ends
    server = subprocess.Popen(["ip", "netns", "exec", sns, "iperf3", "-s", "-1", "-B", saddr,
                               "-p", str(PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until the server listens
            res = subprocess.run(["ip", "netns", "exec", cns, "iperf3", "-c", saddr, "-B", caddr,
                                  "-p", str(PORT), "-t", str(SECONDS), *args, "-J"],
                                 capture_output=True, text=True, timeout=SECONDS + 60)
            report = json.loads(res.stdout or "{}")
            if "refused" not in report.get("error", ""):
                break
            time.sleep(0.1)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[dict[tuple[str, int | str], float]]:
    """Collects the figures; prints the table when the module is done."""
    table: dict[tuple[str, int | str], float] = {}
    yield table
    if not table:
        return
    heads = [f"TCP {n} stream" + ("s" if n > 1 else "") + " Gbit/s" for n in STREAMS]
    lines = [f"pod to pod, iperf3 {SECONDS} s each (ratio to kernel VXLAN)",
             f"{'path':<16}" + "".join(f"{h:>22}" for h in [*heads, "UDP 64 B Mpps"])]
    for kind in PATHS:
        cells = []
        for n in COLUMNS:
            value, base = table.get((kind, n)), table.get(("vxlan", n))
            if value is None:
                cells.append(f"{'-':>22}")
            else:
                ratio = f" ({value / base:.2f}x)" if base else ""
                cells.append(f"{f'{value:.2f}{ratio}':>22}")
        lines.append(f"{kind:<16}" + "".join(cells))
    # Shown even without -s: output capture is suspended for the table.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with suspended:
        print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("kind", PATHS)
def test_overlay_throughput(kind: str, results: dict[tuple[str, int | str], float]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (apt-get install -y iperf3)")
    with path(kind) as (ends, backends):
        for streams in STREAMS:
            results[kind, streams] = iperf3(ends, streams)
        results[kind, UDP64] = iperf3_udp64(ends)
        for backend in backends:
            counters = backend.counters()
            drops = {k: v for k, v in counters.items() if k.startswith("drop_") and v}
            print(f"\n{kind} {backend.netns}: offloads {backend.datapath.offloads}"  # type: ignore[union-attr]
                  f" super-packets {counters['tun_super_packets']}"
                  f" gso-writes {counters['tun_gso_writes']} drops {drops}")
    assert all(results[kind, n] > 0 for n in COLUMNS)
