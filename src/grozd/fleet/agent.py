"""The agent: one per machine, running what the engine placed here.

It announces the machine (``machines/<id>/object`` with a TTL it keeps refreshing),
watches ``job/`` and makes the runner match: units placed here (and global units whose
``MachineMetadata=`` this machine satisfies) are loaded, and started or stopped per their
desired state; anything else the runner holds is stopped and unloaded. What each unit is
doing is reported under ``state/<unit>/<machine-id>`` whenever it changes.

Like fleet's agent it issues a start once per launch and leaves failures to the unit's
own ``Restart=``. After a restart it takes what the runner says is running as launched,
so running units are not restarted and missing ones are started. A clean shutdown
(`Agent.shutdown`) stops its units, clears their states and withdraws the machine so the
engine moves the units at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grozd.client import EtcdError, EtcdUnavailable, KeyNotFoundError
from grozd.fleet.model import ClusterModel
from grozd.fleet.registry import (
    INACTIVE,
    LAUNCHED,
    LOADED,
    MachineState,
    Registry,
    UnitStateRecord,
)
from grozd.fleet.runners import Runner, UnitState
from grozd.fleet.spec import UnitSpec

log = logging.getLogger(__name__)


class Agent:
    """Keeps this machine's runner in line with the registry; `run` until cancelled."""

    def __init__(
        self,
        registry: Registry,
        runner: Runner,
        machine: MachineState,
        *,
        ttl: int = 30,
        reconcile_interval: float = 30.0,
        debounce: float = 0.02,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.machine = machine
        self.ttl = max(1, int(ttl))
        self.reconcile_interval = reconcile_interval
        self.debounce = debounce
        self.model = ClusterModel(registry)
        # name -> (unit hash, what this agent did: "loaded" or "launched")
        self.agent_states: dict[str, tuple[str, str]] = {}
        self._reported: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._report_kick = asyncio.Event()
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._unloading: dict[str, asyncio.Task[None]] = {}
        self._stale_check = True
        self.reconciles = 0
        runner.subscribe(self._on_runner_change)

    @property
    def machine_id(self) -> str:
        return self.machine.id

    def kick(self) -> None:
        """Ask for a reconcile soon."""
        self._kick.set()

    def _on_runner_change(self, name: str, state: UnitState | None) -> None:
        self._dirty.add(name)
        self._report_kick.set()

    async def run(self) -> None:
        """Announce, reconcile on every change and periodically, report, heartbeat."""
        await self._announce()
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._heartbeat(), name="agent-heartbeat"),
            loop.create_task(self._reporter(), name="agent-reporter"),
        ]
        try:
            await self._sync_loop()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.model.stop_watching()

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        self._stale_check = True
        while True:
            full = loop.time() >= next_full or not self.model.watching
            try:
                if full:
                    await self.model.resync(self.kick, machines=False)
                    next_full = loop.time() + self.reconcile_interval
                await self.reconcile()
                if self._stale_check:
                    await self._drop_stale_states()
                    self._stale_check = False
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=agent_reconcile_failed error=%r", str(exc))
                next_full = loop.time() + min(1.0, self.reconcile_interval)
            timeout = max(0.0, next_full - loop.time())
            # asyncio.timeout rather than wait_for: 3.11's wait_for can swallow a cancel
            # that races the event being set, and shutdown would then hang.
            try:
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
                await asyncio.sleep(self.debounce)
            except TimeoutError:
                pass
            self._kick.clear()

    async def desired(self) -> dict[str, tuple[str, str, str]]:
        """What should be here: name -> (hash, unit text, "loaded" | "launched")."""
        wanted: dict[str, tuple[str, str, str]] = {}
        me = self.machine
        for name, job in list(self.model.jobs.items()):
            if not job.submitted or job.desired_state == INACTIVE or job.hash is None:
                continue
            if job.target != me.id:
                if job.target is not None:
                    continue
                spec = await self.model.spec(job)
                if not (
                    isinstance(spec, UnitSpec)
                    and spec.is_global
                    and not spec.is_template
                    and spec.options.metadata_matches(me.metadata)
                ):
                    continue
            text = await self.model.text(job.hash)
            if text is not None:
                wanted[name] = (job.hash, text, job.desired_state)
        return wanted

    async def reconcile(self) -> None:
        """Make the runner hold exactly the desired units, in their desired states."""
        async with self._lock:
            self.reconciles += 1
            desired = await self.desired()
            actual = self.runner.units()
            loop = asyncio.get_running_loop()
            for name in sorted(actual.keys() - desired.keys()):
                if name not in self._unloading:
                    # In the background: a unit slow to stop must not hold up the others.
                    log.info("event=unit_unload unit=%s machine=%s", name, self.machine_id)
                    self._unloading[name] = loop.create_task(self._unload(name))
            for name, (digest, text, want) in sorted(desired.items()):
                if name in self._unloading:
                    continue  # wanted again: act once the unload is over (it kicks us)
                current = actual.get(name)
                if current is None or current.hash != digest:
                    log.info("event=unit_load unit=%s machine=%s hash=%s",
                             name, self.machine_id, digest[:7])  # fmt: skip
                    await self.runner.load(name, text)
                    self.agent_states[name] = (digest, LOADED)
                    current = self.runner.units().get(name)
                    if current is None:
                        continue
                done = self.agent_states.get(name)
                if done is None or done[0] != digest:
                    # Not loaded by this agent instance: take what runs as launched.
                    done = (digest, LAUNCHED if current.is_active else LOADED)
                    self.agent_states[name] = done
                if want == LAUNCHED and done[1] != LAUNCHED:
                    log.info("event=unit_start unit=%s machine=%s", name, self.machine_id)
                    await self.runner.start(name)
                    self.agent_states[name] = (digest, LAUNCHED)
                elif want == LOADED and (done[1] == LAUNCHED or current.is_active):
                    log.info("event=unit_stop unit=%s machine=%s", name, self.machine_id)
                    await self.runner.stop(name)
                    self.agent_states[name] = (digest, LOADED)
                self._dirty.add(name)
            self._report_kick.set()

    async def _unload(self, name: str) -> None:
        try:
            await self.runner.unload(name)
        finally:
            self.agent_states.pop(name, None)
            self._unloading.pop(name, None)
            self._dirty.add(name)
            self._report_kick.set()
            self.kick()

    async def _drop_stale_states(self) -> None:
        """Clear states this machine reported before a restart for units it no longer has.

        Done once after (re)joining rather than on every pass: it reads every state.
        """
        units = self.runner.units()
        for name, mid in await self.registry.unit_states():
            if mid == self.machine_id and name not in units:
                log.info("event=stale_state_removed unit=%s machine=%s", name, mid)
                await self.registry.clear_state(name, mid)

    # -- reporting ----------------------------------------------------------------------

    async def _reporter(self) -> None:
        while True:
            await self._report_kick.wait()
            self._report_kick.clear()
            try:
                await self.flush_reports()
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=report_failed error=%r", str(exc))
                await asyncio.sleep(1.0)
                self._report_kick.set()
            except Exception:  # keep reporting whatever one state's problem was
                log.exception("event=report_crashed")
                await asyncio.sleep(1.0)
                self._report_kick.set()

    async def flush_reports(self) -> None:
        """Write the state of every unit that changed since the last flush."""
        while self._dirty:
            name = self._dirty.pop()
            # Read afresh for each: units change while earlier writes are in flight.
            state = self.runner.units().get(name)
            try:
                if state is None:
                    self._reported.pop(name, None)
                    await self.registry.clear_state(name, self.machine_id)
                    continue
                done = self.agent_states.get(name, (state.hash, LOADED))
                rec = UnitStateRecord(
                    name=name,
                    machine_id=self.machine_id,
                    unit_hash=state.hash,
                    load_state=state.load_state,
                    active_state=state.active_state,
                    sub_state=state.sub_state,
                    agent_state=done[1],
                )
                text = rec.to_json()
                if self._reported.get(name) != text:
                    await self.registry.report_state(rec)
                    self._reported[name] = text
            except BaseException:
                self._dirty.add(name)
                raise

    # -- presence -----------------------------------------------------------------------

    async def _announce(self) -> None:
        while True:
            try:
                await self.registry.announce(self.machine, self.ttl)
                log.info("event=machine_announced machine=%s", self.machine_id)
                return
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=announce_failed error=%r", str(exc))
                await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.registry.refresh_presence(self.machine_id, self.ttl)
            except KeyNotFoundError:
                # Our presence expired (etcd unreachable for a while, or a long pause): the
                # engine may have moved units and dropped our states. Come back and report
                # everything again.
                log.warning("event=presence_lost machine=%s", self.machine_id)
                await self._announce()
                self._reported.clear()
                self._dirty.update(self.runner.units())
                self._report_kick.set()
                self._stale_check = True
                self.kick()
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("event=heartbeat_failed error=%r", str(exc))

    async def shutdown(self) -> None:
        """Stop and unload every unit, clear their states, withdraw the machine."""
        async with self._lock:
            if self._unloading:
                await asyncio.gather(*self._unloading.values(), return_exceptions=True)
            for name in sorted(self.runner.units()):
                await self.runner.unload(name)
                self.agent_states.pop(name, None)
                with contextlib.suppress(EtcdError, EtcdUnavailable):
                    await self.registry.clear_state(name, self.machine_id)
            with contextlib.suppress(EtcdError, EtcdUnavailable):
                await self.registry.withdraw(self.machine_id)
        log.info("event=agent_stopped machine=%s", self.machine_id)
