"""Engine and agents together: several in-process machines on one real etcd.

Each machine runs an agent (with an in-memory runner) and an engine candidate, exactly as
fleetd composes them; only one engine leads. Presence TTLs are short so expiry is quick.
"""

from __future__ import annotations

import asyncio

from grozd.fleet.agent import Agent
from grozd.fleet.registry import INACTIVE, LAUNCHED, LOADED, MachineState, UnitStateRecord

from .conftest import Cluster, FakeRunner


def svc(fleet: str = "") -> str:
    return "[Service]\nExecStart=/bin/sleep 1000\n" + (f"[X-Fleet]\n{fleet}\n" if fleet else "")


def running(node) -> set[str]:
    return {n for n, st in node.runner.units().items() if st.active_state == "active"}


def leaders(c: Cluster) -> list:
    return [n for n in c.nodes if n.engine is not None and n.engine.is_leader]


def test_every_rule_placed_by_watch_not_by_polling(cluster):
    async def go(c: Cluster):
        eu1 = await c.add({"region": "eu", "disk": "ssd"})
        eu2 = await c.add({"region": "eu", "disk": "hdd"})
        us = await c.add({"region": "us"})
        await c.wait(lambda: _one_leader(c), what="a leader")
        r = c.registry
        await r.submit("pinned.service", svc(f"MachineID={us.id}"), LAUNCHED)
        await r.submit("db.service", svc("MachineMetadata=disk=ssd"), LAUNCHED)
        await r.submit("app.service", svc("MachineOf=db.service"), LAUNCHED)
        await r.submit("web1.service", svc("Conflicts=web*\nMachineMetadata=region=eu"), LAUNCHED)
        await r.submit("web2.service", svc("MachineMetadata=region=eu"), LAUNCHED)
        await r.submit("loaded.service", svc(f"MachineID={eu2.id}"), LOADED)
        placed = await c.settle(timeout=5)
        assert placed["pinned.service"] == us.id
        assert placed["db.service"] == placed["app.service"] == eu1.id
        assert {placed["web1.service"], placed["web2.service"]} == {eu1.id, eu2.id}
        assert placed["loaded.service"] == eu2.id
        # The agents did what the placements say.
        await c.wait(lambda: _async(running(us) == {"pinned.service"}), what="us to run")
        assert {"db.service", "app.service"} <= running(eu1)
        assert "loaded.service" in eu2.runner.units() and "loaded.service" not in running(eu2)
        # Reconcile interval is 5 s: all of this happened on watch events alone.
        leader = leaders(c)[0].engine
        assert leader.reconciles < 60

    cluster(go, interval=30.0)


def _async(value: bool):
    async def result() -> bool:
        return value

    return result()


async def _one_leader(c: Cluster) -> bool:
    return len(leaders(c)) == 1


def test_least_loaded_then_replaces(cluster):
    async def go(c: Cluster):
        a = await c.add()
        b = await c.add()
        r = c.registry
        for i in range(4):
            await r.submit(f"u{i}.service", svc(), LAUNCHED)
        placed = await c.settle()
        assert sorted(list(placed.values()).count(m) for m in (a.id, b.id)) == [2, 2]
        await r.submit("old.service", svc(f"MachineID={a.id}"), LAUNCHED)
        await c.settle()
        # new.service takes old.service's machine; old.service (pinned there) has nowhere
        # else to go and is left unplaced with a reason.
        await r.submit("new.service", svc("Replaces=old.service"), LAUNCHED)

        async def replaced() -> bool:
            jobs, _ = await r.jobs()
            return jobs["new.service"].target == a.id and jobs["old.service"].target is None

        await c.wait(replaced, what="the replacement")
        job = await r.job("old.service")
        assert "conflicts with new.service" in (job.reason or "")
        await c.wait(lambda: _async("old.service" not in a.runner.units()), what="old to go")

    cluster(go)


def test_conflicts_never_together_and_unschedulable_reason(cluster):
    async def go(c: Cluster):
        nodes = [await c.add() for _ in range(2)]
        r = c.registry
        for i in range(3):
            await r.submit(f"lb{i}.service", svc("Conflicts=lb*.service"), LAUNCHED)
        placed = await c.settle()
        targets = [t for t in placed.values() if t is not None]
        assert len(targets) == len(set(targets)) == 2
        stuck = [n for n, t in placed.items() if t is None]
        assert len(stuck) == 1
        job = await r.job(stuck[0])
        assert job.reason is not None and job.reason.startswith("no eligible machine (")
        assert job.reason.count("conflicts with lb") == 2
        for node in nodes:
            assert len([u for u in node.runner.units() if u.startswith("lb")]) <= 1
        # A machine appears: the stuck unit is placed there and its reason goes.
        third = await c.add()
        await c.wait(lambda: _placed_on(c, stuck[0], third.id), what="placement on the new machine")
        assert (await r.job(stuck[0])).reason is None

    cluster(go)


async def _placed_on(c: Cluster, name: str, mid: str) -> bool:
    job = await c.registry.job(name)
    return job is not None and job.target == mid


def test_unschedulable_until_metadata_appears(cluster):
    async def go(c: Cluster):
        await c.add({"region": "eu"})
        await c.registry.submit("mars.service", svc("MachineMetadata=region=mars"), LAUNCHED)
        await c.settle()
        job = await c.registry.job("mars.service")
        assert job.target is None
        assert "metadata does not match region=mars" in job.reason
        mars = await c.add({"region": "mars"})
        await c.wait(lambda: _placed_on(c, "mars.service", mars.id), what="placement")
        await c.wait(lambda: _async("mars.service" in running(mars)), what="start")

    cluster(go)


def test_global_units_run_on_every_matching_machine(cluster):
    async def go(c: Cluster):
        e1 = await c.add({"role": "edge"})
        core = await c.add({"role": "core"})
        r = c.registry
        await r.submit("everywhere.service", svc("Global=true"), LAUNCHED)
        await r.submit("edge.service", svc("Global=true\nMachineMetadata=role=edge"), LAUNCHED)
        await r.submit("x.service", svc("Conflicts=edge.service"), LAUNCHED)
        await c.wait(lambda: _async(running(e1) >= {"everywhere.service", "edge.service"}),
                     what="globals on the edge machine")  # fmt: skip
        await c.wait(lambda: _async("everywhere.service" in running(core)), what="global on core")
        assert "edge.service" not in core.runner.units()
        # A global unit has no target; a unit conflicting with it avoids its machines.
        placed = await c.settle()
        assert placed["everywhere.service"] is None and placed["edge.service"] is None
        assert placed["x.service"] == core.id
        e2 = await c.add({"role": "edge"})
        await c.wait(lambda: _async(running(e2) >= {"everywhere.service", "edge.service"}),
                     what="globals on a machine that joined later")  # fmt: skip
        await r.set_desired_state("edge.service", INACTIVE)
        await c.wait(lambda: _async("edge.service" not in e1.runner.units()
                                    and "edge.service" not in e2.runner.units()),
                     what="global unit unloaded everywhere")  # fmt: skip

    cluster(go)


def test_units_move_when_a_machine_presence_expires(cluster):
    async def go(c: Cluster):
        # a never campaigns, so the engine (on b) outlives a's death.
        a = await c.add(engine=False)
        b = await c.add()
        await c.registry.submit("moving.service", svc(), LAUNCHED)
        placed = await c.settle()
        assert placed["moving.service"] == a.id  # equal load: the lower machine ID
        await a.kill()  # no clean-up: only the TTL tells the others
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await c.wait(lambda: _placed_on(c, "moving.service", b.id), timeout=8,
                     what="rescheduling")  # fmt: skip
        assert loop.time() - t0 < 4
        await c.wait(lambda: _async("moving.service" in running(b)), what="the move")

        # The dead machine's reported state is dropped by the engine's full reconcile.
        async def gc_done() -> bool:
            states = await c.registry.unit_states()
            return all(mid != a.id for (_, mid) in states)

        await c.wait(gc_done, timeout=8, what="stale states to go")

    cluster(go, ttl=1, interval=1.0)


def test_clean_shutdown_moves_units_at_once(cluster):
    async def go(c: Cluster):
        a = await c.add(engine=False)
        b = await c.add()
        await c.registry.submit("u.service", svc(), LAUNCHED)
        assert (await c.settle())["u.service"] == a.id
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await a.stop()  # stops its units and withdraws the machine
        assert "u.service" not in a.runner.units()
        await c.wait(lambda: _async("u.service" in running(b)), what="the move to b")
        assert loop.time() - t0 < 1.5, "a withdrawn machine is not waited for by TTL"

    cluster(go, ttl=10)


def test_one_engine_leads_and_another_takes_over(cluster):
    async def go(c: Cluster):
        nodes = [await c.add() for _ in range(3)]
        await c.wait(lambda: _one_leader(c), what="a leader")
        await asyncio.sleep(0.5)
        assert len(leaders(c)) == 1
        first = leaders(c)[0]
        holder = await c.registry.lease_holder()
        assert holder is not None and holder.startswith(first.id)
        await first.kill()  # lease expires by TTL
        await c.wait(lambda: _one_leader(c), timeout=8, what="a new leader")
        second = leaders(c)[0]
        assert second is not first and second in nodes
        await c.registry.submit("after.service", svc(), LAUNCHED)
        placed = await c.settle()
        assert placed["after.service"] in {n.id for n in nodes if n is not first}

    cluster(go, lease_ttl=1, ttl=1)


def test_desired_state_changes_reach_the_runner(cluster):
    async def go(c: Cluster):
        node = await c.add()
        r = c.registry
        await r.submit("u.service", svc(), LAUNCHED)
        await c.wait(lambda: _async("u.service" in running(node)), what="start")
        await r.set_desired_state("u.service", LOADED)
        await c.wait(
            lambda: _async("u.service" not in running(node) and "u.service" in node.runner.units()),
            what="stop",
        )
        await r.set_desired_state("u.service", INACTIVE)
        await c.wait(lambda: _async("u.service" not in node.runner.units()), what="unload")

        async def no_state() -> bool:
            return not await r.unit_states()

        await c.wait(no_state, what="the state to be cleared")
        await r.set_desired_state("u.service", LAUNCHED)
        await c.wait(lambda: _async("u.service" in running(node)), what="start again")
        await r.destroy("u.service")
        await c.wait(lambda: _async(not node.runner.units()), what="destroyed unit to go")
        await c.wait(no_state, what="its state to be cleared")

    cluster(go)


def test_restarted_agent_reconciles_with_what_runs(cluster):
    async def go(c: Cluster):
        node = await c.add()
        r = c.registry
        for name in ("keep.service", "crashed.service"):
            await r.submit(name, svc(f"MachineID={node.id}"), LAUNCHED)
        await c.wait(lambda: _async(running(node) == {"keep.service", "crashed.service"}),
                     what="both running")  # fmt: skip
        runner: FakeRunner = node.runner  # type: ignore[assignment]
        # The agent dies; the runner (systemd, say) goes on. Meanwhile one unit dies, a
        # stray unit appears, and the desired state of another changes.
        for task in node.tasks:
            task.cancel()
        await asyncio.gather(*node.tasks, return_exceptions=True)
        node.tasks = []
        runner._set("crashed.service", "failed", "failed")
        await runner.load("stray.service", svc())
        # A state reported before the restart for a unit no longer here must go too.
        await r.submit("idle.service", svc())
        await r.report_state(UnitStateRecord("idle.service", node.id, "x", "loaded", "active",
                                             "running", LAUNCHED))  # fmt: skip
        starts_before = list(runner.starts)
        agent = Agent(r, runner, MachineState(node.id, "10.0.0.1"), ttl=c.ttl)
        task = asyncio.get_running_loop().create_task(agent.run())
        node.tasks.append(task)
        node.agent = agent
        await c.wait(lambda: _async(running(node) == {"keep.service", "crashed.service"}
                                    and "stray.service" not in runner.units()),
                     what="reconcile after restart")  # fmt: skip
        new_starts = runner.starts[len(starts_before):]
        assert new_starts == ["crashed.service"], "a running unit must not be restarted"

        async def stale_gone() -> bool:
            return ("idle.service", node.id) not in await r.unit_states()

        await c.wait(stale_gone, what="the stale state to be dropped")

    cluster(go)
