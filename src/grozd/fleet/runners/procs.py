"""Finding, signalling and reaping a unit's processes without cgroups.

systemd knows a unit's processes by its cgroup. The embedded supervisor approximates
that with two marks every process of the unit inherits: the process group(s) it starts
the unit's commands in, and ``INVOCATION_ID=<id>`` in the environment (systemd sets the
same variable). A process that leaves the group (``setsid``) keeps the variable; one
that also scrubs its environment escapes, which cgroups would have prevented.

With `become_subreaper` orphans of a unit (a forking daemon's grandchild, the children
of a killed shell) are re-parented to the supervisor rather than to PID 1, so their exit
status is ours to collect and none stays a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/<pid>/stat shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    comm: str
    starttime: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcInfo | None:
    """Parse /proc/<pid>/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is in parentheses and may itself contain spaces and ')'.
    close = data.rfind(b")")
    comm = data[data.find(b"(") + 1 : close].decode("utf-8", "replace")
    fields = data[close + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0].decode(),
            comm=comm,
            starttime=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (its comm in brackets when it has none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        raw = b""
    if not raw:
        info = read_stat(pid)
        return f"[{info.comm}]" if info else "?"
    return " ".join(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0"))


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def all_pids() -> list[int]:
    """Every PID in /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def unit_processes(pgids: Iterable[int], marker: bytes | None) -> list[ProcInfo]:
    """Processes in one of ``pgids`` or carrying ``marker`` in their environment."""
    groups = set(pgids)
    me = os.getpid()
    found = []
    for pid in all_pids():
        if pid == me:
            continue
        info = read_stat(pid)
        if info is None:
            continue
        if info.pgid in groups or (marker is not None and not info.zombie
                                   and _has_marker(pid, marker)):  # fmt: skip
            found.append(info)
    return found


def signal_processes(procs: Iterable[ProcInfo], sig: int) -> int:
    """Send ``sig`` to each live process; returns how many were signalled."""
    count = 0
    for info in procs:
        if info.zombie:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(info.pid, sig)
            count += 1
    return count


def signal_groups(pgids: Iterable[int], sig: int) -> None:
    """killpg each group: also reaches processes forked after the last scan."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def reap_zombies(procs: Iterable[ProcInfo], skip: Iterable[int] = ()) -> list[tuple[int, int]]:
    """Collect those of ``procs`` that are our own zombie children; (pid, status) each.

    ``skip`` names PIDs someone else waits for (a main process with its own watcher).
    """
    me = os.getpid()
    skipped = set(skip)
    reaped = []
    for info in procs:
        if info.zombie and info.ppid == me and info.pid not in skipped:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(info.pid, os.WNOHANG)
                if pid:
                    reaped.append((pid, status))
    return reaped


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); True on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    info = read_stat(pid)
    return info is not None and not info.zombie
