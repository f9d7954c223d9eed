"""The systemd runner: units run by systemd itself, driven over D-Bus (``dbus-fast``).

Used when systemd is PID 1 (``--runner auto`` picks it then, or ``--runner systemd``).
Like fleet it keeps its unit files in a directory of its own (``/run/grozd/fleet/units``)
and links them into ``/run/systemd/system`` as runtime units (``LinkUnitFiles``), then
``Reload``\\s. Starting and stopping are ``StartUnit``/``StopUnit`` jobs in "replace" mode,
whose results arrive as ``JobRemoved`` signals; unit states follow ``PropertiesChanged``
signals of each unit object (``ActiveState``/``SubState``/``LoadState``).

Every file in the runner's own directory is a unit it manages: after a restart those are
taken over as they are (running units keep running), so the agent sees them as before.

``root`` lets the runner drive a systemd whose ``/`` is elsewhere (a test container seen
through ``/proc/<pid>/root``): files are written below it, paths given to systemd are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from grozd.fleet.runners import Runner, RunnerError, StateCallback, UnitState
from grozd.fleet.unit import content_hash

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
DEFAULT_UNIT_DIR = "/run/grozd/fleet/units"

_MATCHES = (
    f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'",
    f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',member='PropertiesChanged',"
    f"path_namespace='{MANAGER_PATH}/unit',arg0='{UNIT}'",
)


class DBusError(RunnerError):
    """A D-Bus call that systemd (or the bus) answered with an error."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name


class SystemdRunner(Runner):
    """Runs units through systemd's D-Bus API."""

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        bus_address: str = SYSTEM_BUS,
        unit_dir: str = DEFAULT_UNIT_DIR,
        root: Path | str = "/",
        context: object | None = None,
    ) -> None:
        # state_dir and context are accepted for make_runner's sake: systemd keeps the
        # journal and expands specifiers itself.
        self.bus_address = bus_address
        self.unit_dir = unit_dir
        self.root = Path(root)
        self._bus: MessageBus | None = None
        self._units: dict[str, UnitState] = {}
        self._paths: dict[str, str] = {}  # unit object path -> name
        self._callbacks: list[StateCallback] = []
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished: dict[str, str] = {}  # job path -> result, for early signals
        self._pending: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()

    # -- D-Bus plumbing -------------------------------------------------------------------

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None,
                    *, path: str = MANAGER_PATH, interface: str = MANAGER,
                    destination: str = SYSTEMD) -> list[Any]:  # fmt: skip
        if self._bus is None:
            raise RunnerError("the systemd runner is not open")
        reply = await self._bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=body or [],
        ))  # fmt: skip
        if reply is None:
            return []
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise DBusError(reply.error_name or "error", str(text))
        return list(reply.body)

    async def _get(self, path: str, interface: str, prop: str) -> Any:
        (value,) = await self._call("Get", "ss", [interface, prop], path=path,
                                    interface=PROPERTIES)  # fmt: skip
        return value.value if isinstance(value, Variant) else value

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "JobRemoved" and msg.interface == MANAGER:
            _id, job, unit, result = msg.body
            fut = self._jobs.pop(job, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
            else:  # the reply carrying the job path may not have been handled yet
                self._finished[job] = result
                if len(self._finished) > 1024:
                    self._finished.pop(next(iter(self._finished)))
            if result not in ("done", "skipped") and unit in self._units:
                log.warning("event=systemd_job_failed unit=%s result=%s", unit, result)
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            name = self._paths.get(msg.path or "")
            if name is None or not msg.body or msg.body[0] != UNIT:
                return
            changed: dict[str, Variant] = msg.body[1]
            old = self._units.get(name)
            if old is None:
                return
            new = UnitState(
                _str(changed.get("LoadState"), old.load_state),
                _str(changed.get("ActiveState"), old.active_state),
                _str(changed.get("SubState"), old.sub_state),
                old.hash,
            )
            if new != old:
                self._set(name, new)
            if "ActiveState" in msg.body[2] or "SubState" in msg.body[2]:
                self._spawn(self._refresh(name))  # invalidated, not sent: read them

    def _set(self, name: str, state: UnitState | None) -> None:
        if state is None:
            self._units.pop(name, None)
        else:
            self._units[name] = state
        for cb in list(self._callbacks):
            try:
                cb(name, state)
            except Exception:  # one bad subscriber must not stop the others
                log.exception("event=runner_callback_failed unit=%s", name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _refresh(self, name: str) -> None:
        """Read a unit's states afresh (on load, and after an invalidation)."""
        old = self._units.get(name)
        if old is None:
            return
        path = next((p for p, n in self._paths.items() if n == name), None)
        if path is None:
            return
        with contextlib.suppress(DBusError):
            values = [await self._get(path, UNIT, p)
                      for p in ("LoadState", "ActiveState", "SubState")]  # fmt: skip
            if name in self._units:
                new = UnitState(values[0], values[1], values[2], self._units[name].hash)
                if new != self._units[name]:
                    self._set(name, new)

    def _track(self, job: str) -> asyncio.Future[str]:
        fut = self._jobs.get(job)
        if fut is None:
            fut = self._jobs[job] = asyncio.get_running_loop().create_future()
        result = self._finished.pop(job, None)
        if result is not None and not fut.done():
            fut.set_result(result)
            self._jobs.pop(job, None)
        return fut

    # -- Runner ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, subscribe, and take over the units our directory already holds."""
        self._bus = await MessageBus(bus_address=self.bus_address,
                                     bus_type=BusType.SYSTEM).connect()  # fmt: skip
        self._bus.add_message_handler(self._on_message)
        for rule in _MATCHES:
            await self._call("AddMatch", "s", [rule], path="/org/freedesktop/DBus",
                             interface="org.freedesktop.DBus",
                             destination="org.freedesktop.DBus")  # fmt: skip
        await self._call("Subscribe")
        files = self._host_dir()
        if files.is_dir():
            for path in sorted(files.iterdir()):
                text = path.read_text()
                self._units[path.name] = UnitState("", "", "", content_hash(text))
                await self._track_unit(path.name)

    async def close(self) -> None:
        """Stop and unload every unit this runner manages, then disconnect."""
        for name in sorted(self._units):
            with contextlib.suppress(RunnerError, TimeoutError):
                await self.unload(name)
        for task in list(self._pending):
            task.cancel()
        if self._bus is not None:
            with contextlib.suppress(DBusError):
                await self._call("Unsubscribe")
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                await self._bus.wait_for_disconnect()
            self._bus = None

    def _host_dir(self) -> Path:
        return self.root / self.unit_dir.lstrip("/")

    async def _track_unit(self, name: str) -> None:
        (path,) = await self._call("LoadUnit", "s", [name])
        self._paths[path] = name
        await self._refresh(name)

    async def load(self, name: str, text: str) -> None:
        """Write the file, link it into /run/systemd/system, reload, load the unit."""
        async with self._lock:
            host = self._host_dir()
            host.mkdir(parents=True, exist_ok=True)
            tmp = host / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, host / name)
            await self._call("LinkUnitFiles", "asbb",
                             [[f"{self.unit_dir}/{name}"], True, True])  # fmt: skip
            await self._call("Reload")
            old = self._units.get(name)
            self._units[name] = UnitState(
                old.load_state if old else "", old.active_state if old else "",
                old.sub_state if old else "", content_hash(text),
            )  # fmt: skip
            await self._track_unit(name)
            self._set(name, self._units[name])

    async def unload(self, name: str) -> None:
        """Stop the unit (waiting for the job), unlink its file, reload."""
        if name not in self._units:
            return
        # Not under the lock: a unit slow to stop must not hold up loads of others.
        with contextlib.suppress(DBusError):
            await self.run_job("StopUnit", name, timeout=120)
        async with self._lock:
            if name not in self._units:
                return
            with contextlib.suppress(DBusError):
                await self._call("ResetFailedUnit", "s", [name])
            with contextlib.suppress(DBusError):
                await self._call("DisableUnitFiles", "asb", [[name], True])
            with contextlib.suppress(FileNotFoundError):
                (self._host_dir() / name).unlink()
            with contextlib.suppress(DBusError):
                await self._call("Reload")
            for path in [p for p, n in self._paths.items() if n == name]:
                del self._paths[path]
            self._set(name, None)

    async def run_job(self, method: str, name: str, timeout: float | None = None) -> str:
        """``StartUnit``/``StopUnit``/``RestartUnit`` and wait: the job's result."""
        (job,) = await self._call(method, "ss", [name, "replace"])
        fut = self._track(job)
        async with asyncio.timeout(timeout):
            return await fut

    async def _request(self, method: str, name: str) -> None:
        if name not in self._units:
            raise RunnerError(f"unit {name} is not loaded")
        (job,) = await self._call(method, "ss", [name, "replace"])
        fut = self._track(job)

        def done(f: asyncio.Future[str]) -> None:
            if not f.cancelled():
                log.info("event=systemd_job unit=%s method=%s result=%s",
                         name, method, f.result())  # fmt: skip

        fut.add_done_callback(done)

    async def start(self, name: str) -> None:
        """Queue a start job (its result is logged when ``JobRemoved`` arrives)."""
        await self._request("StartUnit", name)

    async def stop(self, name: str) -> None:
        """Queue a stop job."""
        await self._request("StopUnit", name)

    def units(self) -> dict[str, UnitState]:
        """Every managed unit and its last known state."""
        return dict(self._units)

    def subscribe(self, callback: StateCallback) -> None:
        """Call ``callback(name, state)`` on every change."""
        self._callbacks.append(callback)

    async def status(self, name: str) -> tuple[str, int]:
        """A ``systemctl status``-like summary from the unit's properties."""
        try:
            (path,) = await self._call("GetUnit", "s", [name])
        except DBusError:
            return f"Unit {name} could not be found.\n", 4
        props: dict[str, Any] = {}
        for iface, prop in ((UNIT, "Description"), (UNIT, "LoadState"),
                            (UNIT, "FragmentPath"), (UNIT, "ActiveState"),
                            (UNIT, "SubState"), (UNIT, "StateChangeTimestamp")):  # fmt: skip
            props[prop] = await self._get(path, iface, prop)
        with contextlib.suppress(DBusError):
            props["MainPID"] = await self._get(path, SERVICE, "MainPID")
        active = props["ActiveState"]
        since = ""
        if props["StateChangeTimestamp"]:
            when = datetime.fromtimestamp(props["StateChangeTimestamp"] / 1e6)
            since = f" since {when:%a %Y-%m-%d %H:%M:%S}"
        lines = [
            f"● {name} - {props['Description']}",
            f"     Loaded: {props['LoadState']} ({props['FragmentPath']})",
            f"     Active: {active} ({props['SubState']}){since}",
        ]
        if props.get("MainPID"):
            lines.append(f"   Main PID: {props['MainPID']}")
        code = 0 if active in ("active", "reloading") else 3
        return "\n".join(lines) + "\n", code

    async def journal(self, name: str, lines: int = 10, follow: bool = False) -> AsyncIterator[str]:
        """The unit's journal through ``journalctl`` (``--root`` when not at ``/``)."""
        args = ["journalctl", "-u", name, "-n", str(lines), "-o", "short", "--no-pager",
                "--no-hostname", "-q"]  # fmt: skip
        if str(self.root) != "/":
            args.append(f"--root={self.root}")
        if follow:
            args.append("--follow")
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                yield line.decode("utf-8", "replace")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()


def _str(value: Variant | None, default: str) -> str:
    return str(value.value) if value is not None else default
