"""Backends: how traffic for other hosts' subnets reaches them.

A backend prepares the host (`Backend.setup`, before the lease: its result is published
as the lease's BackendData), configures the host's own lease (`Backend.configure`) and
then programs one set of kernel entries per remote lease (`Backend.add` /
`Backend.remove`, driven by `Backend.handle`). `Backend.close` ends what runs in this process
(the userspace data paths); kernel state is left as flannel leaves it.

Backend types: ``vxlan`` (the kernel's VXLAN device), ``host-gw`` (plain routes), ``udp``
(flannel's TUN + UDP encapsulation, in userspace) and ``uvxlan`` (VXLAN in userspace over a TAP,
wire-compatible with ``vxlan``: it publishes and programs leases of BackendType ``vxlan``).
"""

from __future__ import annotations

import abc
import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any, ClassVar

from grozd.flannel.config import BackendConfig
from grozd.flannel.leases import EventType, Lease, LeaseEvent
from grozd.flannel.netlink import Netlink, Underlay

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A remote lease could not be programmed (it is skipped, the daemon goes on)."""


class UnsupportedBackendError(BackendError):
    """The config names a backend type this daemon has no data path for."""


class Backend(abc.ABC):
    """The common part of the backends: bookkeeping and event dispatch.

    ``type`` is the BackendType its leases carry and the one it programs; ``network`` is the
    whole overlay (needed by the backends that route all of it into a device).
    """

    type: ClassVar[str]

    def __init__(self, config: BackendConfig, netlink: Netlink, underlay: Underlay,
                 network: IPv4Network | None = None) -> None:
        self.config = config
        self.netlink = netlink
        self.underlay = underlay
        self.network = network
        #: Remote leases as programmed, so a removal undoes exactly what was installed.
        self.programmed: dict[IPv4Network, Lease] = {}

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """The MTU containers must use (FLANNEL_MTU)."""

    async def setup(self) -> dict[str, Any] | None:
        """Prepare the host; returns the BackendData for this host's lease."""
        return None

    async def configure(self, lease: Lease) -> None:  # noqa: B027 - optional hook
        """Configure the host for its own lease (e.g. the VTEP address)."""

    def counters(self) -> dict[str, int]:
        """Data path counters (packets, bytes, drops by reason); none for kernel backends."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop what runs in this process (the kernel's routes and devices stay)."""

    async def handle(self, event: LeaseEvent) -> None:
        """Apply one lease event (errors are `BackendError` / `NetlinkOpError`)."""
        lease = event.lease
        if event.type is EventType.REMOVED:
            installed = self.programmed.pop(lease.subnet, None)
            if installed is None and lease.attrs.backend_type != self.type:
                return  # ignored when added: nothing to undo
            # Not installed by this run but of our type: it may be a previous run's, so the
            # (idempotent) removal runs anyway.
            await self.remove(installed or lease)
            return
        if lease.attrs.backend_type != self.type:
            log.warning("ignoring lease %s of backend type %r (this network is %s)",
                        lease.subnet, lease.attrs.backend_type, self.type)
            return
        old = self.programmed.get(lease.subnet)
        if old is not None and old.attrs != lease.attrs:
            del self.programmed[lease.subnet]
            await self.remove(old)
        await self.add(lease)
        self.programmed[lease.subnet] = lease

    @abc.abstractmethod
    async def add(self, lease: Lease) -> None:
        """Make ``lease.subnet`` reachable (idempotent)."""

    @abc.abstractmethod
    async def remove(self, lease: Lease) -> None:
        """Undo `add` (idempotent: missing entries are fine)."""

    async def directly_connected(self, ip: IPv4Address) -> bool:
        """Whether ``ip`` is on a subnet directly connected to the underlay interface.

        Asks the kernel for its route to ``ip`` (one exact lookup): directly connected
        means no gateway, out of the underlay interface, and not one of our addresses.
        """
        route = await self.netlink.lookup_route(ip)
        return (
            route is not None
            and route.gateway is None
            and not route.local
            and route.oif == self.underlay.index
        )


def make_backend(
    config: BackendConfig,
    netlink: Netlink,
    underlay: Underlay,
    network: IPv4Network | None = None,
    *,
    userspace_vxlan: bool = False,
) -> Backend:
    """The backend for ``config.type``; ``userspace_vxlan`` runs a ``vxlan`` network's data path
    in userspace on this host (``uvxlan``), e.g. where the kernel has no VXLAN driver."""
    from grozd.flannel.backends.hostgw import HostGwBackend
    from grozd.flannel.backends.udp import UdpDaemonBackend
    from grozd.flannel.backends.uvxlan import UvxlanBackend
    from grozd.flannel.backends.vxlan import VxlanBackend

    kinds: dict[str, type[Backend]] = {
        "vxlan": UvxlanBackend if userspace_vxlan else VxlanBackend,
        "host-gw": HostGwBackend,
        "udp": UdpDaemonBackend,
        "uvxlan": UvxlanBackend,
    }
    cls = kinds.get(config.type)
    if cls is None:
        raise UnsupportedBackendError(
            f"grozd has no {config.type} backend; use one of {', '.join(kinds)}"
        )
    return cls(config, netlink, underlay, network)


__all__ = ["Backend", "BackendError", "UnsupportedBackendError", "make_backend"]
