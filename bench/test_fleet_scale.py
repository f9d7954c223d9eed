"""fleet at 10x the original's stated limit: 1,000 machines and 10,000 units.

The engine is grozd's own (`grozd.fleet.engine.Engine`), in a process of its own so its
CPU time can be measured. The 1,000 machines are simulated in this process: each
announces itself with a TTL key and keeps it alive like an agent does, and reports
``active/running`` under ``state/<unit>/<machine>`` for every unit the engine places on
it once the unit is wanted launched (a no-op runner). The simulated agents share one
watch on ``job/`` (a real agent holds one each; see the printed note).

Measured, after all units are submitted (inactive): the time from starting all of them
(``target-state`` set to launched, as ``fleetctl start`` does: a read and a write each,
64 at a time) until every unit is reported running; store requests per unit in that
phase, split by who sent them; the engine's CPU seconds in that phase.

Run (needs the etcd 3.4 binary, as the fleet tests do)::

    .venv/bin/python -m pytest bench/test_fleet_scale.py -q -s

``GROZD_FLEET_MACHINES`` / ``GROZD_FLEET_UNITS`` change the scale (defaults 1000 and
10000); ``GROZD_FLEET_STORE=grozd`` runs against grozd's own store instead of etcd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import os
import posixpath
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from realetcd import start_etcd  # noqa: E402

from grozd.client import Client  # noqa: E402
from grozd.fleet.engine import Engine  # noqa: E402
from grozd.fleet.model import ClusterModel  # noqa: E402
from grozd.fleet.registry import (  # noqa: E402
    INACTIVE,
    LAUNCHED,
    MachineState,
    Registry,
    UnitStateRecord,
)

MACHINES = int(os.environ.get("GROZD_FLEET_MACHINES", "1000"))
UNITS = int(os.environ.get("GROZD_FLEET_UNITS", "10000"))
STORE = os.environ.get("GROZD_FLEET_STORE", "etcd")
PREFIX = "/bench-fleet/"
PRESENCE_TTL = 120
CONCURRENCY = 64
TIMEOUT = float(os.environ.get("GROZD_FLEET_TIMEOUT", "900"))

UNIT_TEXT = """[Unit]
Description=bench unit {i}

[Service]
ExecStart=/bin/sleep infinity
"""


def count_requests(counter: collections.Counter[str]) -> None:
    """Count every store request this process sends, by HTTP method."""
    original = Client._request

    async def counted(self: Client, method: str, *args: Any, **kwargs: Any) -> Any:
        counter[method + (" watch" if kwargs.get("watch") else "")] += 1
        return await original(self, method, *args, **kwargs)

    Client._request = counted  # type: ignore[method-assign]


def machine_id(n: int) -> str:
    return f"{n:08x}" + "b" * 24


# -- the engine's process ------------------------------------------------------------------


def engine_main(url: str, conn: Connection) -> None:
    """Run one engine until told to stop; send back its requests and CPU seconds."""
    counter: collections.Counter[str] = collections.Counter()
    count_requests(counter)

    async def main() -> None:
        async with Client([url], timeout=30) as client:
            engine = Engine(Registry(client, PREFIX), machine_id(0xFFFFFFF),
                            lease_ttl=30, reconcile_interval=3600)  # fmt: skip
            task = asyncio.get_running_loop().create_task(engine.run())
            loop = asyncio.get_running_loop()
            while True:
                msg = await loop.run_in_executor(None, conn.recv)
                if msg == "mark":
                    counter.clear()
                    ru = resource.getrusage(resource.RUSAGE_SELF)
                    conn.send(ru.ru_utime + ru.ru_stime)
                elif msg == "stats":
                    ru = resource.getrusage(resource.RUSAGE_SELF)
                    conn.send((ru.ru_utime + ru.ru_stime, dict(counter), engine.reconciles,
                               engine.is_leader))  # fmt: skip
                else:
                    break
            engine.stop()
            await asyncio.wait({task}, timeout=10)

    asyncio.run(main())


# -- the simulated machines ----------------------------------------------------------------


class Machines:
    """Presence and state reports of many simulated agents over one shared job watch."""

    def __init__(self, registry: Registry, count: int) -> None:
        self.registry = registry
        self.ids = [machine_id(n) for n in range(count)]
        self.model = ClusterModel(registry)
        self.reported: dict[str, str] = {}
        self.queues: dict[str, asyncio.Queue[str]] = {m: asyncio.Queue() for m in self.ids}
        self.all_running = asyncio.Event()
        self.expected = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.moves = 0

    async def announce(self) -> None:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(n: int, mid: str) -> None:
            async with sem:
                await self.registry.announce(
                    MachineState(mid, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"),
                    PRESENCE_TTL,
                )

        await asyncio.gather(*(one(n, m) for n, m in enumerate(self.ids)))

    async def start(self) -> None:
        jobs_index, _ = await self.model.load()
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._watch(jobs_index + 1)))
        self.tasks.append(loop.create_task(self._heartbeat()))
        for mid in self.ids:
            self.tasks.append(loop.create_task(self._agent(mid)))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _check(self, name: str) -> None:
        job = self.model.jobs.get(name)
        if job is None or job.desired_state != LAUNCHED or job.target is None:
            return
        if self.reported.get(name) == job.target:
            return
        if name in self.reported:
            self.moves += 1
        self.queues[job.target].put_nowait(name)

    async def _watch(self, index: int) -> None:
        base = self.registry.jobs_dir
        client = self.registry.client
        async for resp in client.watch_iter(base, index, recursive=True, give_up_after=None):
            if not self.model.apply_jobs(resp):
                continue
            if resp.action == "get" or resp.node is None:
                for name in list(self.model.jobs):
                    self._check(name)
            else:
                self._check(posixpath.relpath(resp.node.key, base).split("/")[0])

    async def _agent(self, mid: str) -> None:
        """One machine's reporter: writes states one at a time, as the agent does."""
        queue = self.queues[mid]
        while True:
            name = await queue.get()
            job = self.model.jobs.get(name)
            if job is None or job.target != mid or self.reported.get(name) == mid:
                continue
            await self.registry.report_state(UnitStateRecord(
                name=name, machine_id=mid, unit_hash=job.hash or "", load_state="loaded",
                active_state="active", sub_state="running", agent_state=LAUNCHED,
            ))  # fmt: skip
            self.reported[name] = mid
            if len(self.reported) >= self.expected:
                self.all_running.set()

    async def _heartbeat(self) -> None:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(mid: str) -> None:
            async with sem:
                await self.registry.refresh_presence(mid, PRESENCE_TTL)

        while True:
            await asyncio.sleep(PRESENCE_TTL / 3)
            await asyncio.gather(*(one(m) for m in self.ids))


# -- the store -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def grozd_store(tmp: Path) -> Iterator[str]:
    """A single grozd store member on loopback (stopped by its recorded PID)."""
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    with open(tmp / "store.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grozd", "etcd", "--data-dir", str(tmp / "store"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/v2/keys/", timeout=1).close()
                break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    if STORE == "grozd":
        with grozd_store(tmp_path) as url:
            yield url
    else:
        with start_etcd(tmp_path) as (_proc, url):
            yield url


# -- the benchmark -------------------------------------------------------------------------


def test_fleet_scale(store_url: str) -> None:
    counter: collections.Counter[str] = collections.Counter()
    count_requests(counter)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    engine = ctx.Process(target=engine_main, args=(store_url, child), daemon=True)

    async def main() -> dict[str, Any]:
        async with Client([store_url], timeout=60, max_idle=CONCURRENCY * 2) as client:
            registry = Registry(client, PREFIX)
            sem = asyncio.Semaphore(CONCURRENCY)

            async def submit(i: int) -> None:
                async with sem:
                    await registry.submit(f"u{i:05d}.service", UNIT_TEXT.format(i=i), INACTIVE)

            t = time.monotonic()
            await asyncio.gather(*(submit(i) for i in range(UNITS)))
            submit_s = time.monotonic() - t
            machines = Machines(registry, MACHINES)
            machines.expected = UNITS
            t = time.monotonic()
            await machines.announce()
            announce_s = time.monotonic() - t
            await machines.start()
            loop = asyncio.get_running_loop()
            engine.start()
            while await registry.lease_holder() is None:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # its first full reconcile (nothing wanted yet)
            parent.send("mark")
            cpu0 = await loop.run_in_executor(None, parent.recv)
            counter.clear()

            async def start(i: int) -> None:
                async with sem:
                    await registry.set_desired_state(f"u{i:05d}.service", LAUNCHED)

            t0 = time.monotonic()
            await asyncio.gather(*(start(i) for i in range(UNITS)))
            started_s = time.monotonic() - t0
            await asyncio.wait_for(machines.all_running.wait(), TIMEOUT)
            running_s = time.monotonic() - t0
            sim_requests = dict(counter)
            parent.send("stats")
            cpu1, engine_requests, reconciles, leader = await loop.run_in_executor(
                None, parent.recv)  # fmt: skip
            parent.send("stop")
            placed = collections.Counter(machines.reported.values())
            await machines.stop()
            return {
                "submit_s": submit_s, "announce_s": announce_s, "started_s": started_s,
                "running_s": running_s, "sim": sim_requests, "engine": engine_requests,
                "engine_cpu": cpu1 - cpu0, "reconciles": reconciles, "leader": leader,
                "per_machine": (min(placed.values()), max(placed.values())),
                "machines_used": len(placed), "moves": machines.moves,
            }  # fmt: skip

    try:
        r = asyncio.run(main())
    finally:
        engine.join(15)
        if engine.is_alive():
            engine.kill()
            engine.join(5)
    sim, eng = r["sim"], r["engine"]
    # The starter (set_desired_state) sends a read and a write per unit; the rest of this
    # process's requests are the simulated agents' (state reports, presence, their watch).
    starter = {"GET": UNITS, "PUT": UNITS}
    agents = {k: v - starter.get(k, 0) for k, v in sim.items()}
    print(f"\nfleet scale: {MACHINES} machines, {UNITS} units, store={STORE} ({store_url})")
    print(f"  submit all (inactive):       {r['submit_s']:.1f} s")
    print(f"  announce machines:           {r['announce_s']:.1f} s")
    print(f"  start requests all sent:     {r['started_s']:.1f} s")
    print(f"  start -> all running:        {r['running_s']:.1f} s")
    print(f"  engine CPU in that phase:    {r['engine_cpu']:.1f} s "
          f"({r['reconciles']} reconciles, leader={r['leader']})")  # fmt: skip
    print(f"  engine requests:             {sum(eng.values())} {eng} "
          f"= {sum(eng.values()) / UNITS:.2f}/unit")  # fmt: skip
    print(f"  starter requests:            {sum(starter.values())} {starter} = 2.00/unit")
    print(f"  agents' requests:            {sum(agents.values())} {agents} "
          f"= {sum(agents.values()) / UNITS:.2f}/unit")  # fmt: skip
    print(f"  total store requests/unit:   {(sum(sim.values()) + sum(eng.values())) / UNITS:.2f}")
    print(f"  units per machine:           {r['per_machine'][0]}..{r['per_machine'][1]} "
          f"over {r['machines_used']} machines; moves {r['moves']}")
    print("  note: the simulated agents share one job/ watch; real agents hold one each, so "
          f"each job/ event is delivered {MACHINES} times")
    assert r["machines_used"] == min(MACHINES, UNITS)
