"""Subnet leases in the store, as flannel keeps them with etcd's v2 API.

A host leases one subnet of the network by creating ``<prefix>/subnets/10.5.34.0-24``
(prevExist=false, so two hosts never get the same subnet) with a TTL of 24 hours and
the JSON flannel writes::

    {"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:..."}}

It renews the lease before it expires; a key without TTL is a reservation (never
expires, never renewed). Other hosts watch ``<prefix>/subnets`` to route to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from ipaddress import AddressValueError, IPv4Address, IPv4Network
from typing import Any

from grozd.client import (
    Client,
    EtcdError,
    EtcdUnavailable,
    KeyNotFoundError,
    Node,
    NodeExistError,
    Response,
    TestFailedError,
)
from grozd.flannel.config import DEFAULT_PREFIX, NetworkConfig

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600
#: flannel's --subnet-lease-renew-margin default: renew an hour before expiry.
RENEW_MARGIN = 3600
#: How often a failed renewal is retried (flannel: every minute).
RENEW_RETRY = 60.0
#: Attempts of one acquisition lost to other hosts' concurrent writes (flannel: 10).
RACE_RETRIES = 10

_KEY_RE = re.compile(r"^(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})-(\d{1,2})$")
_REMOVALS = frozenset({"delete", "expire", "compareAndDelete"})
_WRITES = frozenset({"set", "create", "update", "compareAndSwap"})


class LeaseError(Exception):
    """No lease could be acquired (out of subnets, endless contention)."""


class LeaseLostError(LeaseError):
    """The host's lease was taken over by another host and cannot be renewed."""


def subnet_key_name(subnet: IPv4Network) -> str:
    """The key name of a subnet: ``10.5.34.0-24``."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(name: str) -> IPv4Network | None:
    """The subnet named by a key (``10.5.34.0-24``), or None for any other name."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a lease tells other hosts: where to send traffic and how."""

    public_ip: IPv4Address
    backend_type: str
    backend_data: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Compact JSON in flannel's field order (Go marshals struct fields in order)."""
        data: dict[str, Any] = {"PublicIP": str(self.public_ip)}
        if self.backend_type:
            data["BackendType"] = self.backend_type
        if self.backend_data is not None:
            data["BackendData"] = self.backend_data
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LeaseAttrs:
        """Parse a lease value; raises ValueError when it is not flannel's JSON."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("PublicIP"), str):
            raise ValueError("lease value has no PublicIP")
        try:
            public_ip = IPv4Address(data["PublicIP"])
        except AddressValueError as exc:
            raise ValueError(f"bad PublicIP: {exc}") from None
        backend_data = data.get("BackendData")
        if backend_data is not None and not isinstance(backend_data, dict):
            raise ValueError("BackendData is not an object")
        return cls(public_ip, str(data.get("BackendType") or ""), backend_data)


@dataclass(frozen=True, slots=True)
class Lease:
    """A subnet lease as read from (or written to) the store.

    ``value`` is the exact stored text, which renewals compare against; ``ttl`` is None
    for a reservation.
    """

    subnet: IPv4Network
    attrs: LeaseAttrs
    value: str
    modified_index: int = 0
    ttl: int | None = None
    expiration: datetime | None = field(default=None, compare=False)

    @property
    def key_name(self) -> str:
        """``10.5.34.0-24``."""
        return subnet_key_name(self.subnet)

    @classmethod
    def from_node(cls, node: Node) -> Lease | None:
        """The lease stored in ``node``; None (and a warning) when it is not one."""
        subnet = parse_subnet_key(node.name)
        if subnet is None or node.dir or node.value is None:
            return None
        try:
            attrs = LeaseAttrs.from_json(node.value)
        except ValueError as exc:
            log.warning("ignoring malformed lease %s: %s", node.key, exc)
            return None
        return cls(subnet, attrs, node.value, node.modified_index, node.ttl, node.expiration)


class EventType(StrEnum):
    """What happened to another host's lease."""

    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """One change to route: a lease appeared (or changed) or went away."""

    type: EventType
    lease: Lease


class LeaseManager:
    """Acquires, renews and watches the subnet leases of one network.

    ``ttl`` and ``renew_margin`` are in seconds (flannel: 24 h and 1 h); ``rng`` picks
    free subnets (tests pass a seeded one).
    """

    def __init__(
        self,
        client: Client,
        config: NetworkConfig,
        prefix: str = DEFAULT_PREFIX,
        *,
        ttl: int = SUBNET_TTL,
        renew_margin: float = RENEW_MARGIN,
        renew_retry: float = RENEW_RETRY,
        rng: random.Random | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        self.client = client
        self.config = config
        self.prefix = "/" + prefix.strip("/")
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.renew_retry = renew_retry
        self._rng = rng or random.SystemRandom()

    @property
    def subnets_dir(self) -> str:
        """``<prefix>/subnets``."""
        return f"{self.prefix.rstrip('/')}/subnets"

    def key(self, subnet: IPv4Network) -> str:
        """The key of a subnet's lease."""
        return f"{self.subnets_dir}/{subnet_key_name(subnet)}"

    # -- reading ---------------------------------------------------------------------------

    async def leases(self) -> tuple[list[Lease], int | None]:
        """Every lease in the store, and the etcd index the listing is valid at."""
        try:
            resp = await self.client.get(self.subnets_dir, recursive=True)
        except KeyNotFoundError as exc:
            return [], exc.index
        return _leases_in(resp.node), resp.etcd_index

    async def get(self, subnet: IPv4Network) -> Lease | None:
        """One lease, or None when its key does not exist."""
        try:
            resp = await self.client.get(self.key(subnet))
        except KeyNotFoundError:
            return None
        return Lease.from_node(resp.node) if resp.node is not None else None

    # -- acquiring -------------------------------------------------------------------------

    async def acquire(self, attrs: LeaseAttrs, previous: IPv4Network | None = None) -> Lease:
        """Lease a subnet for this host, preferring the one it had.

        In flannel's order: a lease already holding this host's PublicIP is taken over
        (a restart before expiry); else ``previous`` (from subnet.env) if it is free and
        fits the config; else a random free subnet in [SubnetMin, SubnetMax].
        """
        for attempt in range(RACE_RETRIES):
            lease = await self._try_acquire(attrs, previous)
            if lease is not None:
                return lease
            log.info("lost a race for a subnet (attempt %d); trying again", attempt + 1)
        raise LeaseError(f"no subnet lease after {RACE_RETRIES} attempts: too much contention")

    async def _try_acquire(
        self, attrs: LeaseAttrs, previous: IPv4Network | None
    ) -> Lease | None:
        leases, _ = await self.leases()
        value = attrs.to_json()

        mine = next((x for x in leases if x.attrs.public_ip == attrs.public_ip), None)
        if mine is not None:
            if self.config.is_compatible(mine.subnet):
                log.info("found lease %s for this host's IP %s; reusing it", mine.subnet,
                         attrs.public_ip)
                # A reservation (no TTL) stays one. prev_index: a host that changed the key
                # since the listing wins, and this attempt starts over.
                ttl = None if mine.ttl is None else self.ttl
                try:
                    resp = await self.client.set(
                        self.key(mine.subnet), value, ttl=ttl, prev_index=mine.modified_index
                    )
                except (TestFailedError, KeyNotFoundError):
                    return None
                return self._lease(mine.subnet, attrs, resp)
            log.info("lease %s for this host's IP no longer fits the config; deleting it",
                     mine.subnet)
            try:
                await self.client.compare_and_delete(
                    self.key(mine.subnet), prev_index=mine.modified_index
                )
            except (TestFailedError, KeyNotFoundError):
                pass
            leases = [x for x in leases if x is not mine]

        subnet: IPv4Network | None = None
        if previous is not None:
            if not self.config.is_compatible(previous):
                log.warning("previous subnet %s does not fit the network config; ignoring it",
                            previous)
            elif any(x.subnet.overlaps(previous) for x in leases):
                log.warning("previous subnet %s is leased by another host", previous)
            else:
                subnet = previous
        if subnet is None:
            subnet = self._pick_free(leases)
        try:
            resp = await self.client.create(self.key(subnet), value, ttl=self.ttl)
        except NodeExistError:
            return None
        log.info("acquired lease %s for %s", subnet, attrs.public_ip)
        return self._lease(subnet, attrs, resp)

    def _pick_free(self, leases: Iterable[Lease]) -> IPv4Network:
        """A random subnet of the range that no lease overlaps."""
        cfg = self.config
        count = cfg.subnet_count
        taken: set[int] = set()
        for lease in leases:
            taken.update(_slots_overlapping(cfg, lease.subnet))
        free = count - len(taken)
        if free <= 0:
            raise LeaseError(
                f"out of subnets: all {count} subnets /{cfg.subnet_len} from {cfg.subnet_min}"
                f" to {cfg.subnet_max} are leased"
            )
        if count <= 1 << 16:
            return cfg.subnet_at(self._rng.choice([i for i in range(count) if i not in taken]))
        # Too many slots to list: probe at random, then walk from a random point (only a
        # nearly full huge range gets that far).
        for _ in range(64):
            i = self._rng.randrange(count)
            if i not in taken:
                return cfg.subnet_at(i)
        start = self._rng.randrange(count)
        return cfg.subnet_at(next(
            (start + step) % count for step in range(count) if (start + step) % count not in taken
        ))

    # -- renewing --------------------------------------------------------------------------

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease by ``ttl`` (compare-and-swap on the value it holds).

        If it expired meanwhile (a long store outage) and no one took the subnet, it is
        created again; if another host holds it now, raises `LeaseLostError`.
        """
        key = self.key(lease.subnet)
        value = lease.attrs.to_json()
        try:
            resp = await self.client.compare_and_swap(
                key, value, prev_value=lease.value, ttl=self.ttl
            )
            return self._lease(lease.subnet, lease.attrs, resp)
        except KeyNotFoundError:
            pass
        except TestFailedError:
            # Changed under us: still ours if it still names this host's IP.
            current = await self.get(lease.subnet)
            if current is not None:
                if current.attrs.public_ip != lease.attrs.public_ip:
                    raise LeaseLostError(
                        f"lease {lease.subnet} now belongs to {current.attrs.public_ip}"
                    ) from None
                try:
                    resp = await self.client.compare_and_swap(
                        key, value, prev_index=current.modified_index, ttl=self.ttl
                    )
                except (TestFailedError, KeyNotFoundError):
                    raise LeaseLostError(f"lease {lease.subnet} keeps changing") from None
                return self._lease(lease.subnet, lease.attrs, resp)
        log.warning("lease %s expired; taking it again", lease.subnet)
        try:
            resp = await self.client.create(key, value, ttl=self.ttl)
        except NodeExistError:
            current = await self.get(lease.subnet)
            holder = current.attrs.public_ip if current is not None else "another host"
            raise LeaseLostError(
                f"lease {lease.subnet} expired and was taken by {holder}"
            ) from None
        return self._lease(lease.subnet, lease.attrs, resp)

    async def keep_alive(
        self, lease: Lease, on_renew: Callable[[Lease], None] | None = None
    ) -> None:
        """Renew ``lease`` ``renew_margin`` seconds before each expiry, forever.

        Store outages are retried every ``renew_retry`` seconds; returns only by
        cancellation or `LeaseLostError`.
        """
        if lease.ttl is None:
            await asyncio.Event().wait()  # a reservation never expires
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self._renew_after(lease)
        while True:
            await asyncio.sleep(max(0.0, renew_at - loop.time()))
            try:
                lease = await self.renew(lease)
            except (EtcdUnavailable, EtcdError) as exc:
                log.error("renewing lease %s failed (retrying in %gs): %s", lease.subnet,
                          self.renew_retry, exc)
                renew_at = loop.time() + self.renew_retry
                continue
            log.info("renewed lease %s for %ss", lease.subnet, lease.ttl)
            renew_at = loop.time() + self._renew_after(lease)
            if on_renew is not None:
                on_renew(lease)

    def _renew_after(self, lease: Lease) -> float:
        ttl = float(lease.ttl or self.ttl)
        after = ttl - self.renew_margin
        # A margin as long as the TTL (short test TTLs) would renew in a busy loop.
        return after if after > 0 else ttl / 2

    async def release(self, lease: Lease) -> None:
        """Delete the lease if it still holds what this host wrote (flannel keeps it on exit)."""
        try:
            await self.client.compare_and_delete(self.key(lease.subnet), prev_value=lease.value)
        except (KeyNotFoundError, TestFailedError):
            pass

    def _lease(self, subnet: IPv4Network, attrs: LeaseAttrs, resp: Response) -> Lease:
        node = resp.node
        assert node is not None
        return Lease(
            subnet,
            attrs,
            node.value if node.value is not None else attrs.to_json(),
            node.modified_index,
            node.ttl,
            node.expiration,
        )

    # -- watching --------------------------------------------------------------------------

    async def watch_leases(
        self, exclude: IPv4Network | None = None, *, retry: float = 1.0
    ) -> AsyncIterator[LeaseEvent]:
        """Yield an ADDED event per existing lease, then one per change, forever.

        ``exclude`` (the host's own subnet) is never reported. A lease whose attributes
        change is reported REMOVED (old) then ADDED (new); a renewal is not reported.
        When the store is unreachable the last known state stands (nothing is removed
        for an outage); once it answers again the listing is re-read, the differences
        reported, and watching resumes.
        """
        known: dict[IPv4Network, Lease] = {}
        failures = 0
        while True:
            try:
                leases, index = await self.leases()
                for event in _diff(known, {x.subnet: x for x in leases if x.subnet != exclude}):
                    yield event
                failures = 0
                start = index + 1 if index is not None else None
                async for resp in self.client.watch_iter(
                    self.subnets_dir, index=start, recursive=True, give_up_after=None
                ):
                    for event in self._apply(known, resp, exclude):
                        yield event
            except (EtcdUnavailable, EtcdError) as exc:
                failures += 1
                delay = min(retry * 2 ** (failures - 1), 30.0)
                log.warning("watching leases failed (again in %gs): %s", delay, exc)
                await asyncio.sleep(delay)

    def _apply(
        self, known: dict[IPv4Network, Lease], resp: Response, exclude: IPv4Network | None
    ) -> list[LeaseEvent]:
        """The events one watch response causes, updating ``known``."""
        if resp.action == "get":
            # watch_iter fell too far behind and re-read the directory: diff against it.
            current = {x.subnet: x for x in _leases_in(resp.node) if x.subnet != exclude}
            return _diff(known, current)
        node = resp.node
        if node is None:
            return []
        key = node.key.rstrip("/")
        if key != self.subnets_dir and not key.startswith(self.subnets_dir + "/"):
            return []
        if node.dir or key == self.subnets_dir:
            if resp.action in _REMOVALS:
                # The whole directory went (recursive delete, or a TTL on it).
                return _diff(known, {})
            return []
        subnet = parse_subnet_key(node.name)
        if subnet is None or subnet == exclude:
            return []
        old = known.get(subnet)
        if resp.action in _REMOVALS:
            if old is None:
                return []
            del known[subnet]
            return [LeaseEvent(EventType.REMOVED, old)]
        if resp.action not in _WRITES:
            return []
        new = Lease.from_node(node)
        if new is None:
            # Overwritten with garbage: whatever it routed to is no longer a valid lease.
            return _diff_one(known, subnet, None)
        return _diff_one(known, subnet, new)


def _leases_in(node: Node | None) -> list[Lease]:
    if node is None:
        return []
    out = []
    for child in node.nodes:
        lease = Lease.from_node(child)
        if lease is not None:
            out.append(lease)
    return out


def _diff_one(
    known: dict[IPv4Network, Lease], subnet: IPv4Network, new: Lease | None
) -> list[LeaseEvent]:
    old = known.get(subnet)
    if new is None:
        if old is None:
            return []
        del known[subnet]
        return [LeaseEvent(EventType.REMOVED, old)]
    known[subnet] = new
    if old is None:
        return [LeaseEvent(EventType.ADDED, new)]
    if old.attrs == new.attrs:
        return []  # a renewal: same routes
    return [LeaseEvent(EventType.REMOVED, old), LeaseEvent(EventType.ADDED, new)]


def _diff(known: dict[IPv4Network, Lease], current: dict[IPv4Network, Lease]) -> list[LeaseEvent]:
    """Events turning ``known`` into ``current`` (removals first); updates ``known``."""
    events: list[LeaseEvent] = []
    for subnet in [s for s in known if s not in current]:
        events += _diff_one(known, subnet, None)
    for subnet, lease in current.items():
        events += _diff_one(known, subnet, lease)
    return events


def _slots_overlapping(cfg: NetworkConfig, subnet: IPv4Network) -> range:
    """Indices of the range's subnets that ``subnet`` overlaps (clipped to the range)."""
    shift = 32 - cfg.subnet_len
    lo = int(subnet.network_address)
    hi = int(subnet.broadcast_address)
    first = (lo - int(cfg.subnet_min)) >> shift if lo >= int(cfg.subnet_min) else 0
    last = (hi - int(cfg.subnet_min)) >> shift if hi >= int(cfg.subnet_min) else -1
    return range(max(first, 0), min(last, cfg.subnet_count - 1) + 1)
