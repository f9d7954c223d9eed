"""Pod-to-pod TCP throughput (iperf3) between two hosts over each overlay data path.

Two network namespaces joined by a veth pair (192.0.2.1/24, 192.0.2.2/24) stand for the hosts,
each with a "pod" address on a port-less bridge (10.77.1.1/24, 10.77.2.1/24). Paths: the raw veth
(host to host, the ceiling here), kernel VXLAN laid out as flannel's vxlan backend does, and
grozd's udp backend with offloads and per packet. 1 and 4 TCP streams, SECONDS each; the table
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

SECONDS = int(os.environ.get("GROZD_BENCH_SECONDS", "5"))
STREAMS = (1, 4)
PATHS = ("veth", "vxlan", "udp-offload", "udp-per-packet")
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


def setup_vxlan(names: dict[str, str]) -> None:
    """Kernel VXLAN as flannel's vxlan backend programs it: flannel.1 (learning off) holding
    <subnet>.0/32; per peer a permanent neighbour, an FDB entry, then the on-link route."""
    macs = {}
    for key, ns in names.items():
        host, subnet, _ = HOSTS[key]
        ip("-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472",
           "local", host, "dev", "veth0", "nolearning")
        ip("-n", ns, "link", "set", "flannel.1", "mtu", "1450")
        ip("-n", ns, "addr", "add", f"{subnet.network_address}/32", "dev", "flannel.1")
        ip("-n", ns, "link", "set", "flannel.1", "up")
        macs[key] = json.loads(ip("-j", "-n", ns, "link", "show", "flannel.1"))[0]["address"]
    for key, ns in names.items():
        for peer, (host, subnet, _) in HOSTS.items():
            if peer == key:
                continue
            gw = str(subnet.network_address)
            ip("-n", ns, "neigh", "replace", gw, "lladdr", macs[peer], "dev", "flannel.1",
               "nud", "permanent")
            subprocess.run(["bridge", "-n", ns, "fdb", "append", macs[peer], "dev", "flannel.1",
                            "dst", host], check=True, capture_output=True, timeout=10)
            ip("-n", ns, "route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")


@contextlib.contextmanager
def path(kind: str) -> Iterator[tuple[Endpoints, list[UdpBackend]]]:
    """Two hosts with ``kind`` set up; the iperf3 endpoints and any udp backends."""
    with two_hosts() as names:
        (ha, _, pa), (hb, _, pb) = HOSTS["a"], HOSTS["b"]
        if kind == "veth":
            yield (names["a"], ha, names["b"], hb), []
            return
        if kind == "vxlan":
            setup_vxlan(names)
            yield (names["a"], pa, names["b"], pb), []
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
    cns, caddr, sns, saddr = ends
    server = subprocess.Popen(["ip", "netns", "exec", sns, "iperf3", "-s", "-1", "-B", saddr,
                               "-p", str(PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until the server listens
            res = subprocess.run(["ip", "netns", "exec", cns, "iperf3", "-c", saddr, "-B", caddr,
                                  "-p", str(PORT), "-t", str(SECONDS), "-P", str(streams), "-J"],
                                 capture_output=True, text=True, timeout=SECONDS + 60)
            report = json.loads(res.stdout or "{}")
            if "refused" not in report.get("error", ""):
                break
            time.sleep(0.1)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[dict[tuple[str, int], float]]:
    """Collects the figures; prints the table when the module is done."""
    table: dict[tuple[str, int], float] = {}
    yield table
    if not table:
        return
    lines = [f"pod-to-pod TCP, iperf3 {SECONDS} s, Gbit/s (ratio to kernel VXLAN)",
             f"{'path':<16}" + "".join(f"{f'{n} stream' + ('s' if n > 1 else ''):>20}"
                                        for n in STREAMS)]
    for kind in PATHS:
        cells = []
        for n in STREAMS:
            value, base = table.get((kind, n)), table.get(("vxlan", n))
            if value is None:
                cells.append(f"{'-':>20}")
            else:
                ratio = f" ({value / base:.2f}x)" if base else ""
                cells.append(f"{f'{value:.2f}{ratio}':>20}")
        lines.append(f"{kind:<16}" + "".join(cells))
    # Shown even without -s: output capture is suspended for the table.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with suspended:
        print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("kind", PATHS)
def test_overlay_throughput(kind: str, results: dict[tuple[str, int], float]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (apt-get install -y iperf3)")
    with path(kind) as (ends, backends):
        for streams in STREAMS:
            results[kind, streams] = iperf3(ends, streams)
        for backend in backends:
            counters = backend.counters()
            drops = {k: v for k, v in counters.items() if k.startswith("drop_") and v}
            print(f"\n{kind} {backend.netns}: offloads {backend.datapath.offloads}"  # type: ignore[union-attr]
                  f" super-packets {counters['tun_super_packets']}"
                  f" gso-writes {counters['tun_gso_writes']} drops {drops}")
    assert all(results[kind, n] > 0 for n in STREAMS)
