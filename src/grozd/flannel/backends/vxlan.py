"""The kernel VXLAN backend.

Each host has a VXLAN device ``flannel.<VNI>`` (learning off) whose MAC, the VtepMAC,
it publishes in its lease, and which holds the host's subnet address ``<subnet>.0/32``.
For each remote lease it installs, in this order (so the route never points at an
unresolved gateway):

1. a permanent neighbour ``<subnet>.0 -> VtepMAC`` on the device,
2. the FDB entry ``VtepMAC -> PublicIP`` (where to send the encapsulated frame),
3. the route ``<subnet>/<len> via <subnet>.0 dev flannel.<VNI> onlink``;

and removes them in reverse. With DirectRouting, a peer on a directly connected subnet
gets a plain route via its PublicIP instead, as with host-gw.
"""

from __future__ import annotations

import contextlib
import logging
import re
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from grozd.flannel.backends import Backend, BackendError
from grozd.flannel.config import BackendConfig
from grozd.flannel.leases import Lease
from grozd.flannel.netlink import Netlink, NetlinkOpError, Underlay

log = logging.getLogger(__name__)

#: Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
ENCAP_OVERHEAD = 50
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def vtep_mac(lease: Lease) -> str:
    """The VtepMAC a vxlan lease publishes; `BackendError` when missing or malformed."""
    data = lease.attrs.backend_data or {}
    mac = data.get("VtepMAC")
    if not isinstance(mac, str) or not _MAC_RE.match(mac.lower()):
        raise BackendError(f"lease {lease.subnet} has no valid BackendData.VtepMAC: {mac!r}")
    return mac.lower()


class VxlanBackend(Backend):
    """Kernel VXLAN: one device, and neighbour + FDB + route per remote subnet."""

    type = "vxlan"

    def __init__(self, config: BackendConfig, netlink: Netlink, underlay: Underlay,
                 network: IPv4Network | None = None) -> None:
        super().__init__(config, netlink, underlay, network)
        self.device = f"flannel.{config.vni}"
        self.mac: str | None = None
        self._direct: set[IPv4Network] = set()

    @property
    def mtu(self) -> int:
        """The underlay's MTU less the encapsulation."""
        return self.underlay.mtu - ENCAP_OVERHEAD

    async def setup(self) -> dict[str, Any]:
        """Create (or keep) the VXLAN device; its MAC goes into the lease."""
        assert self.config.port is not None
        link = await self.netlink.ensure_vxlan(
            self.device, self.config.vni, self.config.port, self.underlay.address,
            self.underlay.name, self.mtu,
        )  # fmt: skip
        if not link.mac:
            raise BackendError(f"{self.device} has no MAC address")
        self.mac = link.mac
        log.info("VXLAN device %s (VNI %d, port %d, MTU %d) has VtepMAC %s", self.device,
                 self.config.vni, self.config.port, self.mtu, link.mac)
        return {"VtepMAC": link.mac}

    async def configure(self, lease: Lease) -> None:
        """Give the device the subnet's ``.0`` address (/32), dropping any older one."""
        await self.netlink.ensure_addr(
            self.device, IPv4Interface((lease.subnet.network_address, 32))
        )

    async def add(self, lease: Lease) -> None:
        """Install neighbour, FDB entry and route for a remote subnet (or a direct route)."""
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
        mac = vtep_mac(lease)
        if self.config.direct_routing and await self.directly_connected(public_ip):
            log.info("adding direct route to %s via %s", subnet, public_ip)
            await self.netlink.replace_route(subnet, public_ip, self.underlay.name)
            self._direct.add(subnet)
            return
        self._direct.discard(subnet)
        gateway = subnet.network_address
        log.info("adding subnet %s: PublicIP %s, VtepMAC %s", subnet, public_ip, mac)
        await self.netlink.neigh_replace(self.device, gateway, mac)
        try:
            await self._fdb_add(lease, mac)
        except BaseException:
            await self._quietly(self.netlink.neigh_delete(self.device, gateway))
            raise
        try:
            await self.netlink.replace_route(subnet, gateway, self.device, onlink=True)
        except BaseException:
            await self._quietly(self._fdb_remove(lease, mac))
            await self._quietly(self.netlink.neigh_delete(self.device, gateway))
            raise

    async def remove(self, lease: Lease) -> None:
        """Remove route, FDB entry and neighbour (each even if another one fails)."""
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
        if subnet in self._direct:
            self._direct.discard(subnet)
            log.info("removing direct route to %s via %s", subnet, public_ip)
            await self.netlink.delete_route(subnet, public_ip, self.underlay.name)
            return
        gateway = subnet.network_address
        log.info("removing subnet %s: PublicIP %s", subnet, public_ip)
        errors: list[BaseException] = []
        try:
            await self.netlink.delete_route(subnet, gateway, self.device)
        except NetlinkOpError as exc:
            errors.append(exc)
        try:
            mac = vtep_mac(lease)
        except BackendError:
            mac = None  # never installed with a bad MAC, so no FDB entry to remove
        if mac is not None:
            try:
                await self._fdb_remove(lease, mac)
            except NetlinkOpError as exc:
                errors.append(exc)
        try:
            await self.netlink.neigh_delete(self.device, gateway)
        except NetlinkOpError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    async def _fdb_add(self, lease: Lease, mac: str) -> None:
        """Where frames to ``mac`` go: the FDB entry ``mac -> PublicIP``."""
        await self.netlink.fdb_append(self.device, mac, lease.attrs.public_ip)

    async def _fdb_remove(self, lease: Lease, mac: str) -> None:
        await self.netlink.fdb_delete(self.device, mac, lease.attrs.public_ip)

    @staticmethod
    async def _quietly(aw: Any) -> None:
        # Rolling back after a failure: the first error is the one worth reporting.
        with contextlib.suppress(NetlinkOpError):
            await aw


__all__ = ["ENCAP_OVERHEAD", "VxlanBackend", "vtep_mac"]
