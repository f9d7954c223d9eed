"""flanneld: network config -> lease -> backend -> watch loop, until stopped.

Startup follows flannel: find the underlay interface, wait for ``<prefix>/config``,
prepare the backend (whose data goes into the lease), acquire a lease (preferring the
subnet of the previous run), configure the host for it and write subnet.env. Then it
renews the lease and programs the backend for every other host's lease as they come and
go. `Flanneld.stop` (SIGTERM) ends it cleanly and keeps the lease, as flannel does, so a
restarted daemon gets the same subnet and containers keep their addresses; with ``ip_masq`` its
masquerading rules are removed on the way out, and a userspace data path (udp, uvxlan) stops.

Bad data in the store costs only itself: a malformed network config is reported and waited out
(as flannel retries it), a malformed lease, or one outside the network, is reported and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from grozd.client import Client, EtcdError, EtcdUnavailable, KeyNotFoundError
from grozd.flannel.backends import Backend, BackendError, make_backend
from grozd.flannel.config import DEFAULT_PREFIX, ConfigError, NetworkConfig, parse_config
from grozd.flannel.ipmasq import IpMasq, IpMasqError
from grozd.flannel.leases import (
    RENEW_MARGIN,
    RENEW_RETRY,
    SUBNET_TTL,
    EventType,
    Lease,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseLostError,
    LeaseManager,
)
from grozd.flannel.netlink import Netlink, NetlinkOpError, Underlay
from grozd.flannel.subnetenv import (
    DEFAULT_SUBNET_FILE,
    SubnetEnv,
    previous_subnet,
    write_subnet_env,
)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINTS = ("http://127.0.0.1:2379",)


class FlanneldError(Exception):
    """The daemon cannot go on (bad config, no underlay, lease lost...)."""


@dataclass
class FlanneldConfig:
    """The daemon's settings (flannel's flags; ``netns`` and ``vxlan_userspace`` are grozd's).

    ``netns`` makes the daemon program a named network namespace instead of its own,
    while it still reaches the store from where it runs. ``vxlan_userspace`` runs a vxlan
    network's data path in userspace on this host (the ``uvxlan`` backend; wire-compatible).
    """

    etcd_endpoints: list[str] = field(default_factory=lambda: list(DEFAULT_ENDPOINTS))
    etcd_prefix: str = DEFAULT_PREFIX
    iface: list[str] = field(default_factory=list)
    public_ip: str | None = None
    subnet_file: Path = DEFAULT_SUBNET_FILE
    ip_masq: bool = False
    netns: str | None = None
    vxlan_userspace: bool = False
    subnet_ttl: int = SUBNET_TTL
    renew_margin: float = RENEW_MARGIN
    renew_retry: float = RENEW_RETRY
    etcd_timeout: float = 5.0
    retry: float = 1.0
    healthz: tuple[str, int] | None = None  # where /healthz and /metrics are served, if at all


class Flanneld:
    """One flannel daemon; `run` it, `stop` it.

    After `ready` is set, ``lease``, ``network``, ``underlay`` and ``backend`` describe
    the running state; ``event_errors`` keeps the last lease events that failed, and
    ``config_errors`` the invalid network configs seen while waiting for a valid one.
    """

    def __init__(self, config: FlanneldConfig) -> None:
        self.config = config
        self.ready = asyncio.Event()
        self.lease: Lease | None = None
        self.network: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.backend: Backend | None = None
        self.event_errors: deque[tuple[LeaseEvent, Exception]] = deque(maxlen=100)
        self.config_errors: deque[str] = deque(maxlen=100)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask `run` to return (safe from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until `stop`; raises `FlanneldError` when the daemon cannot go on."""
        main = asyncio.create_task(self._run(), name="flanneld")
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not main.done():
                main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
        if self._stop.is_set():
            log.info("stopped%s", f"; lease {self.lease.subnet} kept" if self.lease else "")

    async def _run(self) -> None:
        cfg = self.config
        netlink = Netlink(cfg.netns)
        try:
            await netlink.open()
        except FileNotFoundError as exc:
            await netlink.close()
            raise FlanneldError(f"network namespace {cfg.netns!r} not found: {exc}") from exc
        try:
            self.underlay = await self._find_underlay(netlink)
            async with Client(cfg.etcd_endpoints, timeout=cfg.etcd_timeout) as etcd:
                await self._serve(netlink, etcd, self.underlay)
        except (ConfigError, LeaseLostError, BackendError, IpMasqError, ValueError,
                OSError) as exc:
            # OSError: netlink failures during setup, an unwritable subnet file.
            raise FlanneldError(str(exc)) from exc
        finally:
            await netlink.close()

    async def _find_underlay(self, netlink: Netlink) -> Underlay:
        cfg = self.config
        if not cfg.iface:
            underlay = await netlink.find_underlay(None, cfg.public_ip)
        else:
            errors = []
            for name in cfg.iface:
                try:
                    underlay = await netlink.find_underlay(name, cfg.public_ip)
                    break
                except NetlinkOpError as exc:
                    errors.append(str(exc))
            else:
                raise FlanneldError("no usable --iface: " + "; ".join(errors))
        log.info("using interface %s (%s), public IP %s, MTU %d", underlay.name,
                 underlay.address, underlay.public_ip, underlay.mtu)
        return underlay

    async def _serve(self, netlink: Netlink, etcd: Client, underlay: Underlay) -> None:
        cfg = self.config
        network = self.network = await self._wait_for_config(etcd)
        backend = self.backend = make_backend(
            network.backend, netlink, underlay, network.network,
            userspace_vxlan=cfg.vxlan_userspace,
        )  # fmt: skip
        masq = IpMasq(cfg.netns) if cfg.ip_masq else None
        try:
            data = await backend.setup()
            manager = LeaseManager(
                etcd, network, cfg.etcd_prefix, ttl=cfg.subnet_ttl,
                renew_margin=cfg.renew_margin, renew_retry=cfg.renew_retry,
            )  # fmt: skip
            attrs = LeaseAttrs(underlay.public_ip, backend.type, data)
            lease = self.lease = await self._acquire(
                manager, attrs, previous_subnet(cfg.subnet_file)
            )
            await backend.configure(lease)
            if masq is not None:
                await masq.install(network.network, lease.subnet)
            write_subnet_env(
                cfg.subnet_file,
                SubnetEnv.for_lease(network.network, lease.subnet, backend.mtu, cfg.ip_masq),
            )
            log.info("lease %s written to %s", lease.subnet, cfg.subnet_file)
            self.ready.set()
            await self._run_tasks(manager, backend, lease, network)
        finally:
            # Also on cancellation (stop): these awaits run before the cancellation completes.
            if masq is not None:
                try:
                    await masq.remove()
                except IpMasqError as exc:
                    log.error("removing the masquerading rules failed: %s", exc)
            try:
                await backend.close()
            except (BackendError, OSError) as exc:
                log.error("stopping the %s backend failed: %s", network.backend.type, exc)

    async def _run_tasks(
        self, manager: LeaseManager, backend: Backend, lease: Lease, network: NetworkConfig
    ) -> None:
        renew = asyncio.create_task(manager.keep_alive(lease, on_renew=self._renewed))
        watch = asyncio.create_task(self._watch(manager, backend, lease.subnet, network))
        try:
            done, _ = await asyncio.wait({renew, watch}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise FlanneldError("a daemon task ended unexpectedly")
        finally:
            for task in (renew, watch):
                task.cancel()
            await asyncio.gather(renew, watch, return_exceptions=True)

    def _renewed(self, lease: Lease) -> None:
        self.lease = lease

    async def _wait_for_config(self, etcd: Client) -> NetworkConfig:
        key = f"/{self.config.etcd_prefix.strip('/')}/config"
        waiting_logged = False
        reported: str | None = None
        while True:
            try:
                resp = await etcd.get(key)
            except KeyNotFoundError:
                if not waiting_logged:
                    log.warning("waiting for the network config at %s", key)
                    waiting_logged = True
            except (EtcdUnavailable, EtcdError) as exc:
                log.warning("cannot read the network config (retrying): %s", exc)
            else:
                try:
                    if resp.node is None or resp.node.dir or resp.node.value is None:
                        raise ConfigError("a directory, not the network config")
                    network = parse_config(resp.node.value)
                except ConfigError as exc:
                    # As flannel: an operator fixes the key and every daemon goes on by itself.
                    message = f"{key}: {exc}"
                    if message != reported:
                        log.error("invalid network config (waiting for a valid one): %s",
                                  message)
                        self.config_errors.append(message)
                        reported = message
                    await asyncio.sleep(self.config.retry)
                    continue
                log.info("network %s, subnets /%d from %s to %s, backend %s", network.network,
                         network.subnet_len, network.subnet_min, network.subnet_max,
                         network.backend.type)
                return network
            await asyncio.sleep(self.config.retry)

    async def _acquire(
        self, manager: LeaseManager, attrs: LeaseAttrs, previous: IPv4Network | None
    ) -> Lease:
        failures = 0
        while True:
            try:
                return await manager.acquire(attrs, previous)
            except (LeaseError, EtcdUnavailable, EtcdError) as exc:
                # As flannel: subnets may free up and the store may come back, so retry.
                failures += 1
                delay = min(self.config.retry * 2 ** (failures - 1), 30.0)
                log.error("failed to acquire a lease (retrying in %gs): %s", delay, exc)
                await asyncio.sleep(delay)

    async def _watch(
        self, manager: LeaseManager, backend: Backend, own: IPv4Network, network: NetworkConfig
    ) -> None:
        # The watch runs ahead into a queue, so that the events that arrived while the
        # backend was busy (a burst: the initial listing, many hosts at once) are applied
        # together, in their order.
        queue: asyncio.Queue[LeaseEvent] = asyncio.Queue()

        async def pump() -> None:
            async for event in manager.watch_leases(exclude=own, retry=self.config.retry):
                queue.put_nowait(event)

        source = asyncio.create_task(pump(), name="flanneld-watch")
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, source}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                if getter.done() and not getter.cancelled():
                    burst = [getter.result()]
                elif queue.empty():
                    source.result()  # the watch failed (raises) or ended
                    return
                else:
                    burst = []
                while not queue.empty():
                    burst.append(queue.get_nowait())
                for event, exc in await apply_events(backend, burst, network.network):
                    # One bad lease must not stop routing to the others.
                    if event.lease.subnet.subnet_of(network.network):
                        log.error("%s lease %s: %s", event.type, event.lease.subnet, exc)
                    else:
                        log.error("%s", exc)
                    self.event_errors.append((event, exc))
        finally:
            source.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await source

def make_app(config: FlanneldConfig) -> Flanneld:
    """The daemon for ``config``, not yet running."""
    return Flanneld(config)



async def apply_events(
    backend: Backend, events: Sequence[LeaseEvent], network: IPv4Network | None = None
) -> list[tuple[LeaseEvent, Exception]]:
    """Apply a burst of lease events, in order; the ones that failed, with why, in order.

    A lease outside ``network`` is refused (a route for it could capture traffic that is
    not the overlay's at all); one bad lease does not stop the others. A backend with a
    ``handle_many`` gets the burst at once, others each event in turn.
    """
    failed: dict[int, Exception] = {}
    todo: list[tuple[int, LeaseEvent]] = []
    for n, event in enumerate(events):
        if network is not None and not event.lease.subnet.subnet_of(network):
            if event.type is EventType.ADDED:
                failed[n] = BackendError(f"lease {event.lease.subnet} is outside the network"
                                         f" {network}; ignored")
            continue
        todo.append((n, event))
    handle_many = getattr(backend, "handle_many", None)
    if handle_many is not None:
        answers = await handle_many([event for _, event in todo])
        for (n, _), exc in zip(todo, answers, strict=True):
            if exc is not None:
                failed[n] = exc
    else:
        for n, event in todo:
            try:
                await backend.handle(event)
            except (BackendError, NetlinkOpError, OSError, ValueError) as exc:
                failed[n] = exc
    return [(events[n], failed[n]) for n in sorted(failed)]
