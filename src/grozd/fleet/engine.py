"""The engine: one per cluster at a time, placing units on machines.

Every fleetd runs an engine candidate. Candidates race to create the lease key
(``engine/leader``, a TTL key); the winner renews it well inside its TTL and the others
watch it, trying again when it goes away. A leader that cannot renew in time stops
writing before its lease can have lapsed, so two engines never act at once for longer
than a clock skew.

The leader keeps a `ClusterModel` current from watches on ``job/`` and ``machines/`` and
reconciles (`grozd.fleet.scheduler.schedule`) shortly after each change, writing only
placements that differ. A periodic full reload is the backstop; it also removes debris
(job directories without a unit, states of units or machines that are gone, unit
contents no unit has referred to for a whole reload interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from grozd.client import EtcdError, EtcdUnavailable
from grozd.fleet.model import ClusterModel
from grozd.fleet.registry import INACTIVE, Registry
from grozd.fleet.scheduler import Placement, SchedUnit, schedule
from grozd.fleet.spec import UnitSpec

log = logging.getLogger(__name__)


class Engine:
    """An engine candidate; `run` until `stop`."""

    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        *,
        lease_ttl: int = 10,
        reconcile_interval: float = 10.0,
        debounce: float = 0.02,
    ) -> None:
        self.registry = registry
        self.machine_id = machine_id
        self.lease_ttl = max(1, int(lease_ttl))
        self.reconcile_interval = reconcile_interval
        self.debounce = debounce
        self.holder = f"{machine_id} {secrets.token_hex(6)}"
        self.model = ClusterModel(registry)
        self.reconciles = 0
        self._leading = False
        self._kick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._unreferenced: set[str] = set()
        # (unit, content hash) pairs whose unit-file warnings were already logged.
        self._warned: set[tuple[str, str]] = set()

    @property
    def is_leader(self) -> bool:
        """True while this candidate holds the lease and acts on it."""
        return self._leading

    def stop(self) -> None:
        """Ask `run` to return (releasing the lease if held)."""
        self._stopping.set()

    def kick(self) -> None:
        """Ask for a reconcile soon."""
        self._kick.set()

    async def run(self) -> None:
        """Campaign for the lease, lead while holding it, until stopped."""
        try:
            while not self._stopping.is_set():
                try:
                    won = await self.registry.acquire_lease(self.holder, self.lease_ttl)
                except (EtcdError, EtcdUnavailable) as exc:
                    log.warning("event=lease_error error=%r", str(exc))
                    won = False
                if won:
                    log.info("event=engine_elected machine=%s", self.machine_id)
                    await self._lead()
                    continue
                await self._await_vacancy()
        finally:
            self._leading = False
            await self.model.stop_watching()

    async def _await_vacancy(self) -> None:
        """Wait until the lease key goes away (or a while, or until stopped)."""
        watch = asyncio.ensure_future(
            self.registry.client.watch(self.registry.lease_key, timeout=self.lease_ttl)
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({watch, stop}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not watch.cancelled() and watch.exception() is not None:
                # etcd unreachable or the like: do not spin.
                await asyncio.sleep(min(1.0, self.lease_ttl / 3))
        finally:
            for fut in (watch, stop):
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fut

    async def _lead(self) -> None:
        loop = asyncio.get_running_loop()
        self._leading = True
        renewer = loop.create_task(self._renew(), name="engine-renew")
        worker = loop.create_task(self._work(), name="engine-work")
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({renewer, worker, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._leading = False
            for task in (renewer, worker, stop):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.model.stop_watching()
            if worker.done() and not worker.cancelled() and worker.exception() is not None:
                log.error("event=engine_failed error=%r", str(worker.exception()))
            if self._stopping.is_set():
                with contextlib.suppress(EtcdError, EtcdUnavailable):
                    await self.registry.release_lease(self.holder)
            log.info("event=engine_stepped_down machine=%s", self.machine_id)

    async def _renew(self) -> None:
        """Renew every TTL/3; return (step down) once the lease is lost or may have lapsed."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if not await self.registry.renew_lease(self.holder, self.lease_ttl):
                    log.warning("event=lease_lost machine=%s", self.machine_id)
                    return
                last_ok = loop.time()
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=lease_renew_failed error=%r", str(exc))
                # Stop acting well before another candidate could have taken over.
                if loop.time() - last_ok > self.lease_ttl * 2 / 3:
                    return

    async def _work(self) -> None:
        await self.model.resync(self.kick)
        await self.reconcile(full=True)
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.reconcile_interval
        while True:
            timeout = max(0.0, next_full - loop.time())
            try:
                # Not wait_for: on 3.11 it can swallow a cancel racing the event.
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            except TimeoutError:
                pass
            full = loop.time() >= next_full or not self.model.watching
            if not full:
                # Let a burst of events (a whole fleetctl command) land first.
                await asyncio.sleep(self.debounce)
            self._kick.clear()
            try:
                if full:
                    await self.model.resync(self.kick)
                    next_full = loop.time() + self.reconcile_interval
                await self.reconcile(full=full)
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=reconcile_failed error=%r", str(exc))
                await asyncio.sleep(min(1.0, self.reconcile_interval))
                next_full = loop.time()

    async def reconcile(self, full: bool = False) -> dict[str, Placement]:
        """Place units per the model and write what changed; returns the plan."""
        self.reconciles += 1
        model = self.model
        units: dict[str, SchedUnit] = {}
        debris: list[str] = []
        for name, job in list(model.jobs.items()):
            if not job.submitted:
                debris.append(name)
                continue
            if job.desired_state == INACTIVE:
                units[name] = SchedUnit(name, job.desired_state, job.target)
                continue
            spec = await model.spec(job)
            if isinstance(spec, UnitSpec):
                self._log_warnings(name, spec)
                error = None
                if spec.is_template:
                    error = "template units are not scheduled; start an instance of it"
                units[name] = SchedUnit(name, job.desired_state, job.target, spec.options, error)
            else:
                units[name] = SchedUnit(name, job.desired_state, job.target, None, spec)
        plan = schedule(units, model.machines)
        for name, placement in sorted(plan.items()):
            if not self._leading:
                return plan
            job = model.jobs.get(name)
            if job is None:
                continue
            if placement.machine is not None:
                if job.target != placement.machine or job.reason is not None:
                    log.info(
                        "event=unit_placed unit=%s machine=%s previous=%s",
                        name, placement.machine, job.target,
                    )  # fmt: skip
                    await self.registry.set_target(
                        name, placement.machine, clear_reason=job.reason is not None
                    )
                    job.target, job.reason = placement.machine, None
            elif job.target is not None or job.reason != placement.reason:
                if placement.reason:
                    log.info("event=unit_unplaceable unit=%s reason=%r", name, placement.reason)
                await self.registry.clear_target(name, placement.reason)
                job.target, job.reason = None, placement.reason
        # Global units have no target: drop one left by an earlier, non-global version.
        for name, unit in units.items():
            job = model.jobs.get(name)
            if unit.is_global and job is not None and (job.target or job.reason):
                await self.registry.clear_target(name)
                job.target = job.reason = None
        for name in debris:
            if self._leading:
                log.info("event=debris_removed unit=%s", name)
                await self.registry.delete_job_dir(name)
                model.jobs.pop(name, None)
        if full and self._leading:
            await self._collect_garbage()
        return plan

    def _log_warnings(self, name: str, spec: UnitSpec) -> None:
        """Log the [X-Fleet] keys fleet ignores in ``spec``, once per unit content."""
        key = (name, spec.hash)
        if key in self._warned:
            return
        self._warned.add(key)
        for warning in spec.unit.fleet_warnings():
            log.warning("event=unit_warning unit=%s warning=%r", name, warning)

    async def _collect_garbage(self) -> None:
        """Drop states nobody should report any more, and long-unreferenced contents."""
        jobs = self.model.jobs
        machines = self.model.machines
        for (name, mid), _rec in (await self.registry.unit_states()).items():
            if name not in jobs or mid not in machines:
                log.info("event=state_removed unit=%s machine=%s", name, mid)
                await self.registry.clear_state(name, mid)
        referenced = {job.hash for job in jobs.values() if job.hash}
        stored = await self.registry.unit_hashes()
        unreferenced = {h for h in stored if h not in referenced}
        # Only what was already unreferenced one full pass ago: a fleetctl writes the
        # content a moment before the unit that refers to it.
        for digest in unreferenced & self._unreferenced:
            await self.registry.delete_unit_text(digest, stored[digest])
        self._unreferenced = unreferenced
