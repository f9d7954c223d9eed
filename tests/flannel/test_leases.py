"""Subnet leases against a real etcd: acquire, renew, reclaim, expire, watch."""

from __future__ import annotations

import asyncio
import json
import random
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from grozd.client import Client, KeyNotFoundError
from grozd.flannel.config import NetworkConfig, config_from_dict
from grozd.flannel.leases import (
    EventType,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseLostError,
    LeaseManager,
    parse_subnet_key,
    subnet_key_name,
)
from grozd.flannel.subnetenv import SubnetEnv, previous_subnet, write_subnet_env

from .proxy import Proxy

NET16 = config_from_dict({"Network": "10.5.0.0/16"})


def attrs(ip: str, mac: str = "aa:bb:cc:00:00:01") -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(ip), "vxlan", {"VtepMAC": mac})


def manager(client: Client, prefix: str, config: NetworkConfig = NET16, **kw) -> LeaseManager:
    return LeaseManager(client, config, prefix, **kw)


def value(ip: str, mac: str = "aa:bb:cc:00:00:01") -> str:
    return attrs(ip, mac).to_json()


def test_subnet_key_names():
    assert subnet_key_name(IPv4Network("10.5.34.0/24")) == "10.5.34.0-24"
    assert parse_subnet_key("10.5.34.0-24") == IPv4Network("10.5.34.0/24")
    for bad in ("10.5.34.1-24", "10.5.34.0", "10.5.34.0-40", "x-24", "10.5.340.0-24"):
        assert parse_subnet_key(bad) is None


def test_lease_json_is_flannels():
    assert value("192.0.2.1") == (
        '{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:00:00:01"}}'
    )
    assert LeaseAttrs(IPv4Address("192.0.2.1"), "host-gw").to_json() == (
        '{"PublicIP":"192.0.2.1","BackendType":"host-gw"}'
    )
    parsed = LeaseAttrs.from_json(' {"PublicIP": "192.0.2.1", "BackendType": "host-gw"} ')
    assert parsed == LeaseAttrs(IPv4Address("192.0.2.1"), "host-gw", None)
    for bad in ('{"BackendType": "vxlan"}', '{"PublicIP": "nope"}', "[]", "{",
                '{"PublicIP": "192.0.2.1", "BackendData": 3}'):
        with pytest.raises(ValueError):
            LeaseAttrs.from_json(bad)


def test_acquire_creates_a_lease_in_flannels_format(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        lease = await m.acquire(attrs("192.0.2.1"))
        return lease, await c.get(f"{prefix}/subnets/{lease.key_name}")

    lease, resp = run(body)
    assert NET16.is_compatible(lease.subnet)
    assert resp.node.value == value("192.0.2.1") == lease.value
    assert resp.node.ttl in (86399, 86400)
    assert lease.ttl == 86400 and lease.modified_index == resp.node.modified_index


def test_concurrent_hosts_get_distinct_subnets_until_none_is_left(run, prefix):
    tiny = config_from_dict({"Network": "10.5.0.0/28"})  # /30s: 10.5.0.4, .8 and .12

    async def body(c: Client):
        # Same seed: all three pick the same subnet first, so two must lose and retry.
        hosts = [manager(c, prefix, tiny, rng=random.Random(7)) for _ in range(3)]
        leases = await asyncio.gather(
            *(m.acquire(attrs(f"192.0.2.{i + 1}")) for i, m in enumerate(hosts))
        )
        with pytest.raises(LeaseError) as exc:
            await manager(c, prefix, tiny).acquire(attrs("192.0.2.9"))
        return leases, str(exc.value)

    leases, error = run(body)
    assert sorted(str(x.subnet) for x in leases) == ["10.5.0.12/30", "10.5.0.4/30", "10.5.0.8/30"]
    assert error == "out of subnets: all 3 subnets /30 from 10.5.0.4 to 10.5.0.12 are leased"


def test_acquire_avoids_leased_and_overlapping_subnets(run, prefix):
    net22 = config_from_dict({"Network": "10.5.0.0/22"})  # 10.5.1.0, 10.5.2.0, 10.5.3.0

    async def body(c: Client):
        await c.set(f"{prefix}/subnets/10.5.1.0-24", value("192.0.2.7"), ttl=60)
        # A lease of another size (an older config) still blocks what it overlaps.
        await c.set(f"{prefix}/subnets/10.5.3.128-25", value("192.0.2.8"), ttl=60)
        return await manager(c, prefix, net22).acquire(attrs("192.0.2.1"))

    assert run(body).subnet == IPv4Network("10.5.2.0/24")


def test_renew_resets_the_ttl_with_compare_and_swap(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix, ttl=50)
        lease = await m.acquire(attrs("192.0.2.1"))
        m.ttl = 100
        renewed = await m.renew(lease)
        return lease, renewed, await c.get(m.key(lease.subnet))

    lease, renewed, resp = run(body)
    assert lease.ttl == 50 and renewed.ttl == 100 and resp.node.ttl in (99, 100)
    assert renewed.modified_index > lease.modified_index
    assert resp.node.value == lease.value == renewed.value


def test_renew_rewrites_a_lease_edited_by_hand_that_still_names_us(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        lease = await m.acquire(attrs("192.0.2.1"))
        await c.set(m.key(lease.subnet), value("192.0.2.1", "aa:bb:cc:00:00:99"), ttl=60)
        await m.renew(lease)
        return lease, (await c.get(m.key(lease.subnet))).node

    lease, node = run(body)
    assert node.value == lease.value and node.ttl in (86399, 86400)


def test_renew_fails_when_another_host_took_the_subnet(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        lease = await m.acquire(attrs("192.0.2.1"))
        await c.set(m.key(lease.subnet), value("192.0.2.9"), ttl=60)
        with pytest.raises(LeaseLostError) as exc:
            await m.renew(lease)
        return lease, str(exc.value)

    lease, error = run(body)
    assert error == f"lease {lease.subnet} now belongs to 192.0.2.9"


def test_renew_takes_an_expired_lease_again(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        lease = await m.acquire(attrs("192.0.2.1"))
        await c.delete(m.key(lease.subnet))  # as if it had expired during an outage
        again = await m.renew(lease)
        return lease, again, (await c.get(m.key(lease.subnet))).node

    lease, again, node = run(body)
    assert again.subnet == lease.subnet and again.value == lease.value
    assert node.value == lease.value and node.ttl in (86399, 86400)


class RacingClient(Client):
    """Another host creates the lease between our failed renewal and our re-creation."""

    async def compare_and_swap(self, key, value, prev_value=None, prev_index=None, ttl=None):
        try:
            return await super().compare_and_swap(key, value, prev_value, prev_index, ttl)
        except KeyNotFoundError:
            await self.create(key, self.other_value, ttl=60)
            raise


def test_renew_fails_when_the_expired_subnet_was_taken_meanwhile(etcd_url, prefix):
    async def body():
        async with RacingClient([etcd_url]) as c:
            c.other_value = value("192.0.2.9")
            m = manager(c, prefix)
            lease = await m.acquire(attrs("192.0.2.1"))
            await c.delete(m.key(lease.subnet))
            with pytest.raises(LeaseLostError) as exc:
                await m.renew(lease)
            return lease, str(exc.value)

    lease, error = asyncio.run(body())
    assert error == f"lease {lease.subnet} expired and was taken by 192.0.2.9"


def test_restart_takes_over_the_lease_holding_its_public_ip(run, prefix):
    async def body(c: Client):
        first = await manager(c, prefix, ttl=60).acquire(attrs("192.0.2.1", "aa:bb:cc:00:00:01"))
        # Restarted with a new VTEP MAC (device recreated) before the lease expired.
        second = await manager(c, prefix).acquire(attrs("192.0.2.1", "aa:bb:cc:00:00:02"))
        return first, second, (await c.get(f"{prefix}/subnets/{first.key_name}")).node

    first, second, node = run(body)
    assert second.subnet == first.subnet
    assert node.value == value("192.0.2.1", "aa:bb:cc:00:00:02")
    assert node.ttl in (86399, 86400)


def test_a_reservation_stays_a_reservation(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/subnets/10.5.200.0-24", json.dumps({"PublicIP": "192.0.2.1"}))
        m = manager(c, prefix)
        lease = await m.acquire(attrs("192.0.2.1"))
        with pytest.raises(TimeoutError):  # nothing to renew: it just waits
            await asyncio.wait_for(m.keep_alive(lease), 0.2)
        return lease, (await c.get(m.key(lease.subnet))).node

    lease, node = run(body)
    assert lease.subnet == IPv4Network("10.5.200.0/24")
    assert node.ttl is None and lease.ttl is None and node.value == value("192.0.2.1")


def test_restart_takes_back_the_subnet_of_its_subnet_env(run, prefix, tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, SubnetEnv.for_lease(NET16.network, IPv4Network("10.5.77.0/24"), 1450,
                                               False))

    async def body(c: Client):
        return await manager(c, prefix).acquire(attrs("192.0.2.1"), previous_subnet(path))

    lease = run(body)
    assert lease.subnet == IPv4Network("10.5.77.0/24") and lease.ttl == 86400


def test_previous_subnet_held_by_another_host_is_not_taken(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/subnets/10.5.77.0-24", value("192.0.2.9"), ttl=60)
        lease = await manager(c, prefix).acquire(attrs("192.0.2.1"),
                                                 IPv4Network("10.5.77.0/24"))
        return lease, (await c.get(f"{prefix}/subnets/10.5.77.0-24")).node.value

    lease, other = run(body)
    assert lease.subnet != IPv4Network("10.5.77.0/24") and other == value("192.0.2.9")


def test_previous_subnet_outside_the_range_is_ignored(run, prefix):
    async def body(c: Client):
        return await manager(c, prefix).acquire(attrs("192.0.2.1"), IPv4Network("10.6.1.0/24"))

    assert NET16.is_compatible(run(body).subnet)


def test_own_lease_that_no_longer_fits_the_config_is_replaced(run, prefix):
    narrowed = config_from_dict({"Network": "10.5.0.0/16", "SubnetMin": "10.5.10.0"})

    async def body(c: Client):
        await c.set(f"{prefix}/subnets/10.5.3.0-24", value("192.0.2.1"), ttl=60)
        lease = await manager(c, prefix, narrowed).acquire(attrs("192.0.2.1"))
        with pytest.raises(KeyNotFoundError):
            await c.get(f"{prefix}/subnets/10.5.3.0-24")
        return lease

    assert narrowed.is_compatible(run(body).subnet)


# -- watching ------------------------------------------------------------------------------


class Watcher:
    """Runs watch_leases in the background, queueing its events."""

    def __init__(self, m: LeaseManager, exclude: IPv4Network | None = None) -> None:
        self.queue: asyncio.Queue[LeaseEvent] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(m, exclude))

    async def _run(self, m: LeaseManager, exclude: IPv4Network | None) -> None:
        async for event in m.watch_leases(exclude, retry=0.05):
            self.queue.put_nowait(event)

    async def take(self, count: int, timeout: float = 5.0) -> list[tuple[str, str, str]]:
        """The next ``count`` events as (type, subnet, PublicIP)."""
        out = []
        for _ in range(count):
            e = await asyncio.wait_for(self.queue.get(), timeout)
            out.append((e.type.value, str(e.lease.subnet), str(e.lease.attrs.public_ip)))
        return out

    def pending(self) -> int:
        return self.queue.qsize()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_watch_reports_other_hosts_leases_and_their_changes(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        own = await m.acquire(attrs("192.0.2.1"))
        key = f"{prefix}/subnets"
        await c.set(f"{key}/10.5.101.0-24", value("192.0.2.101"), ttl=60)
        w = Watcher(m, exclude=own.subnet)
        first = await w.take(1)
        await c.set(f"{key}/10.5.102.0-24", value("192.0.2.102"), ttl=60)
        # A renewal (same value, new TTL) and our own lease's renewal: nothing to route.
        await c.compare_and_swap(f"{key}/10.5.101.0-24", value("192.0.2.101"),
                                 prev_value=value("192.0.2.101"), ttl=90)
        await m.renew(own)
        # New attributes (the host came back with a new VTEP): old out, new in.
        await c.set(f"{key}/10.5.101.0-24", value("192.0.2.101", "aa:bb:cc:00:00:02"), ttl=60)
        await c.delete(f"{key}/10.5.102.0-24")
        # Not leases: ignored.
        await c.set(f"{key}/not-a-subnet", "x")
        await c.set(f"{key}/10.5.103.0-24", "not json", ttl=60)
        await c.set(f"{key}/10.5.104.0-24", value("192.0.2.104"), ttl=60)  # the last one
        rest = await w.take(5)
        await asyncio.sleep(0.1)
        assert w.pending() == 0
        await w.stop()
        return first, rest

    first, rest = run(body)
    assert first == [("added", "10.5.101.0/24", "192.0.2.101")]
    assert rest == [
        ("added", "10.5.102.0/24", "192.0.2.102"),
        ("removed", "10.5.101.0/24", "192.0.2.101"),
        ("added", "10.5.101.0/24", "192.0.2.101"),
        ("removed", "10.5.102.0/24", "192.0.2.102"),
        ("added", "10.5.104.0/24", "192.0.2.104"),
    ]


def test_watch_removes_everything_when_the_directory_goes(run, prefix):
    async def body(c: Client):
        m = manager(c, prefix)
        for i in (1, 2):
            await c.set(f"{prefix}/subnets/10.5.{i}.0-24", value(f"192.0.2.{i}"), ttl=60)
        w = Watcher(m)
        added = await w.take(2)
        await c.delete(f"{prefix}/subnets", recursive=True)
        removed = await w.take(2)
        await w.stop()
        return added, removed

    added, removed = run(body)
    assert sorted(x[0] for x in added) == ["added", "added"]
    assert sorted(removed) == [("removed", "10.5.1.0/24", "192.0.2.1"),
                               ("removed", "10.5.2.0/24", "192.0.2.2")]


def test_renewed_lease_lives_on_and_unrenewed_one_expires(run, prefix):
    async def body(c: Client):
        kept = manager(c, prefix, ttl=1, renew_margin=0.6)
        dying = manager(c, prefix, ttl=1)
        w = Watcher(manager(c, prefix))
        lease = await kept.acquire(attrs("192.0.2.1"))
        other = await dying.acquire(attrs("192.0.2.2"))
        added = await w.take(2)
        renewals: list[int] = []
        renewer = asyncio.create_task(kept.keep_alive(lease, lambda x: renewals.append(1)))
        start = time.monotonic()
        removed = await w.take(1, timeout=5)
        expired_after = time.monotonic() - start
        await asyncio.sleep(max(0.0, 2.2 - expired_after))  # well past the 1 s TTL
        still = (await c.get(kept.key(lease.subnet))).node.value
        renewer.cancel()
        await w.stop()
        return lease, other, added, removed, still, len(renewals)

    lease, other, added, removed, still, renewals = run(body)
    assert sorted(x[2] for x in added) == ["192.0.2.1", "192.0.2.2"]
    assert removed == [("removed", str(other.subnet), "192.0.2.2")]
    assert still == lease.value and renewals >= 3


def test_watch_keeps_its_state_through_a_store_outage(run, etcd_url, prefix):
    async def body(c: Client):
        proxy = Proxy(etcd_url)
        await proxy.up()
        key = f"{prefix}/subnets"
        await c.set(f"{key}/10.5.1.0-24", value("192.0.2.1"), ttl=60)
        async with Client([proxy.url], timeout=1.0) as through_proxy:
            w = Watcher(manager(through_proxy, prefix))
            assert await w.take(1) == [("added", "10.5.1.0/24", "192.0.2.1")]
            await proxy.down()
            await c.delete(f"{key}/10.5.1.0-24")
            await c.set(f"{key}/10.5.2.0-24", value("192.0.2.2"), ttl=60)
            await asyncio.sleep(0.5)
            assert w.pending() == 0  # an outage removes nothing
            await proxy.up()
            events = await w.take(2)
            await w.stop()
        await proxy.down()
        return events

    assert run(body) == [("removed", "10.5.1.0/24", "192.0.2.1"),
                         ("added", "10.5.2.0/24", "192.0.2.2")]


def test_watch_resyncs_when_etcd_forgot_the_missed_events(run, etcd_url, prefix):
    async def body(c: Client):
        proxy = Proxy(etcd_url)
        await proxy.up()
        key = f"{prefix}/subnets"
        await c.set(f"{key}/10.5.1.0-24", value("192.0.2.1"), ttl=60)
        async with Client([proxy.url], timeout=1.0) as through_proxy:
            w = Watcher(manager(through_proxy, prefix))
            await w.take(1)
            await proxy.down()
            await c.delete(f"{key}/10.5.1.0-24")
            await c.set(f"{key}/10.5.2.0-24", value("192.0.2.2"), ttl=60)
            # More than etcd's 1000-event history: the watch cannot resume where it was.
            for start in range(0, 1100, 100):
                await asyncio.gather(*(c.set(f"{prefix}/noise/{i}", "x")
                                       for i in range(start, start + 100)))
            await proxy.up()
            events = await w.take(2)
            await w.stop()
        await proxy.down()
        return events

    assert run(body) == [("removed", "10.5.1.0/24", "192.0.2.1"),
                         ("added", "10.5.2.0/24", "192.0.2.2")]


def test_lease_event_types():
    assert [t.value for t in EventType] == ["added", "removed"]


def test_renewal_rides_out_a_store_outage(run, etcd_url, prefix):
    async def body(c: Client):
        proxy = Proxy(etcd_url)
        await proxy.up()
        renewed: list[float] = []
        loop = asyncio.get_running_loop()
        async with Client([proxy.url], timeout=0.5) as through_proxy:
            m = manager(through_proxy, prefix, ttl=3, renew_margin=2.5, renew_retry=0.1)
            lease = await m.acquire(attrs("192.0.2.1"))
            task = asyncio.create_task(m.keep_alive(lease, lambda x: renewed.append(loop.time())))
            await asyncio.sleep(0.1)
            await proxy.down()
            down_at = loop.time()
            await asyncio.sleep(1.0)  # renewals fail meanwhile; the lease has 3 s
            await proxy.up()
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await proxy.down()
        node = (await c.get(m.key(lease.subnet))).node
        return lease, node, [t - down_at for t in renewed]

    lease, node, renewed = run(body)
    assert node.value == lease.value and node.ttl >= 2
    assert any(t > 1.0 for t in renewed)  # renewed again once the store came back
