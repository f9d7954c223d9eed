"""An in-memory view of the registry's jobs and machines, kept current by watches.

The engine and the agents read the registry once (`ClusterModel.load`), then apply each
watch event to this copy instead of re-reading everything; a periodic full reload
(`load` again, watches restarted from the new index) is the backstop against drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import Callable

from grozd.client import EtcdError, Response
from grozd.fleet.registry import (
    JobRecord,
    MachineState,
    Registry,
    apply_job_leaf,
    parse_jobs,
    parse_machines,
)
from grozd.fleet.spec import UnitFileError, UnitSpec, spec_for

log = logging.getLogger(__name__)

_SET_ACTIONS = frozenset({"set", "create", "update", "compareAndSwap"})
_DELETE_ACTIONS = frozenset({"delete", "expire", "compareAndDelete"})


class ClusterModel:
    """Jobs and machines as last seen, plus a cache of unit texts (immutable by hash)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.jobs: dict[str, JobRecord] = {}
        self.machines: dict[str, MachineState] = {}
        self._texts: dict[str, str] = {}
        self._watchers: list[asyncio.Task[None]] = []

    async def load(self) -> tuple[int, int]:
        """Read jobs and machines afresh; returns the etcd index of each read."""
        jobs, jobs_index = await self.registry.jobs()
        machines, machines_index = await self.registry.machines()
        self.jobs, self.machines = jobs, machines
        return jobs_index, machines_index

    async def resync(self, on_change: Callable[[], None], machines: bool = True) -> None:
        """Reload and (re)start the watches from the reload's index.

        Restarting matters: a watch still delivering events older than the reload would
        otherwise roll the fresh copy back.
        """
        await self.stop_watching()
        jobs_index, machines_index = await self.load()
        loop = asyncio.get_running_loop()
        self._watchers.append(
            loop.create_task(self._watch("jobs", jobs_index + 1, on_change), name="watch-jobs")
        )
        if machines:
            self._watchers.append(
                loop.create_task(
                    self._watch("machines", machines_index + 1, on_change), name="watch-machines"
                )
            )

    async def stop_watching(self) -> None:
        """Cancel the watch tasks."""
        tasks, self._watchers = self._watchers, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def watching(self) -> bool:
        """True while every watch task is alive."""
        return bool(self._watchers) and not any(t.done() for t in self._watchers)

    async def _watch(self, which: str, index: int, on_change: Callable[[], None]) -> None:
        key = self.registry.jobs_dir if which == "jobs" else self.registry.machines_dir
        client = self.registry.client
        while True:
            try:
                async for resp in client.watch_iter(key, index, recursive=True, give_up_after=None):
                    if resp.node is not None:
                        index = resp.node.modified_index + 1
                    apply = self.apply_jobs if which == "jobs" else self.apply_machines
                    if apply(resp):
                        on_change()
            except EtcdError as exc:
                # e.g. a 5xx while etcd elects a leader; the full reload will catch up.
                log.warning("event=watch_error tree=%s error=%r", which, str(exc))
                await asyncio.sleep(1.0)
                on_change()

    # -- events -----------------------------------------------------------------------

    def apply_jobs(self, resp: Response) -> bool:
        """Apply one watch event under ``job/``; True if anything may have changed."""
        base = self.registry.jobs_dir
        if resp.action == "get":
            # watch_iter resynchronised after falling too far behind: take the full copy.
            self.jobs = parse_jobs(resp.node, base)
            return True
        node = resp.node
        if node is None:
            return False
        rel = posixpath.relpath(node.key, base)
        if rel.startswith(".."):
            return False
        parts = [] if rel == "." else rel.split("/")
        deleting = resp.action in _DELETE_ACTIONS
        if not parts:
            if deleting:
                self.jobs.clear()
                return True
            return False
        if len(parts) == 1:
            if deleting:
                return self.jobs.pop(parts[0], None) is not None
            return False
        if len(parts) != 2:
            return False
        if deleting:
            apply_job_leaf(self.jobs, parts[0], parts[1], None)
        elif resp.action in _SET_ACTIONS:
            apply_job_leaf(self.jobs, parts[0], parts[1], node.value)
        else:
            return False
        return True

    def apply_machines(self, resp: Response) -> bool:
        """Apply one watch event under ``machines/``."""
        base = self.registry.machines_dir
        if resp.action == "get":
            self.machines = parse_machines(resp.node, base)
            return True
        node = resp.node
        if node is None:
            return False
        rel = posixpath.relpath(node.key, base)
        if rel.startswith(".."):
            return False
        parts = [] if rel == "." else rel.split("/")
        if resp.action in _DELETE_ACTIONS:
            if not parts:
                self.machines.clear()
                return True
            return self.machines.pop(parts[0], None) is not None
        if resp.action in _SET_ACTIONS and len(parts) == 2 and parts[1] == "object":
            try:
                machine = MachineState.from_json(node.value or "")
            except ValueError:
                return False
            if self.machines.get(machine.id) == machine:
                return False
            self.machines[machine.id] = machine
            return True
        return False

    # -- unit contents ------------------------------------------------------------------

    async def text(self, digest: str) -> str | None:
        """Unit text by hash (cached: content under a hash never changes)."""
        text = self._texts.get(digest)
        if text is None:
            text = await self.registry.unit_text(digest)
            if text is not None:
                self._texts[digest] = text
        return text

    async def spec(self, job: JobRecord) -> UnitSpec | str:
        """The job's parsed unit, or a reason why there is none."""
        if job.hash is None:
            return "unit was not submitted"
        text = await self.text(job.hash)
        if text is None:
            return f"unit content {job.hash[:7]} is missing from the registry"
        spec = spec_for(job.name, text)
        if isinstance(spec, UnitFileError):
            return f"invalid unit file: {spec}"
        return spec
