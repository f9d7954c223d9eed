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

A burst of lease events goes through `VxlanBackend.handle_many`, which has the same effect as
`Backend.handle` on each event in turn, with the same order per peer, but sends the netlink
requests many at a time: all the neighbours of a run of peers, then their FDB entries, then
their routes (removals: routes, FDB entries, neighbours).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from grozd.flannel.backends import Backend, BackendError
from grozd.flannel.backends import log as events_log
from grozd.flannel.config import BackendConfig
from grozd.flannel.leases import EventType, Lease, LeaseEvent
from grozd.flannel.netlink import BatchResult, Netlink, NetlinkOpError, Underlay

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


def _keys(lease: Lease) -> set[Hashable]:
    """The kernel objects a lease's entries are keyed by: route, neighbour, FDB entry."""
    keys: set[Hashable] = {("route", lease.subnet), ("neigh", lease.subnet.network_address)}
    with contextlib.suppress(BackendError):
        keys.add(("fdb", vtep_mac(lease), lease.attrs.public_ip))
    return keys


@dataclass(slots=True)
class _Step:
    """One `VxlanBackend.add` or `VxlanBackend.remove` of a burst, for event ``index``."""

    index: int
    add: bool
    lease: Lease
    mac: str | None
    error: Exception | None = None


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

    # -- bursts ----------------------------------------------------------------------------

    async def handle_many(self, events: Sequence[LeaseEvent]) -> list[Exception | None]:
        """`handle` each event in turn (None or its error for each), many peers at a time.

        The events are cut into runs whose peers touch disjoint kernel objects (a second
        event for a subnet, or for the same VtepMAC and PublicIP, starts a new run); within
        a run every peer goes through the steps of `add` / `remove` in their order, each
        step sent for all of the run's peers at once, with the same rollback and the same
        bookkeeping. Errors other than netlink's and bad leases' propagate, as from `handle`.
        DirectRouting, and a subclass with FDB entries of its own, take `handle` event by
        event.
        """
        results: list[Exception | None] = [None] * len(events)
        if (self.config.direct_routing or type(self)._fdb_add is not VxlanBackend._fdb_add
                or type(self)._fdb_remove is not VxlanBackend._fdb_remove):
            for n, event in enumerate(events):
                try:
                    await self.handle(event)
                except (BackendError, NetlinkOpError, OSError, ValueError) as exc:
                    results[n] = exc
            return results
        run: list[_Step] = []
        keys: set[Hashable] = set()
        for n, event in enumerate(events):
            lease = event.lease
            mine = _keys(lease)
            old = self.programmed.get(lease.subnet)
            if old is not None:
                mine |= _keys(old)
            if mine & keys:
                await self._run_steps(run, results)
                run, keys = [], set()
                old = self.programmed.get(lease.subnet)  # as the run just left it
                if old is not None:
                    mine |= _keys(old)
            if event.type is EventType.REMOVED:
                installed = self.programmed.pop(lease.subnet, None)
                if installed is None and lease.attrs.backend_type != self.type:
                    continue
                run.append(self._step(n, False, installed or lease))
                keys |= mine
                continue
            if lease.attrs.backend_type != self.type:
                events_log.warning("ignoring lease %s of backend type %r (this network is %s)",
                                   lease.subnet, lease.attrs.backend_type, self.type)
                continue
            if old is not None and old.attrs != lease.attrs:
                del self.programmed[lease.subnet]
                # The old entries go first, in a run of their own before the new ones.
                run.append(self._step(n, False, old))
                await self._run_steps(run, results)
                run, keys = [], set()
                if results[n] is not None:
                    continue
            try:
                run.append(self._step(n, True, lease))
            except BackendError as exc:
                results[n] = exc
                continue
            keys |= _keys(lease)
        await self._run_steps(run, results)
        return results

    def _step(self, index: int, add: bool, lease: Lease) -> _Step:
        if add:
            return _Step(index, True, lease, vtep_mac(lease))
        try:
            mac: str | None = vtep_mac(lease)
        except BackendError:
            mac = None  # never installed with a bad MAC, so no FDB entry to remove
        return _Step(index, False, lease, mac)

    async def _run_steps(self, steps: list[_Step], results: list[Exception | None]) -> None:
        """Apply a run of adds and removes (of disjoint objects); record errors and leases."""
        adds = [s for s in steps if s.add]
        removes = [s for s in steps if not s.add]
        if removes:
            await self._remove_many(removes)
        if adds:
            await self._add_many(adds)
        for step in steps:
            if step.error is not None:
                results[step.index] = step.error
            elif step.add:
                self.programmed[step.lease.subnet] = step.lease

    async def _add_many(self, steps: list[_Step]) -> None:
        """`add` for each step: neighbours, then FDB entries, then routes; a peer whose step
        fails has what it got so far removed again, as `add` does."""
        dev = self.device
        for s in steps:
            log.info("adding subnet %s: PublicIP %s, VtepMAC %s", s.lease.subnet,
                     s.lease.attrs.public_ip, s.mac)
        ok = await self._each(steps, self.netlink.neigh_replace_many(
            dev, [(s.lease.subnet.network_address, s.mac or "") for s in steps]))
        fdb = [(s.mac or "", s.lease.attrs.public_ip) for s in ok]
        routed = await self._each(ok, self.netlink.fdb_append_many(dev, fdb))
        failed = [s for s in ok if s.error is not None]
        await self._undo(failed, fdb=False)
        await self._each(routed, self.netlink.replace_route_many(
            dev, [(s.lease.subnet, s.lease.subnet.network_address) for s in routed],
            onlink=True))
        await self._undo([s for s in routed if s.error is not None], fdb=True)

    async def _undo(self, steps: list[_Step], fdb: bool) -> None:
        """Roll back half-added peers: their FDB entries (when added), then neighbours."""
        if not steps:
            return
        with contextlib.suppress(NetlinkOpError, OSError):
            if fdb:
                await self.netlink.fdb_delete_many(
                    self.device, [(s.mac or "", s.lease.attrs.public_ip) for s in steps])
        with contextlib.suppress(NetlinkOpError, OSError):
            await self.netlink.neigh_delete_many(
                self.device, [s.lease.subnet.network_address for s in steps])

    async def _remove_many(self, steps: list[_Step]) -> None:
        """`remove` for each step: routes, FDB entries, neighbours, each even if another
        fails; a peer's first error is its error."""
        dev = self.device
        for s in steps:
            log.info("removing subnet %s: PublicIP %s", s.lease.subnet, s.lease.attrs.public_ip)
        await self._each(steps, self.netlink.delete_route_many(
            dev, [(s.lease.subnet, s.lease.subnet.network_address) for s in steps]),
            keep_going=True)
        with_fdb = [s for s in steps if s.mac is not None]
        await self._each(with_fdb, self.netlink.fdb_delete_many(
            dev, [(s.mac or "", s.lease.attrs.public_ip) for s in with_fdb]), keep_going=True)
        await self._each(steps, self.netlink.neigh_delete_many(
            dev, [s.lease.subnet.network_address for s in steps]), keep_going=True)

    @staticmethod
    async def _each(steps: list[_Step], aw: Any, keep_going: bool = False) -> list[_Step]:
        """Await a ``*_many`` call made for ``steps``; record each one's first error and
        return the steps that succeeded (all of them with ``keep_going``)."""
        if not steps:
            aw.close()  # nothing to send: the call was never started
            return []
        answers: list[BatchResult | OSError]
        try:
            answers = list(await aw)
        except OSError as exc:  # NetlinkOpError included: the answer for all of them
            answers = [exc] * len(steps)
        ok = []
        for step, answer in zip(steps, answers, strict=True):
            if isinstance(answer, Exception):
                if step.error is None:
                    step.error = answer
                if not keep_going:
                    continue
            ok.append(step)
        return ok

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
