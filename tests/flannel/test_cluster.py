"""Three hosts on one bridge, each running the daemon, for every backend; pods talk across them.

Hosts are namespaces with veth0 (192.0.2.1-3) plugged into a bridge in a fourth namespace;
each host's "pod" is the first address of its subnet on a port-less bridge. The daemons run in
this process (on uvloop, as ``grozd flanneld`` does) and program their namespaces; everything
is created inside namespaces the fixtures make and deletes, and traffic stays inside them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import shutil
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from grozd.client import Client, KeyNotFoundError
from grozd.flannel.backends import BackendError
from grozd.flannel.daemon import Flanneld
from grozd.flannel.ipmasq import CHAIN
from grozd.flannel.leases import Lease

from .conftest import run_async
from .nshelp import UNDERLAY, add_pod_bridge, cluster, tcp_transfer, tool
from .test_netns import POD_NETWORK, daemon, ping, pod, start, stop, until

MB = 1 << 20
BACKENDS = ("vxlan", "host-gw", "udp", "uvxlan")
MTUS = {"vxlan": 1450, "host-gw": 1500, "udp": 1472, "uvxlan": 1450}


@functools.cache
def payload() -> tuple[bytes, str]:
    """100 MB of random bytes and their sha256 (made once per session)."""
    data = os.urandom(100 * MB)
    return data, hashlib.sha256(data).hexdigest()


def config(kind: str) -> str:
    return json.dumps({"Network": POD_NETWORK, "Backend": {"Type": kind}})


def routed(app: Flanneld, ns: str, lease: Lease) -> bool:
    """Whether ``app``'s host routes ``lease``'s subnet the way its backend does."""
    assert app.backend is not None and app.network is not None
    subnet, kind = lease.subnet, app.network.backend.type
    core = getattr(app.backend, "core", None)
    if kind == "udp":  # the kernel routes the whole network into the TUN; the data path the rest
        return core is not None and subnet in core.peers
    routes = tool("ip", "-n", ns, "route")
    if kind == "host-gw":
        return f"{subnet} via {lease.attrs.public_ip} dev {UNDERLAY} " in routes
    kernel = f"{subnet} via {subnet.network_address} dev flannel.1 proto static onlink" in routes
    if kind == "uvxlan" or app.config.vxlan_userspace:
        return kernel and core is not None and subnet in core.peers
    return kernel


def key(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


async def stop_all(apps: list[Flanneld], tasks: list[asyncio.Task[None]]) -> None:
    for app, task in zip(apps, tasks, strict=True):
        if not task.done():
            await stop(app, task)


@pytest.mark.parametrize("kind", BACKENDS)
def test_three_hosts(kind: str, etcd_url: str, prefix: str, tmp_path: Path) -> None:
    """Routes to every other host, ping, 100 MB with its checksum, a restart keeping the subnet,
    and a host leaving (its lease deleted): the others withdraw its routes within 2 s."""
    data, want = payload()

    async def body(hosts: tuple[str, ...]) -> None:
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", config(kind))
            apps = [daemon(ns, etcd_url, prefix, tmp_path) for ns in hosts]
            tasks = [await start(app) for app in apps]
            try:
                leases = [app.lease for app in apps]
                assert all(x is not None for x in leases)
                for app, ns in zip(apps, hosts, strict=True):
                    for other in leases:
                        if other is not app.lease:
                            await until(lambda app=app, ns=ns, other=other: routed(app, ns, other),
                                        what=f"route to {other.subnet} in {ns}")
                assert f"FLANNEL_MTU={MTUS[kind]}\n" in (tmp_path / f"{hosts[0]}.env").read_text()
                check_devices(kind, apps[0], hosts[0])

                for ns, lease in zip(hosts, leases, strict=True):
                    add_pod_bridge(ns, f"{pod(lease.subnet)}/24")
                for i in range(3):
                    rc, out = await ping(hosts[i], pod(leases[(i + 1) % 3].subnet))
                    assert rc == 0, out
                src, dst = pod(leases[0].subnet), pod(leases[2].subnet)
                got, peer = await asyncio.to_thread(tcp_transfer, hosts[0], src, hosts[2], dst,
                                                    data)
                assert (got, peer) == (want, src)

                # A restart keeps the subnet (and, for the device backends, the VtepMAC).
                await stop(apps[1], tasks[1])
                apps[1] = daemon(hosts[1], etcd_url, prefix, tmp_path)
                tasks[1] = await start(apps[1])
                assert apps[1].lease.subnet == leases[1].subnet
                assert apps[1].lease.attrs == leases[1].attrs
                await until(lambda: routed(apps[1], hosts[1], leases[0]), what="routes again")
                rc, out = await ping(hosts[0], pod(leases[1].subnet))
                assert rc == 0, out

                # Host 3 leaves: its lease is deleted, hosts 1 and 2 withdraw its subnet.
                await stop(apps[2], tasks[2])
                await etcd.delete(key(prefix, leases[2].subnet))
                for app, ns in zip(apps[:2], hosts[:2], strict=True):
                    await until(lambda app=app, ns=ns: not routed(app, ns, leases[2]),
                                timeout=2.0, what=f"withdrawal in {ns}")
                rc, _ = await ping(hosts[0], pod(leases[2].subnet), count=1, wait=1)
                assert rc != 0
            finally:
                await stop_all(apps, tasks)
        if kind in ("udp", "uvxlan"):  # the userspace device goes with the daemon
            device = "flannel0" if kind == "udp" else "flannel.1"
            assert device not in tool("ip", "-n", hosts[0], "link")

    with cluster(3) as c:
        run_async(body(c.hosts), uv=True)


def check_devices(kind: str, app: Flanneld, ns: str) -> None:
    """The device each backend makes, as flannel's would look."""
    assert app.lease is not None
    subnet = app.lease.subnet
    if kind == "udp":
        details = tool("ip", "-n", ns, "-d", "-4", "addr", "show", "dev", "flannel0")
        assert "mtu 1472" in details and "tun type tun" in details
        assert f"inet {subnet.network_address}/16 " in details
        assert app.lease.attrs.backend_type == "udp" and app.lease.attrs.backend_data is None
    elif kind == "uvxlan":
        details = tool("ip", "-n", ns, "-d", "-4", "addr", "show", "dev", "flannel.1")
        assert "mtu 1450" in details and "tun type tap" in details
        assert f"inet {subnet.network_address}/32 " in details
        mac = app.lease.attrs.backend_data["VtepMAC"]
        assert f"link/ether {mac} " in details
        # Published as the kernel backend publishes it, so kernel hosts route to this one.
        assert app.lease.attrs.backend_type == "vxlan"
        neigh = tool("ip", "-n", ns, "neigh", "show", "dev", "flannel.1")
        assert neigh.count("PERMANENT") == 2


def test_uvxlan_and_kernel_vxlan_hosts_interoperate(etcd_url: str, prefix: str,
                                                     tmp_path: Path) -> None:
    """A vxlan network where host 1 runs VXLAN in userspace, host 2 the kernel's: both ways, no
    checksum trick on the veths (a kernel sender's partial checksums and whole TSO frames are
    the userspace side's to handle)."""
    data = os.urandom(20 * MB)
    want = hashlib.sha256(data).hexdigest()

    async def body(hosts: tuple[str, ...]) -> None:
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", config("vxlan"))
            apps = [daemon(hosts[0], etcd_url, prefix, tmp_path, vxlan_userspace=True),
                    daemon(hosts[1], etcd_url, prefix, tmp_path)]
            tasks = [await start(app) for app in apps]
            try:
                user, kernel = apps
                assert "tun type tap" in tool("ip", "-n", hosts[0], "-d", "link", "show",
                                              "flannel.1")
                assert "vxlan id 1 " in tool("ip", "-n", hosts[1], "-d", "link", "show",
                                             "flannel.1")
                await until(lambda: routed(user, hosts[0], kernel.lease), what="user routes")
                await until(lambda: routed(kernel, hosts[1], user.lease), what="kernel routes")
                mac = user.lease.attrs.backend_data["VtepMAC"]
                assert f"{mac} dst {user.underlay.address} self permanent" in tool(
                    "bridge", "-n", hosts[1], "fdb", "show", "dev", "flannel.1")
                pods = [pod(app.lease.subnet) for app in apps]
                for ns, app in zip(hosts, apps, strict=True):
                    add_pod_bridge(ns, f"{pod(app.lease.subnet)}/24")
                for i in (0, 1):
                    rc, out = await ping(hosts[i], pods[1 - i])
                    assert rc == 0, out
                before = user.backend.core.counters()
                for i in (0, 1):
                    got, _ = await asyncio.to_thread(tcp_transfer, hosts[i], pods[i],
                                                     hosts[1 - i], pods[1 - i], data)
                    assert got == want
                after = user.backend.core.counters()
                d = {k: after[k] - before[k] for k in after}
                drops = {k: v for k, v in d.items() if k.startswith("drop_") and v
                         and k != "drop_multicast"}
                assert not drops
                # What the kernel sender left for the userspace side to finish.
                assert d["rx_csum_completed"] + d["rx_super_frames"] > 0
                assert d["tun_super_packets"] > 0  # and the userspace side's own TSO
            finally:
                await stop_all(apps, tasks)

    with cluster(2) as c:
        run_async(body(c.hosts), uv=True)


def test_an_expired_lease_is_withdrawn_within_2s(etcd_url: str, prefix: str,
                                                 tmp_path: Path) -> None:
    async def body(hosts: tuple[str, ...]) -> None:
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", config("vxlan"))
            apps = [daemon(hosts[0], etcd_url, prefix, tmp_path),
                    daemon(hosts[1], etcd_url, prefix, tmp_path),
                    daemon(hosts[2], etcd_url, prefix, tmp_path, subnet_ttl=2)]
            tasks = [await start(app) for app in apps]
            try:
                gone = apps[2].lease
                for app, ns in zip(apps[:2], hosts[:2], strict=True):
                    await until(lambda app=app, ns=ns: routed(app, ns, gone), what="route")
                await stop(apps[2], tasks[2])  # it keeps its lease, which now runs out
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                while True:
                    try:
                        await etcd.get(key(prefix, gone.subnet))
                    except KeyNotFoundError:
                        break
                    assert loop.time() < deadline, "the lease did not expire"
                    await asyncio.sleep(0.05)
                for app, ns in zip(apps[:2], hosts[:2], strict=True):
                    await until(lambda app=app, ns=ns: not routed(app, ns, gone), timeout=2.0,
                                what=f"withdrawal in {ns}")
            finally:
                await stop_all(apps, tasks)

    with cluster(3) as c:
        run_async(body(c.hosts), uv=True)


def test_bad_configs_and_leases_are_reported_and_skipped(etcd_url: str, prefix: str,
                                                        tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="grozd.flannel")
    bad = {
        "198.18.200.0-24": "not json",
        "198.18.201.0-24": json.dumps({"BackendType": "vxlan"}),
        "198.18.202.0-24": json.dumps({"PublicIP": "192.0.2.9", "BackendType": "vxlan",
                                       "BackendData": {"VtepMAC": "zz"}}),
        "198.18.203.0-24": json.dumps({"PublicIP": "192.0.2.9", "BackendType": "host-gw"}),
        "10.99.0.0-24": json.dumps({"PublicIP": "192.0.2.9", "BackendType": "vxlan",
                                    "BackendData": {"VtepMAC": "0a:58:00:00:00:09"}}),
        "not-a-subnet": "{}",
    }

    async def body(hosts: tuple[str, ...]) -> None:
        async with Client([etcd_url]) as etcd:
            # A config that breaks flannel's rules: reported once, waited out.
            await etcd.set(f"{prefix}/config", json.dumps({"Network": POD_NETWORK,
                                                           "SubnetLen": 40}))
            first = daemon(hosts[0], etcd_url, prefix, tmp_path)
            task = asyncio.create_task(first.run())
            tasks = [task]
            apps = [first]
            try:
                await until(lambda: bool(first.config_errors), what="the config error")
                assert "SubnetLen 40 leaves no room for host addresses" in first.config_errors[0]
                assert not first.ready.is_set() and not task.done()
                for name, value in bad.items():
                    await etcd.set(f"{prefix}/subnets/{name}", value, ttl=60)
                await etcd.set(f"{prefix}/subnets/198.18.204.0-24/x", "a directory", ttl=60)
                await etcd.set(f"{prefix}/config", config("vxlan"))
                await asyncio.wait_for(first.ready.wait(), 10)
                assert len(first.config_errors) == 1

                second = daemon(hosts[1], etcd_url, prefix, tmp_path)
                apps.append(second)
                tasks.append(await start(second))
                for app, ns in ((first, hosts[0]), (second, hosts[1])):
                    other = second if app is first else first
                    await until(lambda app=app, ns=ns, other=other: routed(app, ns, other.lease),
                                what=f"the good route in {ns}")
                    add_pod_bridge(ns, f"{pod(app.lease.subnet)}/24")
                    refused = {str(e.lease.subnet): exc for e, exc in app.event_errors}
                    assert set(refused) == {"198.18.202.0/24", "10.99.0.0/24"}
                    assert all(isinstance(exc, BackendError) for exc in refused.values())
                    assert "outside the network" in str(refused["10.99.0.0/24"])
                    routes = tool("ip", "-n", ns, "route")
                    assert "198.18.20" not in routes and "10.99." not in routes
                rc, out = await ping(hosts[0], pod(second.lease.subnet))
                assert rc == 0, out
                text = caplog.text
                for name in ("198.18.200.0-24", "198.18.201.0-24"):
                    assert f"ignoring malformed lease {prefix}/subnets/{name}" in text
                assert "ignoring lease 198.18.203.0/24 of backend type 'host-gw'" in text
            finally:
                await stop_all(apps, tasks)

    with cluster(2) as c:
        run_async(body(c.hosts), uv=True)


def iptables_nat(ns: str) -> str:
    return tool("ip", "netns", "exec", ns, "iptables", "-w", "5", "-t", "nat", "-S")


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed")
def test_ip_masq_masquerades_what_leaves_the_overlay(etcd_url: str, prefix: str,
                                                     tmp_path: Path) -> None:
    async def body(hosts: tuple[str, ...], addrs: tuple[str, ...]) -> None:
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", config("vxlan"))
            apps = [daemon(hosts[0], etcd_url, prefix, tmp_path, ip_masq=True),
                    daemon(hosts[1], etcd_url, prefix, tmp_path)]
            tasks = [await start(app) for app in apps]
            try:
                masq, plain = apps
                subnet = masq.lease.subnet
                rules = iptables_nat(hosts[0])
                comment = '-m comment --comment "flanneld masq"'
                for rule in (
                    f"-A POSTROUTING {comment} -j {CHAIN}",
                    f"-A {CHAIN} -s {POD_NETWORK} -d {POD_NETWORK} {comment} -j RETURN",
                    f"-A {CHAIN} ! -s {POD_NETWORK} -d {subnet} {comment} -j RETURN",
                    f"-A {CHAIN} -s {POD_NETWORK} ! -d 224.0.0.0/4 {comment} -j MASQUERADE",
                    f"-A {CHAIN} ! -s {POD_NETWORK} -d {POD_NETWORK} {comment} -j MASQUERADE",
                ):
                    assert rule in rules, rules
                assert CHAIN not in iptables_nat(hosts[1])
                assert "FLANNEL_IPMASQ=true" in (tmp_path / f"{hosts[0]}.env").read_text()

                for app, ns in zip(apps, hosts, strict=True):
                    add_pod_bridge(ns, f"{pod(app.lease.subnet)}/24")
                await until(lambda: routed(masq, hosts[0], plain.lease), what="route")
                src = pod(subnet)
                # Leaving the overlay (to the other host's own address): masqueraded.
                _, seen = await asyncio.to_thread(tcp_transfer, hosts[0], src, hosts[1],
                                                  addrs[1], b"out")
                assert seen == addrs[0]
                # Pod to pod: the pod's own address.
                _, seen = await asyncio.to_thread(tcp_transfer, hosts[0], src, hosts[1],
                                                  pod(plain.lease.subnet), b"in")
                assert seen == src
            finally:
                await stop_all(apps, tasks)
            assert CHAIN not in iptables_nat(hosts[0])  # removed on exit

    with cluster(2) as c:
        run_async(body(c.hosts, c.addrs), uv=True)
