"""Registry round trips against real etcd: the documented key layout, TTLs, the lease."""

from __future__ import annotations

import asyncio
import json

import pytest

from grozd.client import Client
from grozd.fleet.model import ClusterModel
from grozd.fleet.registry import (
    INACTIVE,
    LAUNCHED,
    LOADED,
    MachineState,
    NoSuchUnitError,
    Registry,
    UnitExistsError,
    UnitStateRecord,
    current_state,
)
from grozd.fleet.unit import content_hash

from .conftest import run_async

TEXT = "[Service]\nExecStart=/bin/sleep 100\n"


async def eventually(read, check, timeout: float = 5.0):
    """Poll ``await read()`` until ``check`` accepts it (TTL expiry takes 1-1.5 s)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await read()
        if check(value):
            return value
        assert loop.time() < end, f"still {value!r}"
        await asyncio.sleep(0.05)


@pytest.fixture
def reg(etcd_url: str, prefix: str):
    """reg(fn): run ``await fn(registry)`` with a Registry under the test's prefix."""

    def runner(fn):
        async def main():
            async with Client([etcd_url]) as client:
                return await fn(Registry(client, prefix), client)

        return run_async(main())

    return runner


def test_submit_stores_content_by_hash_and_the_job_keys(reg, prefix):
    async def go(r: Registry, client: Client):
        digest = await r.submit("hello.service", TEXT)
        assert digest == content_hash(TEXT)
        assert (await client.get(f"{prefix}/unit/{digest}")).value == TEXT
        obj = json.loads((await client.get(f"{prefix}/job/hello.service/object")).value)
        assert obj == {"Name": "hello.service", "UnitHash": digest}
        assert (await client.get(f"{prefix}/job/hello.service/target-state")).value == INACTIVE
        job = await r.job("hello.service")
        assert (job.hash, job.desired_state, job.target, job.reason) == (
            digest, INACTIVE, None, None)
        with pytest.raises(UnitExistsError):
            await r.submit("hello.service", TEXT)
        # Same content under another name is stored once.
        await r.submit("other.service", TEXT, LOADED)
        assert list(await r.unit_hashes()) == [digest]
        jobs, index = await r.jobs()
        assert sorted(jobs) == ["hello.service", "other.service"] and index > 0
        assert jobs["other.service"].desired_state == LOADED

    reg(go)


def test_desired_state_target_reason_replace_destroy(reg, prefix):
    async def go(r: Registry, client: Client):
        await r.submit("a.service", TEXT)
        await r.set_desired_state("a.service", LAUNCHED)
        await r.set_target("a.service", "m1")
        job = await r.job("a.service")
        assert (job.desired_state, job.target) == (LAUNCHED, "m1")
        await r.clear_target("a.service", "no machines in the cluster")
        job = await r.job("a.service")
        assert (job.target, job.reason) == (None, "no machines in the cluster")
        assert (await client.get(f"{prefix}/job/a.service/reason")).value == job.reason
        await r.set_target("a.service", "m2")
        assert (await r.job("a.service")).reason is None
        new = await r.replace("a.service", TEXT + "# v2\n")
        assert (await r.job("a.service")).hash == new
        with pytest.raises(ValueError):
            await r.set_desired_state("a.service", "running")
        assert await r.destroy("a.service") is True
        assert await r.job("a.service") is None
        assert await r.destroy("a.service") is False
        with pytest.raises(NoSuchUnitError):
            await r.set_desired_state("a.service", LOADED)
        with pytest.raises(ValueError):
            await r.submit("not a unit", TEXT)

    reg(go)


def test_machine_presence_expires_without_refresh(reg, prefix):
    async def go(r: Registry, client: Client):
        m = MachineState("m1" * 16, "10.0.0.1", {"region": "eu"}, endpoint="http://x:1")
        await r.announce(m, ttl=1)
        stored = json.loads((await client.get(f"{prefix}/machines/{m.id}/object")).value)
        assert stored == {"ID": m.id, "PublicIP": "10.0.0.1", "Metadata": {"region": "eu"},
                          "Version": m.version, "Endpoint": "http://x:1"}  # fmt: skip
        assert (await r.machines())[0] == {m.id: m}
        for _ in range(3):
            await asyncio.sleep(0.4)
            await r.refresh_presence(m.id, ttl=1)
        assert m.id in (await r.machines())[0]
        await eventually(lambda: r.machines(), lambda ms: ms[0] == {})
        await r.announce(m, ttl=30)
        await r.withdraw(m.id)
        assert (await r.machines())[0] == {}

    reg(go)


def test_unit_states_and_current_state(reg, prefix):
    async def go(r: Registry, client: Client):
        await r.submit("a.service", TEXT, LAUNCHED)
        m = MachineState("m" * 32)
        rec = UnitStateRecord("a.service", m.id, content_hash(TEXT), "loaded", "active", "running",
                              LAUNCHED)  # fmt: skip
        await r.report_state(rec)
        assert json.loads((await client.get(f"{prefix}/state/a.service/{m.id}")).value)[
            "ActiveState"] == "active"
        states = await r.unit_states()
        assert states == {("a.service", m.id): rec}
        job = await r.job("a.service")
        assert current_state(job, states, {m.id: m}) == INACTIVE  # not placed
        await r.set_target("a.service", m.id)
        job = await r.job("a.service")
        assert current_state(job, states, {}) == INACTIVE  # machine absent
        assert current_state(job, states, {m.id: m}) == LAUNCHED
        stopping = UnitStateRecord("a.service", m.id, "", "loaded", "deactivating", "stop-sigterm")
        assert current_state(job, {("a.service", m.id): stopping}, {m.id: m}) == LAUNCHED
        stopped = UnitStateRecord("a.service", m.id, "", "loaded", "inactive", "dead")
        assert current_state(job, {("a.service", m.id): stopped}, {m.id: m}) == LOADED
        await r.clear_state("a.service", m.id)
        assert await r.unit_states() == {}

    reg(go)


def test_engine_lease_is_exclusive_renewable_and_expires(reg):
    async def go(r: Registry, client: Client):
        assert await r.acquire_lease("m1 t1", ttl=1)
        assert not await r.acquire_lease("m2 t2", ttl=1)
        assert await r.lease_holder() == "m1 t1"
        assert await r.renew_lease("m1 t1", ttl=1)
        assert not await r.renew_lease("m2 t2", ttl=1)
        await eventually(r.lease_holder, lambda holder: holder is None)
        assert not await r.renew_lease("m1 t1", ttl=1)
        assert await r.acquire_lease("m2 t2", ttl=5)
        await r.release_lease("m1 t1")  # not ours: no effect
        assert await r.lease_holder() == "m2 t2"
        await r.release_lease("m2 t2")
        assert await r.lease_holder() is None

    reg(go)


def test_model_follows_watch_events(reg):
    async def go(r: Registry, client: Client):
        await r.submit("a.service", TEXT, LAUNCHED)
        model = ClusterModel(r)
        changed = asyncio.Event()
        await model.resync(changed.set)

        async def until(check):
            for _ in range(100):
                if check():
                    return
                changed.clear()
                try:
                    async with asyncio.timeout(0.1):
                        await changed.wait()
                except TimeoutError:
                    pass
            raise AssertionError("model did not follow")

        assert model.jobs["a.service"].desired_state == LAUNCHED
        await r.submit("b.service", TEXT)
        await until(lambda: "b.service" in model.jobs)
        await r.set_target("a.service", "m1")
        await until(lambda: model.jobs["a.service"].target == "m1")
        await r.clear_target("a.service", "why")
        await until(lambda: model.jobs["a.service"].reason == "why")
        await r.destroy("a.service")
        await until(lambda: "a.service" not in model.jobs)
        await r.announce(MachineState("x" * 32, metadata={"k": "v"}), ttl=1)
        await until(lambda: "x" * 32 in model.machines)
        await until(lambda: "x" * 32 not in model.machines)  # expired
        assert await model.text(content_hash(TEXT)) == TEXT
        await model.stop_watching()

    reg(go)
