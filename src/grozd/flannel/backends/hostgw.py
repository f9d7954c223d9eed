"""The host-gw backend: plain routes, each remote subnet via its host's PublicIP.

No encapsulation, so hosts must share a layer-2 network: a peer whose PublicIP is not
on a subnet directly connected to the underlay interface is refused.
"""

from __future__ import annotations

import logging

from grozd.flannel.backends import Backend, BackendError
from grozd.flannel.leases import Lease

log = logging.getLogger(__name__)


class HostGwError(BackendError):
    """A peer is not reachable without a router, which host-gw cannot cross."""


class HostGwBackend(Backend):
    """``ip route replace <subnet> via <PublicIP> dev <underlay>`` per remote lease."""

    type = "host-gw"

    @property
    def mtu(self) -> int:
        """The underlay's own MTU: nothing is added to packets."""
        return self.underlay.mtu

    async def add(self, lease: Lease) -> None:
        """Route the subnet via the peer, if the peer is directly connected."""
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
        if not await self.directly_connected(public_ip):
            raise HostGwError(
                f"host-gw: peer {public_ip} (lease {subnet}) is not on a subnet directly"
                f" connected to {self.underlay.name}; host-gw needs the hosts on one layer-2"
                " network (use vxlan across routers)"
            )
        log.info("adding route to %s via %s", subnet, public_ip)
        await self.netlink.replace_route(subnet, public_ip, self.underlay.name)

    async def remove(self, lease: Lease) -> None:
        """Delete the route (if it is there)."""
        log.info("removing route to %s via %s", lease.subnet, lease.attrs.public_ip)
        await self.netlink.delete_route(lease.subnet, lease.attrs.public_ip, self.underlay.name)
