"""Backends against a recording netlink: what is installed, in which order, and undone."""

from __future__ import annotations

import asyncio
import errno
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from grozd.flannel.backends import BackendError, UnsupportedBackendError, make_backend
from grozd.flannel.backends.hostgw import HostGwError
from grozd.flannel.config import BackendConfig
from grozd.flannel.leases import EventType, Lease, LeaseAttrs, LeaseEvent
from grozd.flannel.netlink import Link, NetlinkOpError, RouteLookup, Underlay

UNDERLAY = Underlay("veth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
OWN_MAC = "0a:58:00:00:00:01"
PEER_MAC = "0a:58:00:00:00:02"


class FakeNetlink:
    """Records each call; ``fail`` names an operation that raises EIO."""

    def __init__(self, connected: str = "192.0.2.0/24", fail: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.connected = IPv4Network(connected)
        self.fail = fail

    def _rec(self, *call) -> None:
        self.calls.append(tuple(str(x) if not isinstance(x, (int, bool)) else x for x in call))
        if call[0] == self.fail:
            raise NetlinkOpError(errno.EIO, f"{call[0]} failed")

    async def ensure_vxlan(self, name, vni, port, local_ip, dev, mtu):
        self._rec("ensure_vxlan", name, vni, port, local_ip, dev, mtu)
        return Link(7, name, "vxlan", mtu, OWN_MAC, True)

    async def ensure_addr(self, name, address, *, exclusive=True):
        self._rec("ensure_addr", name, IPv4Interface(address))

    async def neigh_replace(self, dev, ip, mac):
        self._rec("neigh_replace", dev, ip, mac)

    async def neigh_delete(self, dev, ip):
        self._rec("neigh_delete", dev, ip)
        return True

    async def fdb_append(self, dev, mac, dst):
        self._rec("fdb_append", dev, mac, dst)

    async def fdb_delete(self, dev, mac, dst):
        self._rec("fdb_delete", dev, mac, dst)
        return True

    async def replace_route(self, dst, gateway, dev, onlink=False):
        self._rec("replace_route", dst, gateway, dev, onlink)

    async def delete_route(self, dst, gateway=None, dev=None):
        self._rec("delete_route", dst, gateway, dev)
        return True

    async def lookup_route(self, dst):
        if IPv4Address(dst) in self.connected:
            return RouteLookup(oif=UNDERLAY.index, gateway=None, local=False)
        return None


def lease(subnet: str, ip: str, mac: str | None = PEER_MAC, btype: str = "vxlan") -> Lease:
    attrs = LeaseAttrs(IPv4Address(ip), btype, {"VtepMAC": mac} if mac else None)
    return Lease(IPv4Network(subnet), attrs, attrs.to_json())


def added(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventType.ADDED, x)


def removed(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventType.REMOVED, x)


def vxlan(nl: FakeNetlink, **cfg):
    return make_backend(BackendConfig("vxlan", **cfg), nl, UNDERLAY)


def hostgw(nl: FakeNetlink):
    return make_backend(BackendConfig("host-gw", port=None), nl, UNDERLAY)


PEER = lease("10.5.7.0/24", "192.0.2.2")
ADD_PEER = [
    ("neigh_replace", "flannel.1", "10.5.7.0", PEER_MAC),
    ("fdb_append", "flannel.1", PEER_MAC, "192.0.2.2"),
    ("replace_route", "10.5.7.0/24", "10.5.7.0", "flannel.1", True),
]
REMOVE_PEER = [
    ("delete_route", "10.5.7.0/24", "10.5.7.0", "flannel.1"),
    ("fdb_delete", "flannel.1", PEER_MAC, "192.0.2.2"),
    ("neigh_delete", "flannel.1", "10.5.7.0"),
]


def test_vxlan_setup_publishes_the_vtep_mac():
    nl = FakeNetlink()
    b = vxlan(nl, vni=7, port=4789)
    data = asyncio.run(b.setup())
    asyncio.run(b.configure(lease("10.5.3.0/24", "192.0.2.1")))
    assert data == {"VtepMAC": OWN_MAC} and b.mtu == 1450
    assert nl.calls == [
        ("ensure_vxlan", "flannel.7", 7, 4789, "192.0.2.1", "veth0", 1450),
        ("ensure_addr", "flannel.7", "10.5.3.0/32"),
    ]


def test_vxlan_adds_neighbour_fdb_route_and_removes_in_reverse():
    nl = FakeNetlink()
    b = vxlan(nl)
    asyncio.run(b.handle(added(PEER)))
    assert nl.calls == ADD_PEER and PEER.subnet in b.programmed
    nl.calls.clear()
    asyncio.run(b.handle(removed(PEER)))
    assert nl.calls == REMOVE_PEER and not b.programmed


def test_vxlan_changed_lease_is_replaced_old_first():
    nl = FakeNetlink()
    b = vxlan(nl)
    asyncio.run(b.handle(added(PEER)))
    moved = lease("10.5.7.0/24", "192.0.2.3", "0a:58:00:00:00:03")
    nl.calls.clear()
    asyncio.run(b.handle(added(moved)))
    assert nl.calls == REMOVE_PEER + [
        ("neigh_replace", "flannel.1", "10.5.7.0", "0a:58:00:00:00:03"),
        ("fdb_append", "flannel.1", "0a:58:00:00:00:03", "192.0.2.3"),
        ("replace_route", "10.5.7.0/24", "10.5.7.0", "flannel.1", True),
    ]
    nl.calls.clear()
    asyncio.run(b.handle(added(moved)))  # the same again (a resync): simply reapplied
    assert [c[0] for c in nl.calls] == ["neigh_replace", "fdb_append", "replace_route"]


@pytest.mark.parametrize(
    ("fail", "undo"),
    [
        ("fdb_append", [("neigh_delete", "flannel.1", "10.5.7.0")]),
        ("replace_route", [("fdb_delete", "flannel.1", PEER_MAC, "192.0.2.2"),
                           ("neigh_delete", "flannel.1", "10.5.7.0")]),
    ],
)
def test_vxlan_rolls_back_a_half_added_lease(fail, undo):
    nl = FakeNetlink(fail=fail)
    b = vxlan(nl)
    with pytest.raises(NetlinkOpError, match=f"{fail} failed"):
        asyncio.run(b.handle(added(PEER)))
    done = ADD_PEER[: [c[0] for c in ADD_PEER].index(fail) + 1]
    assert nl.calls == done + undo and not b.programmed


def test_vxlan_removal_goes_on_after_a_failure():
    nl = FakeNetlink(fail="delete_route")
    b = vxlan(nl)
    with pytest.raises(NetlinkOpError):
        asyncio.run(b.handle(removed(PEER)))
    assert nl.calls == REMOVE_PEER


def test_vxlan_refuses_bad_vtep_mac_and_ignores_other_backends():
    nl = FakeNetlink()
    b = vxlan(nl)
    with pytest.raises(BackendError) as exc:
        asyncio.run(b.handle(added(lease("10.5.8.0/24", "192.0.2.3", mac="nope"))))
    assert str(exc.value) == "lease 10.5.8.0/24 has no valid BackendData.VtepMAC: 'nope'"
    asyncio.run(b.handle(added(lease("10.5.9.0/24", "192.0.2.4", btype="host-gw"))))
    assert nl.calls == [] and not b.programmed


def test_vxlan_direct_routing_for_peers_on_the_same_subnet():
    nl = FakeNetlink()
    b = vxlan(nl, direct_routing=True)
    far = lease("10.5.8.0/24", "198.51.100.7")
    asyncio.run(b.handle(added(PEER)))
    asyncio.run(b.handle(added(far)))
    asyncio.run(b.handle(removed(PEER)))
    assert nl.calls == [
        ("replace_route", "10.5.7.0/24", "192.0.2.2", "veth0", False),
        ("neigh_replace", "flannel.1", "10.5.8.0", PEER_MAC),
        ("fdb_append", "flannel.1", PEER_MAC, "198.51.100.7"),
        ("replace_route", "10.5.8.0/24", "10.5.8.0", "flannel.1", True),
        ("delete_route", "10.5.7.0/24", "192.0.2.2", "veth0"),
    ]


def test_hostgw_routes_via_the_peer():
    nl = FakeNetlink()
    b = hostgw(nl)
    hg = lease("10.5.7.0/24", "192.0.2.2", mac=None, btype="host-gw")
    assert asyncio.run(b.setup()) is None and b.mtu == 1500
    asyncio.run(b.handle(added(hg)))
    asyncio.run(b.handle(removed(hg)))
    assert nl.calls == [
        ("replace_route", "10.5.7.0/24", "192.0.2.2", "veth0", False),
        ("delete_route", "10.5.7.0/24", "192.0.2.2", "veth0"),
    ]


def test_hostgw_refuses_a_peer_that_is_not_directly_connected():
    nl = FakeNetlink()
    b = hostgw(nl)
    with pytest.raises(HostGwError) as exc:
        asyncio.run(b.handle(added(lease("10.5.8.0/24", "198.51.100.7", None, "host-gw"))))
    assert str(exc.value) == (
        "host-gw: peer 198.51.100.7 (lease 10.5.8.0/24) is not on a subnet directly connected"
        " to veth0; host-gw needs the hosts on one layer-2 network (use vxlan across routers)"
    )
    assert nl.calls == [] and not b.programmed


def test_make_backend_knows_every_type_and_names_them_for_an_unknown_one():
    from grozd.flannel.backends.udp import UdpDaemonBackend
    from grozd.flannel.backends.uvxlan import UvxlanBackend
    from grozd.flannel.backends.vxlan import VxlanBackend

    nl = FakeNetlink()
    assert type(make_backend(BackendConfig("udp", port=8285), nl, UNDERLAY)) is UdpDaemonBackend
    assert type(make_backend(BackendConfig("uvxlan"), nl, UNDERLAY)) is UvxlanBackend
    assert type(make_backend(BackendConfig("vxlan"), nl, UNDERLAY)) is VxlanBackend
    # A vxlan network whose data path runs in userspace on this host.
    uv = make_backend(BackendConfig("vxlan"), nl, UNDERLAY, userspace_vxlan=True)
    assert type(uv) is UvxlanBackend and uv.type == "vxlan" and uv.mtu == 1450
    assert make_backend(BackendConfig("udp", port=8285), nl, UNDERLAY).mtu == 1472
    with pytest.raises(UnsupportedBackendError) as exc:
        make_backend(BackendConfig("ipip"), nl, UNDERLAY)
    assert str(exc.value) == "grozd has no ipip backend; use one of vxlan, host-gw, udp, uvxlan"


class FakeVtep:
    """Stands in for the userspace VTEP: records its FDB changes into the netlink's log."""

    def __init__(self, nl: FakeNetlink) -> None:
        self.nl = nl

    def set_peer(self, subnet, mac, public_ip):
        self.nl.calls.append(("vtep_set_peer", str(subnet), mac, public_ip))

    def remove_peer(self, subnet):
        self.nl.calls.append(("vtep_remove_peer", str(subnet)))


def test_uvxlan_programs_like_the_kernel_backend_with_the_fdb_in_userspace():
    nl = FakeNetlink()
    b = make_backend(BackendConfig("uvxlan"), nl, UNDERLAY)
    b.core = FakeVtep(nl)
    asyncio.run(b.handle(added(PEER)))
    asyncio.run(b.handle(removed(PEER)))
    assert nl.calls == [
        ("neigh_replace", "flannel.1", "10.5.7.0", PEER_MAC),
        ("vtep_set_peer", "10.5.7.0/24", PEER_MAC, "192.0.2.2"),
        ("replace_route", "10.5.7.0/24", "10.5.7.0", "flannel.1", True),
        ("delete_route", "10.5.7.0/24", "10.5.7.0", "flannel.1"),
        ("vtep_remove_peer", "10.5.7.0/24"),
        ("neigh_delete", "flannel.1", "10.5.7.0"),
    ]


def test_uvxlan_vtep_mac_is_stable_and_local():
    from grozd.flannel.backends.uvxlan import stable_mac

    mac = stable_mac(1, "192.0.2.1")
    assert mac == stable_mac(1, "192.0.2.1") != stable_mac(1, "192.0.2.2")
    assert stable_mac(1, "192.0.2.2") != stable_mac(2, "192.0.2.2")
    first = int(mac.split(":")[0], 16)
    assert first & 2 and not first & 1  # locally administered unicast


def test_removal_of_an_ignored_lease_touches_nothing():
    nl = FakeNetlink()
    b = vxlan(nl)
    other = lease("10.5.9.0/24", "192.0.2.4", btype="host-gw")
    asyncio.run(b.handle(added(other)))
    asyncio.run(b.handle(removed(other)))
    assert nl.calls == []
    # A lease of our type this run never installed may be a previous run's: removed anyway.
    asyncio.run(b.handle(removed(PEER)))
    assert nl.calls == REMOVE_PEER
