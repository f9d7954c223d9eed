"""How an agent runs units on its machine: the `Runner` interface.

fleet drives systemd over D-Bus; grozd keeps that boundary as an interface so the agent
does not care what sits behind it. `grozd.fleet.runners.supervisor.Supervisor` is the
embedded supervisor used when systemd is not PID 1; a systemd D-Bus runner can implement
the same methods (load = write the unit file and daemon-reload, start/stop = StartUnit /
StopUnit, units() = ListUnits, subscribe = PropertiesChanged signals);
`grozd.fleet.runners.systemd.SystemdRunner` does so, and ``auto`` picks it when systemd
is PID 1.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UnitState:
    """systemd's view of one unit (LoadState/ActiveState/SubState) and its file's hash."""

    load_state: str
    active_state: str
    sub_state: str
    hash: str = ""

    @property
    def is_active(self) -> bool:
        """Running or on its way there (so a start request would change nothing)."""
        return self.active_state in ("active", "activating", "reloading")


StateCallback = Callable[[str, "UnitState | None"], None]


class RunnerError(Exception):
    """A runner operation that failed (unknown unit, unsupported request ...)."""


class Runner(abc.ABC):
    """Loads, starts and stops unit files on this machine and reports their states.

    `start` and `stop` return once the request is accepted (like a systemd job queued in
    "replace" mode); progress arrives through `subscribe` callbacks, which get
    ``(name, state)`` on every change and ``(name, None)`` when a unit is unloaded.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Get ready (and clean up what an earlier instance may have left behind)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every unit this runner started and release its resources."""

    @abc.abstractmethod
    async def load(self, name: str, text: str) -> None:
        """Make unit ``name`` known with this file content (replacing older content)."""

    @abc.abstractmethod
    async def unload(self, name: str) -> None:
        """Stop (if needed) and forget unit ``name``; waits until it is stopped."""

    @abc.abstractmethod
    async def start(self, name: str) -> None:
        """Ask for ``name`` to be started."""

    @abc.abstractmethod
    async def stop(self, name: str) -> None:
        """Ask for ``name`` to be stopped."""

    @abc.abstractmethod
    def units(self) -> dict[str, UnitState]:
        """Every loaded unit and its current state."""

    @abc.abstractmethod
    def subscribe(self, callback: StateCallback) -> None:
        """Call ``callback(name, state)`` on every state change."""

    @abc.abstractmethod
    async def status(self, name: str) -> tuple[str, int]:
        """``systemctl status``-style text and its exit code (0 active, 3 not, 4 unknown)."""

    @abc.abstractmethod
    def journal(self, name: str, lines: int = 10, follow: bool = False) -> AsyncIterator[str]:
        """The unit's last ``lines`` journal lines, then (``follow``) new ones as they come."""


def systemd_is_pid1() -> bool:
    """True when systemd manages this machine (sd_booted(): /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir() and os.path.exists("/proc/1/comm") and (
        Path("/proc/1/comm").read_text().strip() == "systemd"
    )


def make_runner(kind: str, state_dir: str | os.PathLike[str], **options: object) -> Runner:
    """The runner named ``kind``: ``supervisor``, ``systemd`` or ``auto``."""
    from grozd.fleet.runners.supervisor import Supervisor

    if kind == "auto":
        kind = "systemd" if systemd_is_pid1() else "supervisor"
    if kind == "supervisor":
        return Supervisor(Path(state_dir), **options)  # type: ignore[arg-type]
    if kind == "systemd":
        try:
            from grozd.fleet.runners.systemd import SystemdRunner
        except ImportError as exc:
            raise RunnerError(f"the systemd runner needs dbus-fast: {exc}") from None
        return SystemdRunner(Path(state_dir), **options)  # type: ignore[arg-type]
    raise RunnerError(f"unknown runner {kind!r}")
