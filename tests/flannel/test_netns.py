"""Two "hosts" in network namespaces, leases in a real etcd, traffic between pods.

Each host is a namespace with a veth end (192.0.2.1 and 192.0.2.2); the daemon logic
runs in this process, reaches etcd on 127.0.0.1 and programs its namespace through
netlink. Everything lives inside namespaces created (and deleted) by the fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import subprocess
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from grozd.client import Client, KeyNotFoundError
from grozd.flannel.backends.hostgw import HostGwError
from grozd.flannel.daemon import Flanneld, FlanneldConfig, FlanneldError, make_app
from grozd.flannel.leases import LeaseAttrs
from grozd.flannel.netlink import Netlink, NetlinkOpError

from .conftest import run_async
from .nshelp import ADDR_A, ADDR_B, UNDERLAY, HostPair, ping_command, require_root, tool
from .proxy import Proxy

POD_NETWORK = "198.18.0.0/16"  # pods live only inside the test namespaces


async def until(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``check`` (run in a thread: it shells out) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(check):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


async def ping(ns: str, addr: str, count: int = 2, wait: int = 2) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *ping_command(ns, addr, count, wait),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def daemon(hosts_ns: str, etcd_url: str, prefix: str, tmp_path: Path, **kw) -> Flanneld:
    return make_app(FlanneldConfig(
        etcd_endpoints=[etcd_url], etcd_prefix=prefix, iface=[UNDERLAY],
        subnet_file=tmp_path / f"{hosts_ns}.env", netns=hosts_ns, retry=0.1, **kw,
    ))  # fmt: skip


async def start(app: Flanneld) -> asyncio.Task[None]:
    task = asyncio.create_task(app.run())
    ready = asyncio.create_task(app.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed: show why
    assert app.ready.is_set(), "daemon did not become ready"
    return task


async def stop(app: Flanneld, task: asyncio.Task[None]) -> None:
    app.stop()
    await asyncio.wait_for(task, 10)


def pod(subnet: IPv4Network) -> str:
    return str(subnet.network_address + 1)


# -- the netlink layer on a real kernel ------------------------------------------------------


def test_netlink_operations_are_exact_and_idempotent(hosts: HostPair):
    async def body():
        async with Netlink(hosts.a) as nl:
            u = await nl.find_underlay(UNDERLAY)
            assert (u.name, str(u.address), str(u.public_ip), u.mtu) == (
                UNDERLAY, ADDR_A, ADDR_A, 1500)
            assert (await nl.find_underlay(ADDR_A)).name == UNDERLAY
            assert str((await nl.find_underlay(UNDERLAY, "203.0.113.5")).public_ip) == (
                "203.0.113.5")
            with pytest.raises(NetlinkOpError, match="no interface named 'nope'"):
                await nl.find_underlay("nope")
            with pytest.raises(NetlinkOpError, match="no default route"):
                await nl.find_underlay()

            dev = await nl.ensure_vxlan("flannel.1", 1, 8472, ADDR_A, UNDERLAY, 1450)
            again = await nl.ensure_vxlan("flannel.1", 1, 8472, ADDR_A, UNDERLAY, 1450)
            assert again == dev and dev.kind == "vxlan" and dev.mtu == 1450 and dev.up
            details = tool("ip", "-n", hosts.a, "-d", "link", "show", "flannel.1")
            assert "vxlan id 1 " in details and "dstport 8472" in details
            assert "nolearning" in details and f"local {ADDR_A}" in details
            other = await nl.ensure_vxlan("flannel.1", 1, 4789, ADDR_A, UNDERLAY, 1450)
            assert other.index != dev.index  # a different port: recreated
            await nl.ensure_vxlan("flannel.1", 1, 8472, ADDR_A, UNDERLAY, 1450)

            await nl.ensure_addr("flannel.1", "10.5.3.0/32")
            await nl.ensure_addr("flannel.1", "10.5.3.0/32")
            assert await nl.addresses("flannel.1") == [IPv4Interface("10.5.3.0/32")]
            await nl.ensure_addr("flannel.1", "10.5.4.0/32")  # a new lease replaces the old
            assert await nl.addresses("flannel.1") == [IPv4Interface("10.5.4.0/32")]

            mac = "0a:58:00:00:00:02"
            for _ in range(2):
                await nl.neigh_replace("flannel.1", "10.5.7.0", mac)
                await nl.fdb_append("flannel.1", mac, ADDR_B)
                await nl.replace_route("10.5.7.0/24", "10.5.7.0", "flannel.1", onlink=True)
            assert tool("ip", "-n", hosts.a, "neigh", "show", "dev", "flannel.1").strip() == (
                f"10.5.7.0 lladdr {mac} PERMANENT")
            assert tool("bridge", "-n", hosts.a, "fdb", "show", "dev", "flannel.1").strip() == (
                f"{mac} dst {ADDR_B} self permanent")
            assert "10.5.7.0/24 via 10.5.7.0 dev flannel.1 proto static onlink" in tool(
                "ip", "-n", hosts.a, "route")
            assert await nl.delete_route("10.5.7.0/24", "10.5.7.0", "flannel.1") is True
            assert await nl.delete_route("10.5.7.0/24", "10.5.7.0", "flannel.1") is False
            assert await nl.fdb_delete("flannel.1", mac, ADDR_B) is True
            assert await nl.fdb_delete("flannel.1", mac, ADDR_B) is False
            assert await nl.neigh_delete("flannel.1", "10.5.7.0") is True
            assert await nl.neigh_delete("flannel.1", "10.5.7.0") is False

            peer = await nl.lookup_route(ADDR_B)
            assert peer is not None and peer.gateway is None and peer.oif == u.index
            assert (await nl.lookup_route(ADDR_A)).local
            assert await nl.lookup_route("198.51.100.7") is None
            with pytest.raises(NetlinkOpError) as exc:
                await nl.replace_route("10.5.8.0/24", "198.51.100.7", UNDERLAY)
            assert exc.value.errno == errno.ENETUNREACH
            assert str(exc.value) == (
                f"[Errno {errno.ENETUNREACH}] route 10.5.8.0/24 via 198.51.100.7 dev veth0:"
                " Network is unreachable")

    run_async(body())


def test_a_missing_namespace_is_an_error_not_created():
    require_root()
    name = f"grozd-t-{uuid.uuid4().hex[:8]}-missing"

    async def body():
        with pytest.raises(FileNotFoundError):
            await Netlink(name).open()

    try:
        run_async(body())
        assert name not in tool("ip", "netns", "list")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_opening_a_namespace_never_signals_the_daemon(hosts: HostPair):
    """pyroute2 SIGTERMs the child that opens a namespace socket: not our SIGTERM."""

    async def body():
        got = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, got.set)
        try:
            for ns in [hosts.a, hosts.b, f"grozd-t-{uuid.uuid4().hex[:8]}-missing"] * 3:
                nl = Netlink(ns)
                with contextlib.suppress(FileNotFoundError):
                    await nl.open()
                await nl.close()
            await asyncio.sleep(0.2)
            return got.is_set()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    assert run_async(body(), uv=True) is False


# -- two hosts ----------------------------------------------------------------------------


def test_vxlan_two_hosts(hosts: HostPair, etcd_url: str, prefix: str, tmp_path: Path):
    async def body():
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", json.dumps({"Network": POD_NETWORK}))
            a, b = (daemon(ns, etcd_url, prefix, tmp_path) for ns in (hosts.a, hosts.b))
            ta, tb = await start(a), await start(b)
            sa, sb = a.lease.subnet, b.lease.subnet
            mac_a, mac_b = (x.lease.attrs.backend_data["VtepMAC"] for x in (a, b))

            # Each host: neighbour, FDB entry and onlink route for the other's subnet.
            sides = ((hosts.a, sb, mac_b, ADDR_B), (hosts.b, sa, mac_a, ADDR_A))
            for ns, peer, mac, under in sides:
                route = f"{peer} via {peer.network_address} dev flannel.1 proto static onlink"
                await until(lambda ns=ns, route=route: route in tool("ip", "-n", ns, "route"),
                            what=f"route {route} in {ns}")
                assert tool("ip", "-n", ns, "neigh", "show", "dev", "flannel.1").strip() == (
                    f"{peer.network_address} lladdr {mac} PERMANENT")
                assert tool("bridge", "-n", ns, "fdb", "show", "dev", "flannel.1").strip() == (
                    f"{mac} dst {under} self permanent")
            assert tool("ip", "-n", hosts.a, "-4", "-o", "addr", "show", "dev", "flannel.1"
                        ).split()[3] == f"{sa.network_address}/32"
            assert (tmp_path / f"{hosts.a}.env").read_text() == (
                f"FLANNEL_NETWORK={POD_NETWORK}\nFLANNEL_SUBNET={pod(sa)}/24\n"
                "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")

            hosts.add_pod_bridge(hosts.a, f"{pod(sa)}/24")
            hosts.add_pod_bridge(hosts.b, f"{pod(sb)}/24")
            rc, out = await ping(hosts.a, pod(sb))
            assert rc == 0, out
            rc, out = await ping(hosts.b, pod(sa))
            assert rc == 0, out

            # SIGTERM keeps the lease; a restart gets the same subnet and VTEP back.
            await stop(b, tb)
            key_b = f"{prefix}/subnets/{sb.network_address}-24"
            assert json.loads((await etcd.get(key_b)).value)["PublicIP"] == ADDR_B
            b = daemon(hosts.b, etcd_url, prefix, tmp_path)
            tb = await start(b)
            assert b.lease.subnet == sb and b.lease.attrs.backend_data["VtepMAC"] == mac_b
            await stop(b, tb)

            # B's lease goes: A withdraws route, FDB entry and neighbour.
            await etcd.delete(key_b)
            await until(lambda: str(sb) not in tool("ip", "-n", hosts.a, "route"),
                        what="route withdrawn")
            # Withdrawal runs route, FDB entry, neighbour: the last two may land just after.
            await until(lambda: tool("ip", "-n", hosts.a, "neigh", "show", "dev",
                                     "flannel.1").strip() == "", what="neighbour withdrawn")
            await until(lambda: tool("bridge", "-n", hosts.a, "fdb", "show", "dev",
                                     "flannel.1").strip() == "", what="FDB entry withdrawn")
            rc, _ = await ping(hosts.a, pod(sb), count=1, wait=1)
            assert rc != 0
            await stop(a, ta)

    run_async(body(), uv=True)  # as the daemon runs: on uvloop, netlink in its thread


def test_hostgw_two_hosts(hosts: HostPair, etcd_url: str, prefix: str, tmp_path: Path):
    async def body():
        async with Client([etcd_url]) as etcd:
            config = {"Network": POD_NETWORK, "Backend": {"Type": "host-gw"}}
            await etcd.set(f"{prefix}/config", json.dumps(config))
            a, b = (daemon(ns, etcd_url, prefix, tmp_path) for ns in (hosts.a, hosts.b))
            ta, tb = await start(a), await start(b)
            sa, sb = a.lease.subnet, b.lease.subnet
            assert a.lease.attrs == LeaseAttrs(IPv4Address(ADDR_A), "host-gw", None)
            for ns, peer, via in ((hosts.a, sb, ADDR_B), (hosts.b, sa, ADDR_A)):
                route = f"{peer} via {via} dev {UNDERLAY} proto static"
                await until(lambda ns=ns, route=route: route in tool("ip", "-n", ns, "route"),
                            what=f"route {route} in {ns}")
            assert "FLANNEL_MTU=1500" in (tmp_path / f"{hosts.a}.env").read_text()
            assert "flannel" not in tool("ip", "-n", hosts.a, "link")  # no tunnel device

            hosts.add_pod_bridge(hosts.a, f"{pod(sa)}/24")
            hosts.add_pod_bridge(hosts.b, f"{pod(sb)}/24")
            rc, out = await ping(hosts.a, pod(sb))
            assert rc == 0, out

            # A peer behind a router cannot be reached by host-gw: refused, nothing routed.
            far = IPv4Network("198.18.250.0/24")
            await etcd.set(f"{prefix}/subnets/198.18.250.0-24",
                           json.dumps({"PublicIP": "198.51.100.7", "BackendType": "host-gw"}),
                           ttl=60)
            await until(lambda: any(e.lease.subnet == far for e, _ in a.event_errors),
                        what="the refusal")
            error = next(exc for e, exc in a.event_errors if e.lease.subnet == far)
            assert isinstance(error, HostGwError) and "198.51.100.7" in str(error)
            assert str(far) not in tool("ip", "-n", hosts.a, "route")

            await stop(b, tb)
            await etcd.delete(f"{prefix}/subnets/{sb.network_address}-24")
            await until(lambda: str(sb) not in tool("ip", "-n", hosts.a, "route"),
                        what="route withdrawn")
            await stop(a, ta)
            with pytest.raises(KeyNotFoundError):
                await etcd.get(f"{prefix}/subnets/{sb.network_address}-24")
            # A's lease outlives its daemon.
            assert (await etcd.get(f"{prefix}/subnets/{sa.network_address}-24")).value

    run_async(body())


def test_daemon_waits_for_the_store_and_its_config(hosts: HostPair, etcd_url, prefix, tmp_path):
    async def body():
        proxy = Proxy(etcd_url)
        await proxy.up()
        await proxy.down()  # the store is unreachable when the daemon starts
        app = daemon(hosts.a, proxy.url, prefix, tmp_path, etcd_timeout=0.5)
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.3)
        await proxy.up()  # reachable, but no config yet
        await asyncio.sleep(0.3)
        assert not app.ready.is_set() and not task.done()
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", json.dumps({"Network": POD_NETWORK}))
        await asyncio.wait_for(app.ready.wait(), 5)
        await stop(app, task)
        await proxy.down()
        return app.lease

    lease = run_async(body())
    assert IPv4Network(POD_NETWORK).supernet_of(lease.subnet)


def test_daemon_stops_with_an_error_when_its_lease_is_taken(hosts, etcd_url, prefix, tmp_path):
    async def body():
        async with Client([etcd_url]) as etcd:
            await etcd.set(f"{prefix}/config", json.dumps({"Network": POD_NETWORK}))
            app = daemon(hosts.a, etcd_url, prefix, tmp_path, subnet_ttl=2, renew_margin=1.5)
            task = await start(app)
            key = f"{prefix}/subnets/{app.lease.subnet.network_address}-24"
            await etcd.set(key, json.dumps({"PublicIP": "192.0.2.77", "BackendType": "vxlan"}))
            with pytest.raises(FlanneldError) as exc:
                await asyncio.wait_for(task, 5)
            return app.lease, str(exc.value)

    lease, error = run_async(body())
    assert error == f"lease {lease.subnet} now belongs to 192.0.2.77"
