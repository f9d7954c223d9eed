"""Bursts of lease events: `VxlanBackend.handle_many` and the ``*_many`` netlink calls.

``handle_many`` must leave the kernel, the backend's bookkeeping and the per-event errors
exactly as `Backend.handle` on each event in turn would, with every kernel object seeing the
same operations in the same order. Checked against a simulated kernel (with failures), and in a
real namespace, where the batched requests must create the very objects pyroute2's do.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from grozd.flannel.backends import make_backend
from grozd.flannel.backends.vxlan import VxlanBackend
from grozd.flannel.config import BackendConfig
from grozd.flannel.daemon import apply_events
from grozd.flannel.leases import EventType, Lease, LeaseAttrs, LeaseEvent
from grozd.flannel.netlink import Netlink, NetlinkOpError, Underlay

from .nshelp import tool

UNDERLAY = Underlay("veth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)


class FakeKernel:
    """A netlink with state: neighbours, FDB entries, routes; ``fail`` picks failing ops.

    Every operation is recorded under the key of the object it touches, so the order of
    operations per object can be compared; the ``*_many`` calls do their items in order.
    """

    def __init__(self, fail: set[tuple[str, str]] | None = None) -> None:
        self.fail = fail or set()
        self.neigh: dict[str, str] = {}
        self.fdb: set[tuple[str, str]] = set()
        self.routes: dict[str, str] = {}
        self.per_key: dict[str, list[str]] = defaultdict(list)

    def _op(self, op: str, key: str) -> None:
        self.per_key[key].append(op)
        if (op, key) in self.fail:
            raise NetlinkOpError(errno.EIO, f"{op} {key} failed")

    async def neigh_replace(self, dev: str, ip: Any, mac: str) -> None:
        self._op("neigh_replace", f"neigh {ip}")
        self.neigh[str(ip)] = mac

    async def neigh_delete(self, dev: str, ip: Any) -> bool:
        self._op("neigh_delete", f"neigh {ip}")
        return self.neigh.pop(str(ip), None) is not None

    async def fdb_append(self, dev: str, mac: str, dst: Any) -> None:
        self._op("fdb_append", f"fdb {mac} {dst}")
        self.fdb.add((mac, str(dst)))

    async def fdb_delete(self, dev: str, mac: str, dst: Any) -> bool:
        self._op("fdb_delete", f"fdb {mac} {dst}")
        if (mac, str(dst)) in self.fdb:
            self.fdb.discard((mac, str(dst)))
            return True
        return False

    async def replace_route(self, dst: Any, gateway: Any, dev: str, onlink: bool = False) -> None:
        assert onlink
        self._op("replace_route", f"route {dst}")
        self.routes[str(dst)] = str(gateway)

    async def delete_route(self, dst: Any, gateway: Any = None, dev: str | None = None) -> bool:
        self._op("delete_route", f"route {dst}")
        return self.routes.pop(str(dst), None) is not None

    async def _many(self, fn: Any, items: list[tuple[Any, ...]]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            try:
                out.append(await fn(*item))
            except NetlinkOpError as exc:
                out.append(exc)
        return out

    async def neigh_replace_many(self, dev: str, entries: Any) -> list[Any]:
        return await self._many(self.neigh_replace, [(dev, ip, mac) for ip, mac in entries])

    async def neigh_delete_many(self, dev: str, ips: Any) -> list[Any]:
        return await self._many(self.neigh_delete, [(dev, ip) for ip in ips])

    async def fdb_append_many(self, dev: str, entries: Any) -> list[Any]:
        return await self._many(self.fdb_append, [(dev, mac, dst) for mac, dst in entries])

    async def fdb_delete_many(self, dev: str, entries: Any) -> list[Any]:
        return await self._many(self.fdb_delete, [(dev, mac, dst) for mac, dst in entries])

    async def replace_route_many(self, dev: str, routes: Any, onlink: bool = False) -> list[Any]:
        return await self._many(self.replace_route,
                                [(dst, gw, dev, onlink) for dst, gw in routes])

    async def delete_route_many(self, dev: str, routes: Any) -> list[Any]:
        return await self._many(self.delete_route, [(dst, gw, dev) for dst, gw in routes])


def lease(subnet: str, ip: str, mac: str | None, btype: str = "vxlan") -> Lease:
    attrs = LeaseAttrs(IPv4Address(ip), btype, {"VtepMAC": mac} if mac else None)
    return Lease(IPv4Network(subnet), attrs, attrs.to_json())


def random_events(rng: random.Random, count: int) -> list[LeaseEvent]:
    """Adds, changes, re-adds, removals of few subnets, some sharing a VtepMAC + PublicIP,
    some with a bad MAC or of another backend type."""
    events = []
    for _ in range(count):
        subnet = f"10.5.{rng.randrange(6)}.0/24"
        host = rng.randrange(4)
        mac = rng.choice([f"0a:58:00:00:00:0{host}"] * 6 + ["bad"])
        btype = rng.choice(["vxlan"] * 9 + ["host-gw"])
        kind = rng.choice([EventType.ADDED, EventType.ADDED, EventType.REMOVED])
        events.append(LeaseEvent(kind, lease(subnet, f"192.0.2.{10 + host}", mac, btype)))
    return events


def outcome(kernel: FakeKernel, backend: VxlanBackend, errors: list[Any]) -> tuple[Any, ...]:
    return (dict(kernel.per_key), kernel.neigh, kernel.fdb, kernel.routes,
            dict(backend.programmed), errors)


def sequential(events: list[LeaseEvent], fail: set[tuple[str, str]]) -> tuple[Any, ...]:
    kernel = FakeKernel(fail)
    backend = make_backend(BackendConfig("vxlan"), kernel, UNDERLAY)  # type: ignore[arg-type]
    assert isinstance(backend, VxlanBackend)
    errors: list[Any] = []

    async def main() -> None:
        for event in events:
            try:
                await backend.handle(event)
            except Exception as exc:  # noqa: BLE001 - compared as text
                errors.append(str(exc))
            else:
                errors.append(None)

    asyncio.run(main())
    return outcome(kernel, backend, errors)


def batched(events: list[LeaseEvent], fail: set[tuple[str, str]],
            bursts: list[int]) -> tuple[Any, ...]:
    kernel = FakeKernel(fail)
    backend = make_backend(BackendConfig("vxlan"), kernel, UNDERLAY)  # type: ignore[arg-type]
    assert isinstance(backend, VxlanBackend)
    errors: list[Any] = []

    async def main() -> None:
        start = 0
        for size in [*bursts, len(events)]:
            chunk = events[start:start + size]
            start += len(chunk)
            errors.extend(None if e is None else str(e) for e in await backend.handle_many(chunk))

    asyncio.run(main())
    return outcome(kernel, backend, errors)


@pytest.mark.parametrize("seed", range(40))
def test_handle_many_does_what_handle_does_event_by_event(seed: int) -> None:
    rng = random.Random(seed)
    events = random_events(rng, 60)
    fail: set[tuple[str, str]] = set()
    for _ in range(rng.randrange(4)):
        op = rng.choice(["neigh_replace", "fdb_append", "replace_route", "delete_route",
                         "fdb_delete", "neigh_delete"])
        if op.endswith("route"):
            key = f"route 10.5.{rng.randrange(6)}.0/24"
        elif op.startswith("neigh"):
            key = f"neigh 10.5.{rng.randrange(6)}.0"
        else:
            host = rng.randrange(4)
            key = f"fdb 0a:58:00:00:00:0{host} 192.0.2.{10 + host}"
        fail.add((op, key))
    bursts = [rng.randrange(1, 30) for _ in range(3)]
    assert batched(events, fail, bursts) == sequential(events, fail)


def test_handle_many_orders_each_peer_and_sends_each_step_for_all_peers() -> None:
    kernel = FakeKernel()
    backend = make_backend(BackendConfig("vxlan"), kernel, UNDERLAY)  # type: ignore[arg-type]
    assert isinstance(backend, VxlanBackend)
    calls: list[tuple[str, int]] = []
    for name in ("neigh_replace_many", "fdb_append_many", "replace_route_many",
                 "delete_route_many", "fdb_delete_many", "neigh_delete_many"):
        inner = getattr(kernel, name)

        def wrap(*args: Any, _inner: Any = inner, _name: str = name, **kw: Any) -> Any:
            calls.append((_name, len(args[1])))
            return _inner(*args, **kw)

        setattr(kernel, name, wrap)
    peers = [lease(f"10.5.{i}.0/24", f"192.0.2.{10 + i}", f"0a:58:00:00:01:{i:02x}")
             for i in range(50)]
    errors = asyncio.run(backend.handle_many([LeaseEvent(EventType.ADDED, p) for p in peers]))
    assert errors == [None] * 50 and len(backend.programmed) == 50
    assert calls == [("neigh_replace_many", 50), ("fdb_append_many", 50),
                     ("replace_route_many", 50)]
    for p in peers:
        assert kernel.per_key[f"neigh {p.subnet.network_address}"] == ["neigh_replace"]
    calls.clear()
    errors = asyncio.run(backend.handle_many([LeaseEvent(EventType.REMOVED, p) for p in peers]))
    assert errors == [None] * 50 and not backend.programmed
    assert calls == [("delete_route_many", 50), ("fdb_delete_many", 50),
                     ("neigh_delete_many", 50)]
    assert not kernel.neigh and not kernel.fdb and not kernel.routes


def test_apply_events_refuses_leases_outside_the_network_in_order() -> None:
    kernel = FakeKernel({("fdb_append", "fdb 0a:58:00:00:00:01 192.0.2.11")})
    backend = make_backend(BackendConfig("vxlan"), kernel, UNDERLAY)  # type: ignore[arg-type]
    events = [
        LeaseEvent(EventType.ADDED, lease("10.99.0.0/24", "192.0.2.10", "0a:58:00:00:00:00")),
        LeaseEvent(EventType.ADDED, lease("10.5.1.0/24", "192.0.2.11", "0a:58:00:00:00:01")),
        LeaseEvent(EventType.ADDED, lease("10.5.2.0/24", "192.0.2.12", "0a:58:00:00:00:02")),
    ]
    failed = asyncio.run(apply_events(backend, events, IPv4Network("10.5.0.0/16")))
    assert [(e.lease.subnet, str(x)) for e, x in failed] == [
        (IPv4Network("10.99.0.0/24"),
         "lease 10.99.0.0/24 is outside the network 10.5.0.0/16; ignored"),
        (IPv4Network("10.5.1.0/24"),
         "[Errno 5] fdb_append fdb 0a:58:00:00:00:01 192.0.2.11 failed"),
    ]
    assert list(backend.programmed) == [IPv4Network("10.5.2.0/24")]
    assert kernel.routes == {"10.5.2.0/24": "10.5.2.0"}


# -- in a real namespace -----------------------------------------------------------------


def kernel_state(ns: str) -> list[str]:
    return [
        tool("ip", "-d", "-n", ns, "neigh", "show", "dev", "flannel.1"),
        tool("bridge", "-d", "-n", ns, "fdb", "show", "dev", "flannel.1"),
        tool("ip", "-d", "-n", ns, "route", "show", "table", "all", "dev", "flannel.1"),
    ]


def test_batched_requests_make_the_same_objects_as_single_ones(hosts: Any) -> None:
    peers = [lease(f"10.5.{i}.0/24", f"198.18.0.{i + 1}", f"0a:58:00:00:02:{i:02x}")
             for i in range(40)]

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with Netlink(hosts.a) as nl:
            underlay = await nl.find_underlay("veth0")
            backend = make_backend(BackendConfig("vxlan"), nl, underlay)
            assert isinstance(backend, VxlanBackend)
            await backend.setup()
            for p in peers:
                await backend.handle(LeaseEvent(EventType.ADDED, p))
            out["single"] = kernel_state(hosts.a)
            for p in peers:
                await backend.handle(LeaseEvent(EventType.REMOVED, p))
            out["single-removed"] = kernel_state(hosts.a)
            adds = [LeaseEvent(EventType.ADDED, p) for p in peers]
            out["errors"] = await backend.handle_many(adds)
            out["batched"] = kernel_state(hosts.a)
            # Again: all replaced / appended in place, without errors.
            out["again"] = await backend.handle_many(adds)
            out["batched-again"] = kernel_state(hosts.a)
            out["removed"] = await backend.handle_many(
                [LeaseEvent(EventType.REMOVED, p) for p in peers])
            out["batched-removed"] = kernel_state(hosts.a)
            # Nothing left to delete: each answers False.
            out["absent"] = (
                await nl.delete_route_many("flannel.1", [(peers[0].subnet, "10.5.0.0")]),
                await nl.fdb_delete_many("flannel.1", [("0a:58:00:00:02:00", "198.18.0.1")]),
                await nl.neigh_delete_many("flannel.1", ["10.5.0.0"]),
            )
            # A device deleted and created again under the same name is found again.
            await nl.delete_link("flannel.1")
            await backend.setup()
            out["recreated"] = await nl.neigh_replace_many(
                "flannel.1", [("10.5.0.0", "0a:58:00:00:02:00")])
            out["bad"] = await nl.replace_route_many(
                "flannel.1", [("10.5.1.0/24", "10.5.1.0")], onlink=False)
            await nl.delete_link("flannel.1")
            with pytest.raises(NetlinkOpError) as exc:
                await nl.neigh_replace_many("flannel.1", [("10.5.0.0", "0a:58:00:00:02:00")])
            out["gone"] = exc.value.errno
            out["gone-routes"] = await nl.delete_route_many(
                "flannel.1", [(peers[0].subnet, "10.5.0.0")])
        return out

    out = asyncio.run(main())
    assert out["errors"] == [None] * 40 and out["again"] == [None] * 40
    assert out["removed"] == [None] * 40
    assert len(out["single"][0].splitlines()) == 40
    assert out["batched"] == out["single"] and out["batched-again"] == out["single"]
    assert out["batched-removed"] == out["single-removed"]
    assert out["absent"] == ([False], [False], [False])
    assert out["recreated"] == [None]
    (bad,) = out["bad"]  # a gateway not on the device's subnet without onlink
    assert isinstance(bad, NetlinkOpError) and bad.errno == errno.ENETUNREACH
    assert str(bad) .startswith("[Errno 101] route 10.5.1.0/24 via 10.5.1.0 dev flannel.1:")
    assert out["gone"] == errno.ENODEV and out["gone-routes"] == [False]


class RecordingBackend:
    """Records the bursts it is given; the second event of each fails."""

    def __init__(self) -> None:
        self.bursts: list[list[LeaseEvent]] = []
        self.got = asyncio.Event()

    async def handle_many(self, events: list[LeaseEvent]) -> list[Exception | None]:
        self.bursts.append(list(events))
        self.got.set()
        return [NetlinkOpError(errno.EIO, "no") if n == 1 else None for n in range(len(events))]


class BurstManager:
    """A lease watch that delivers a burst of events at once, then nothing."""

    def __init__(self, events: list[LeaseEvent]) -> None:
        self.events = events

    async def watch_leases(self, exclude: Any, retry: float) -> Any:
        for event in self.events:
            yield event
        await asyncio.Event().wait()


def test_the_daemon_applies_a_burst_of_events_at_once() -> None:
    from grozd.flannel.config import parse_config
    from grozd.flannel.daemon import Flanneld, FlanneldConfig

    network = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    events = [LeaseEvent(EventType.ADDED, lease(f"10.5.{i}.0/24", f"192.0.2.{10 + i}",
                                                f"0a:58:00:00:00:{i:02x}"))
              for i in range(5)]
    outside = LeaseEvent(EventType.ADDED, lease("10.99.0.0/24", "192.0.2.9", "0a:58:00:00:00:09"))
    daemon = Flanneld(FlanneldConfig())
    backend = RecordingBackend()

    async def main() -> None:
        task = asyncio.create_task(daemon._watch(
            BurstManager([*events, outside]), backend,  # type: ignore[arg-type]
            IPv4Network("10.5.255.0/24"), network))
        await asyncio.wait_for(backend.got.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert backend.bursts == [events]
    assert [(e, str(x)) for e, x in daemon.event_errors] == [
        (events[1], "[Errno 5] no"),
        (outside, "lease 10.99.0.0/24 is outside the network 10.5.0.0/16; ignored"),
    ]
