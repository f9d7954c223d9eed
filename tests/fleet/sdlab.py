"""A real systemd as PID 1 of its own namespaces, for tests (root only).

It follows the shared recipe: the container gets its own cgroup2 subtree (moved there
before any systemd starts), its own pid, mount, cgroup, uts, ipc and net namespaces, a
throwaway tmpfs overlay over ``/``, read-only ``/proc/sys`` and ``/sys``. It is halted with
``SIGRTMIN+3`` to its PID 1 (recorded, never looked up by name) and its cgroups removed.

From the test process: the system bus is at `Container.bus_address`, files inside it
are under `Container.root`, and `Container.run` executes a command inside.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PID1_SCRIPT = r"""
set -e
NAME=$1; CGROOT=$2; B=$3
mkdir -p "$CGROOT/$NAME" && echo $$ > "$CGROOT/$NAME/cgroup.procs"
mkdir -p "$B"
exec unshare --pid --fork --mount --cgroup --uts --ipc --net --propagation private bash -c '
  set -e; B=$1; NAME=$2
  mount -t tmpfs tmpfs $B && mkdir $B/upper $B/work $B/root && R=$B/root
  mount -t overlay overlay -o lowerdir=/,upperdir=$B/upper,workdir=$B/work $R
  mount -t proc proc $R/proc
  mount --bind $R/proc/sys $R/proc/sys && mount -o remount,bind,ro $R/proc/sys
  mount -t sysfs -o ro sysfs $R/sys
  mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
  mount -t tmpfs -o mode=755 tmpfs $R/dev
  for d in null zero full random urandom tty; do
    touch $R/dev/$d; mount --bind /dev/$d $R/dev/$d
  done
  mkdir $R/dev/pts $R/dev/shm
  mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts && ln -s pts/ptmx $R/dev/ptmx
  touch $R/dev/console && mount --bind /dev/null $R/dev/console
  mount -t tmpfs tmpfs $R/run; mount -t tmpfs tmpfs $R/tmp
  hostname "$NAME"
  cd $R && mkdir -p .oldroot && pivot_root . .oldroot && umount -l /.oldroot
  exec setpriv \
    --bounding-set=-sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-mac_admin,-mac_override \
    env -i container=fleet-test /lib/systemd/systemd systemd.unit=basic.target
' _ "$B" "$NAME"
"""


def cgroup2_root() -> Path | None:
    """A writable cgroup2 hierarchy: pure v2, or the "unified" mount of a hybrid host."""
    for path in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        with contextlib.suppress(OSError):
            if os.statvfs(path) and _fstype(path) == "cgroup2fs":
                return path
    return None


def _fstype(path: Path) -> str:
    out = subprocess.run(["stat", "-fc", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def skip_unless_possible() -> Path:
    """The cgroup2 root to use; skips the test (with the reason) when it cannot work."""
    if os.geteuid() != 0:
        pytest.skip("a test systemd needs root")
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("systemd is not installed")
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is missing")
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy available")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--cgroup", "--uts",
                            "--ipc", "--net", "true"], capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"unshare failed: {probe.stderr.strip()}")
    return root


class Container:
    """One systemd 252 running as PID 1 of its own namespaces."""

    def __init__(self, tmp: Path, cgroot: Path) -> None:
        self.name = f"gzsd-{secrets.token_hex(4)}"
        self.cgroot = cgroot
        self.base = Path("/tmp") / f"sd-pid1-{self.name}"
        self.log = tmp / f"{self.name}.log"
        self.script = tmp / f"{self.name}.sh"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    @property
    def root(self) -> Path:
        """The container's ``/`` as the test process sees it."""
        return Path(f"/proc/{self.pid1}/root")

    @property
    def bus_address(self) -> str:
        """Its system bus (socket-activated on connect)."""
        return f"unix:path={self.root}/run/dbus/system_bus_socket"

    def start(self, timeout: float = 20.0) -> None:
        self.script.write_text(PID1_SCRIPT)
        with open(self.log, "wb") as log:
            # The script execs unshare: this PID is unshare's; PID 1 is its only child.
            self.proc = subprocess.Popen(
                ["bash", str(self.script), self.name, str(self.cgroot), str(self.base)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"container exited: {self.log.read_text(errors='replace')}")
            if not self.pid1:
                self.pid1 = self._child()
            if self.pid1:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"systemd did not come up (state {state!r})")

    def _child(self) -> int:
        """PID 1: unshare's child, once the script has exec'd unshare (never earlier, when
        bash's children are short-lived helpers)."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            if Path(f"/proc/{self.proc.pid}/comm").read_text().strip() != "unshare":
                return 0
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            kids = path.read_text().split()
            if kids:
                return int(kids[0])
        return 0

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces)."""
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *args],
                              capture_output=True, text=True, timeout=30, check=check)  # fmt: skip

    def stop(self) -> None:
        """Halt PID 1 (SIGRTMIN+3), wait, then remove the cgroup subtree and state dir."""
        if self.proc is not None:
            if self.pid1 > 1 and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 3)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                # PID 1 of a pid namespace: SIGKILL ends the whole namespace.
                if self.pid1 > 1:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid1, signal.SIGKILL)
                self.proc.wait(10)
        top = self.cgroot / self.name
        if top.is_dir():
            for sub in sorted((p for p in top.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):  # fmt: skip
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
        with contextlib.suppress(OSError):
            self.base.rmdir()


@contextlib.contextmanager
def container(tmp: Path) -> Iterator[Container]:
    """A started container, always stopped and cleaned up afterwards."""
    cgroot = skip_unless_possible()
    c = Container(tmp, cgroot)
    try:
        c.start()
        yield c
    finally:
        c.stop()
