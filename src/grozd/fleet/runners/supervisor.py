"""The embedded supervisor: runs service units the way systemd would, without systemd.

For machines where systemd is not PID 1. It reads the same unit files
(`grozd.fleet.runners.settings`) and follows systemd 252's service state machine:

* ``ExecStartPre=`` → start (by ``Type=``) → ``ExecStartPost=`` → running; on stop (or
  when the service ends by itself) ``ExecStop=`` (only if it had started), the kill
  phase by ``KillMode=``, then ``ExecStopPost=`` (always), as systemd orders them.
  A ``-`` prefix makes a command's failure harmless; ``$VAR``/``${VAR}`` are expanded
  unless the ``:`` prefix says not to; ``+``/``!`` skip ``User=``/``Group=``.
* ``Type=simple|exec|idle`` (started once spawned), ``oneshot`` (each ``ExecStart=`` in
  turn, then done or ``RemainAfterExit=``), ``forking`` (started when the command exits
  0; main PID from ``PIDFile=`` or guessed), ``notify`` (started on ``READY=1`` sent to
  ``$NOTIFY_SOCKET``, an abstract datagram socket checked with ``SO_PASSCRED`` against
  ``NotifyAccess=``; ``STATUS=`` and ``MAINPID=`` are honoured).
* ``Restart=`` with ``RestartSec=`` and the start rate limit (``StartLimitBurst=`` in
  ``StartLimitIntervalSec=``), ``TimeoutStartSec=``/``TimeoutStopSec=`` (timed-out
  processes are killed, result ``timeout``), ``Environment=``/``EnvironmentFile=``,
  ``WorkingDirectory=``, ``User=``/``Group=``/``SupplementaryGroups=``, ``UMask=``,
  ``KillMode=``/``KillSignal=``/``SendSIGKILL=``/``SendSIGHUP=``,
  ``SuccessExitStatus=``, ``RestartPreventExitStatus=``/``RestartForceExitStatus=``,
  ``StandardOutput=``/``StandardError=`` (journal, null, file:, append:, truncate:).

Each activation's commands run in process groups of their own (not the supervisor's),
carrying ``INVOCATION_ID`` (see `grozd.fleet.runners.procs`). Output goes to the unit's
journal (`grozd.fleet.runners.journal`). Nothing is left behind: stopping a unit kills
what its ``KillMode=`` covers, `Supervisor.close` kills every unit's processes
(``KillMode=process``/``none`` leftovers included), the supervisor reaps orphans as a
child subreaper, and a supervisor that died without cleaning up has its successor kill
the leftovers recorded under ``run/`` before it starts anything.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from grozd.fleet.runners import Runner, RunnerError, StateCallback, UnitState
from grozd.fleet.runners import procs as proctab
from grozd.fleet.runners.journal import Journal
from grozd.fleet.runners.settings import (
    CLEAN_SIGNALS,
    DEFAULT_PATH,
    ServiceConfig,
    lookup_group,
    lookup_user,
    read_environment_file,
    service_config,
    signal_name,
)
from grozd.fleet.unit import (
    ExecCommand,
    SpecifierContext,
    UnitFileError,
    UnitName,
    content_hash,
    parse_unit,
)

log = logging.getLogger(__name__)

# systemd's names for the exit codes it uses (systemd.exec(5), "Process Exit Codes").
EXIT_NAMES = {
    0: "SUCCESS", 1: "FAILURE", 2: "INVALIDARGUMENT", 3: "NOTIMPLEMENTED", 4: "NOPERMISSION",
    5: "NOTINSTALLED", 6: "NOTCONFIGURED", 7: "NOTRUNNING", 200: "CHDIR", 203: "EXEC",
    209: "STDOUT", 211: "STDERR", 216: "GROUP", 217: "USER",
}  # fmt: skip
# How long to wait for processes after SIGKILL before giving up on them.
SIGKILL_WAIT = 5.0
POLL = 0.05
SWEEP_INTERVAL = 1.0


class SpawnError(Exception):
    """A command that could not be started; ``status`` is systemd's exit code for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExitResult:
    """How a process ended: ``exited`` with a code, or ``killed``/``dumped`` by a signal."""

    code: str
    status: int

    @classmethod
    def from_wait(cls, status: int | None) -> ExitResult:
        """From a waitpid() status (None: not ours to collect, assumed a clean exit)."""
        if status is None:
            return cls("exited", 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls("dumped" if os.WCOREDUMP(status) else "killed", sig)
        return cls("exited", os.waitstatus_to_exitcode(status))

    def clean(self, cfg: ServiceConfig | None) -> bool:
        """A successful end by systemd's rules (0, a clean signal, SuccessExitStatus=)."""
        if self.code == "exited":
            return self.status == 0 or (cfg is not None and self.status in cfg.success_exit_status)
        if self.code == "killed":
            return self.status in CLEAN_SIGNALS or (
                cfg is not None and self.status in cfg.success_signals
            )
        return False

    @property
    def result(self) -> str:
        """The service result this end stands for when it is a failure."""
        return {"exited": "exit-code", "killed": "signal", "dumped": "core-dump"}[self.code]

    def describe(self) -> str:
        """``code=exited, status=1/FAILURE`` as systemd prints it."""
        if self.code == "exited":
            name = EXIT_NAMES.get(self.status)
            return f"code=exited, status={self.status}" + (f"/{name}" if name else "")
        return f"code={self.code}, signal={signal_name(self.status)}"

    @property
    def env_status(self) -> str:
        """$EXIT_STATUS: the number, or the signal name."""
        return str(self.status) if self.code == "exited" else signal_name(self.status)


@dataclass
class Proc:
    """A process the supervisor started (or adopted as a forking service's main PID)."""

    pid: int
    key: str
    argv: tuple[str, ...]
    started: float
    popen: subprocess.Popen[bytes] | None = None
    exited: asyncio.Future[ExitResult] | None = None
    result: ExitResult | None = None

    def line(self) -> str:
        """``ExecStart=/bin/sleep 10`` for status output."""
        return f"{self.key}={' '.join(self.argv)}"


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()


def expand_argv(argv: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """systemd's variable expansion in command lines.

    A word that is exactly ``$NAME`` becomes the value split at whitespace (possibly no
    words); ``${NAME}`` inside a word is replaced as is; ``$$`` is a literal ``$``.
    """
    out: list[str] = []
    for i, word in enumerate(argv):
        if i > 0 and len(word) > 1 and word[0] == "$" and _is_name(word[1:]):
            out.extend(env.get(word[1:], "").split())
            continue
        out.append(_expand_braces(word, env))
    return out


def _is_name(text: str) -> bool:
    return (text[0].isalpha() or text[0] == "_") and all(c.isalnum() or c == "_" for c in text)


def _expand_braces(word: str, env: dict[str, str]) -> str:
    out = []
    i = 0
    while i < len(word):
        if word.startswith("$$", i):
            out.append("$")
            i += 2
        elif word.startswith("${", i):
            end = word.find("}", i + 2)
            name = word[i + 2 : end] if end > 0 else ""
            if end > 0 and name and _is_name(name):
                out.append(env.get(name, ""))
                i = end + 1
            else:
                out.append("$")
                i += 1
        else:
            out.append(word[i])
            i += 1
    return "".join(out)


def _ago(seconds: float) -> str:
    """``1min 5s ago`` in systemd's style."""
    s = int(max(0, seconds))
    parts = []
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            n, s = divmod(s, size)
            parts.append(f"{n} {unit}{'s' if n > 1 else ''}" if unit == "day" else f"{n}{unit}")
    if s or not parts:
        parts.append(f"{s}s")
    return " ".join(parts[:2]) + " ago"


def _stamp(wall: float) -> str:
    return datetime.fromtimestamp(wall).astimezone().strftime("%a %Y-%m-%d %H:%M:%S %Z")


class _OutputPipe:
    """Reads one process's stdout/stderr pipe into the unit's journal, line by line."""

    def __init__(self, unit: ServiceUnit, fd: int, ident: str, pid: int) -> None:
        self.unit = unit
        self.fd = fd
        self.ident = ident
        self.pid = pid
        self.buf = b""
        os.set_blocking(fd, False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        if lines:
            # One journal write per read: a chatty service costs one file append per chunk.
            text = b"\n".join(lines).decode("utf-8", "replace")
            self.unit.journal_write(self.ident, self.pid, text)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.buf:
            self.unit.journal_write(self.ident, self.pid, self.buf.decode("utf-8", "replace"))
            self.buf = b""
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.unit.pipes.discard(self)


class _NotifySocket:
    """The service's $NOTIFY_SOCKET: an abstract datagram socket with sender credentials."""

    def __init__(self, unit: ServiceUnit) -> None:
        self.unit = unit
        self.address = f"grozd/notify/{unit.name}/{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)

    @property
    def env_value(self) -> str:
        return "@" + self.address

    def _readable(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i"))
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[: struct.calcsize("3i")])[0]
            self.unit.on_notify(pid, data.decode("utf-8", "replace"))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ServiceUnit:
    """One loaded unit and its state machine."""

    def __init__(self, sup: Supervisor, name: str, text: str) -> None:
        self.sup = sup
        self.name = name
        self.text = text
        self.hash = content_hash(text)
        self.path = sup.units_dir / name
        self.config: ServiceConfig | None = None
        self.load_state = "loaded"
        self.load_error: str | None = None
        self._load()
        self.active_state = "inactive"
        self.sub_state = "dead"
        self.result = "success"
        self.since = time.time()
        self.main: Proc | None = None
        self.control: Proc | None = None
        self.history: list[Proc] = []
        self.pgids: set[int] = set()
        self.invocation: str | None = None
        # Processes of earlier activations that KillMode= left alive: (pgids, marker).
        self.leftovers: list[tuple[set[int], bytes]] = []
        self.status_text: str | None = None
        self.n_restarts = 0
        self.start_times: deque[float] = deque()
        self.pipes: set[_OutputPipe] = set()
        self.env: dict[str, str] = {}
        self.notify: _NotifySocket | None = None
        self._ready = asyncio.Event()
        self._want = False
        # Start requests made / handled: a new request restarts a unit that has ended.
        self._gen = 0
        self._handled = 0
        self._poke = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._controller = asyncio.get_running_loop().create_task(
            self._control_loop(), name=f"unit-{name}"
        )

    # -- loading ------------------------------------------------------------------------

    def _load(self) -> None:
        if not self.text.strip():
            self.load_state, self.load_error = "masked", "unit file is empty"
            return
        try:
            unit = parse_unit(self.text, self.name, path=str(self.path))
        except UnitFileError as exc:
            self.load_state, self.load_error = "error", str(exc)
            return
        utype = UnitName.parse(self.name).type
        if utype != "service":
            self.load_state = "error"
            self.load_error = f"the embedded supervisor runs .service units only, not .{utype}"
            return
        try:
            self.config = service_config(unit, self.sup.context)
        except UnitFileError as exc:
            self.load_state, self.load_error = "bad-setting", str(exc)

    @property
    def description(self) -> str:
        return self.config.description if self.config else self.name

    @property
    def marker(self) -> bytes | None:
        return f"INVOCATION_ID={self.invocation}".encode() if self.invocation else None

    def state(self) -> UnitState:
        return UnitState(self.load_state, self.active_state, self.sub_state, self.hash)

    # -- requests -----------------------------------------------------------------------

    def request_start(self) -> None:
        """Start unless already active or starting (a stop in progress is followed)."""
        if self.load_state != "loaded":
            self.journal_write(
                "grozd", os.getpid(),
                f"{self.name}: Failed to start: unit is {self.load_state}: {self.load_error}",
            )  # fmt: skip
            return
        if self._want and self.active_state in ("active", "activating", "reloading"):
            return
        self._want = True
        self._gen += 1
        if self.active_state in ("inactive", "failed"):
            # The start job is queued: show it at once, as systemd does.
            self._set("activating", "start")
        self._poke.set()

    def request_stop(self) -> None:
        self._want = False
        self._poke.set()

    async def shutdown(self) -> None:
        """Stop, kill leftovers, end the controller."""
        self.request_stop()
        await self._idle.wait()
        self._controller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._controller
        await self.kill_leftovers()
        for pipe in list(self.pipes):
            pipe.close()

    # -- state --------------------------------------------------------------------------

    def _set(self, active: str, sub: str) -> None:
        if (active, sub) == (self.active_state, self.sub_state):
            return
        self.active_state, self.sub_state = active, sub
        self.since = time.time()
        log.debug("event=unit_state unit=%s active=%s sub=%s", self.name, active, sub)
        self.sup._changed(self.name, self.state())

    def journal_write(self, ident: str, pid: int, message: str) -> None:
        self.sup.journals.write(self.name, ident, pid, message)

    def _say(self, message: str) -> None:
        self.journal_write("grozd", os.getpid(), message)

    # -- the controller -----------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            while not (self._want and self._gen != self._handled):
                self._poke.clear()
                await self._poke.wait()
            self._handled = self._gen
            self._idle.clear()
            try:
                await self._lifecycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not leave processes unsupervised
                log.exception("event=unit_crashed unit=%s", self.name)
                self._say(f"{self.name}: internal error: {exc!r}")
                await self._kill_all(signal.SIGKILL)
                self.result = "resources"
                self._set("failed", "failed")
            finally:
                self._idle.set()

    def _rate_limited(self) -> bool:
        cfg = self.config
        assert cfg is not None
        if cfg.start_limit_interval <= 0 or cfg.start_limit_burst <= 0:
            return False
        now = time.monotonic()
        while self.start_times and now - self.start_times[0] > cfg.start_limit_interval:
            self.start_times.popleft()
        if len(self.start_times) >= cfg.start_limit_burst:
            return True
        self.start_times.append(now)
        return False

    async def _lifecycle(self) -> None:
        cfg = self.config
        assert cfg is not None
        self.n_restarts = 0
        # A start asked for by hand resets the limit; automatic restarts count against it.
        self.start_times.clear()
        while True:
            if self._rate_limited():
                self._say(f"{self.name}: Start request repeated too quickly.")
                self._say(f"{self.name}: Failed with result 'start-limit-hit'.")
                self._say(f"Failed to start {cfg.description}.")
                self.result = "start-limit-hit"
                self._set("failed", "failed")
                return
            result = await self._run_once()
            if not self._want:
                self._finish(result)
                return
            if self._should_restart(result):
                self._finish(result, final=False)
                self._set("activating", "auto-restart")
                if await self._sleep_unless_stopped(cfg.restart_sec):
                    self._finish("success")
                    return
                self.n_restarts += 1
                self._say(
                    f"{self.name}: Scheduled restart job, restart counter is at {self.n_restarts}."
                )
                continue
            self._finish(result)
            return

    def _finish(self, result: str, final: bool = True) -> None:
        self.result = result
        if result != "success":
            self._say(f"{self.name}: Failed with result '{result}'.")
        if final:
            self._set(*(("failed", "failed") if result != "success" else ("inactive", "dead")))
        self.sup._record(self)

    def _should_restart(self, result: str) -> bool:
        cfg = self.config
        assert cfg is not None
        main = self.main.result if self.main else None
        if main is not None:
            code, status = main.code, main.status
            if code == "exited" and status in cfg.restart_prevent_status:
                return False
            if code != "exited" and status in cfg.restart_prevent_signals:
                return False
            if code == "exited" and status in cfg.restart_force_status:
                return True
            if code != "exited" and status in cfg.restart_force_signals:
                return True
        if result in ("start-limit-hit", "resources") and cfg.restart != "always":
            return False
        clean = result == "success"
        unclean_signal = result in ("signal", "core-dump")
        return {
            "no": False,
            "always": True,
            "on-success": clean,
            "on-failure": not clean,
            "on-abnormal": unclean_signal or result in ("timeout", "watchdog"),
            "on-abort": unclean_signal,
            "on-watchdog": result == "watchdog",
        }[cfg.restart]

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True if a stop request came first."""
        deadline = _Deadline(seconds)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            return await self._wait(never, deadline, interruptible=True) == "stop"
        finally:
            never.cancel()

    async def _wait(self, fut: asyncio.Future[object], deadline: _Deadline,
                    interruptible: bool) -> str:  # fmt: skip
        """Wait for ``fut``: "done", or "stop" (a stop request), or "timeout"."""
        while True:
            if fut.done():
                return "done"
            if interruptible and not self._want:
                return "stop"
            timeout = deadline.remaining()
            if timeout is not None and timeout <= 0:
                return "timeout"
            self._poke.clear()
            poke = asyncio.ensure_future(self._poke.wait())
            try:
                await asyncio.wait({fut, poke}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                poke.cancel()

    # -- one activation -----------------------------------------------------------------

    async def _run_once(self) -> str:
        """Start, run and stop once; returns the service result."""
        cfg = self.config
        assert cfg is not None
        await self._adopt_leftovers()
        self.invocation = uuid.uuid4().hex
        self.pgids = set()
        self.main = self.control = None
        self.history = []
        self.status_text = None
        self._ready.clear()
        self._set("activating", "start-pre" if cfg.exec_start_pre else "start")
        self._say(f"Starting {cfg.description}...")
        deadline = _Deadline(cfg.timeout_start)
        try:
            self.env = self._environment()
        except OSError as exc:
            self._say(f"{self.name}: Failed to load environment files: {exc}")
            self._say(f"Failed to start {cfg.description}.")
            return await self._stop_sequence("resources", ran=False)
        result: str | None = None
        for cmd in cfg.exec_start_pre:
            result = await self._control_command(cmd, "ExecStartPre", deadline, True)
            if result:
                break
        if result is None:
            self._set("activating", "start")
            if cfg.type == "oneshot":
                for cmd in cfg.exec_start:
                    result = await self._control_command(cmd, "ExecStart", deadline, True)
                    if result:
                        break
            else:
                result = await self._start_main(deadline)
        if result is None and cfg.exec_start_post:
            self._set("activating", "start-post")
            for cmd in cfg.exec_start_post:
                result = await self._control_command(cmd, "ExecStartPost", deadline, True)
                if result:
                    break
        if result is not None:
            if result == "stop":
                return await self._stop_sequence("success", ran=False)
            if result == "timeout":
                self._say(f"{self.name}: start operation timed out. Terminating.")
            self._say(f"Failed to start {cfg.description}.")
            return await self._stop_sequence(result, ran=False)
        if cfg.type == "oneshot" and not cfg.remain_after_exit:
            self._say(f"{self.name}: Deactivated successfully.")
            self._say(f"Finished {cfg.description}.")
            return await self._stop_sequence("success", ran=True)
        main_alive = self.main is not None and self.main.result is None
        self._set("active", "running" if main_alive or cfg.type == "forking" else "exited")
        self._say(f"Started {cfg.description}.")
        result = await self._run_main()
        return await self._stop_sequence(result, ran=True)

    async def _start_main(self, deadline: _Deadline) -> str | None:
        """Spawn ExecStart= for simple/forking/notify; None once the service counts as up."""
        cfg = self.config
        assert cfg is not None
        cmd = cfg.exec_start[0]
        if cfg.type == "notify":
            self.notify = _NotifySocket(self)
        try:
            proc = self._spawn(cmd, "ExecStart")
        except SpawnError as exc:
            self._spawn_failed(cmd, "ExecStart", exc)
            self._say(f"{self.name}: Main process exited, code=exited, status={exc.status}/"
                      f"{EXIT_NAMES.get(exc.status, '')}")  # fmt: skip
            return "exit-code"
        if cfg.type == "simple":
            self.main = proc
            return None
        if cfg.type == "notify":
            self.main = proc
            either: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def settle(_: object = None) -> None:
                if not either.done():
                    either.set_result(None)

            ready = asyncio.ensure_future(self._ready.wait())
            ready.add_done_callback(settle)
            assert proc.exited is not None
            proc.exited.add_done_callback(settle)
            try:
                outcome = await self._wait(either, deadline, interruptible=True)
            finally:
                ready.cancel()
            if outcome == "done" and self._ready.is_set():
                return None
            if outcome == "done":
                res = proc.result
                assert res is not None
                self._main_exited()
                return "protocol" if res.clean(cfg) else res.result
            await self._terminate(proc)
            return outcome
        # forking: the command must exit 0, leaving the daemon behind.
        self.control = proc
        assert proc.exited is not None
        outcome = await self._wait(proc.exited, deadline, interruptible=True)
        if outcome != "done":
            await self._terminate(proc)
            self.control = None
            return outcome
        self.control = None
        res = proc.result
        assert res is not None
        if not res.clean(cfg):
            self._say(f"{self.name}: Control process exited, {res.describe()}")
            return res.result
        pid = await self._find_main_pid(deadline)
        if not self._want:
            return "stop"
        if pid is None and cfg.pid_file:
            remaining = deadline.remaining()
            return "timeout" if remaining is not None and remaining <= 0 else "protocol"
        if pid is not None:
            self.main = self._adopt(pid, "ExecStart", proctab.cmdline(pid))
        return None

    async def _find_main_pid(self, deadline: _Deadline) -> int | None:
        cfg = self.config
        assert cfg is not None
        if cfg.pid_file:
            while True:
                try:
                    pid = int(Path(cfg.pid_file).read_text().split()[0])
                    if proctab.alive(pid):
                        return pid
                except (OSError, ValueError, IndexError):
                    pass
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    self._say(f"{self.name}: Can't open PID file {cfg.pid_file} (yet?) after"
                              " start: No such file or directory")  # fmt: skip
                    return None
                await asyncio.sleep(POLL)
                if not self._want:
                    return None
        if cfg.guess_main_pid:
            live = [p for p in self._members() if not p.zombie]
            if len(live) == 1:
                return live[0].pid
        return None

    async def _run_main(self) -> str:
        """While running: until the main process (or, without one, every process) ends or a
        stop is requested. Returns the result."""
        cfg = self.config
        assert cfg is not None
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            while True:
                if self.active_state == "active" and self.sub_state == "exited":
                    await self._wait(never, _Deadline(None), interruptible=True)
                    return "success"
                main = self.main
                if main is not None and main.result is None and main.exited is not None:
                    outcome = await self._wait(main.exited, _Deadline(None), interruptible=True)
                    if outcome == "stop":
                        return "success"
                    if self.main is not main:
                        continue  # MAINPID= switched the main process
                    res = main.result
                    assert res is not None
                    self._main_exited()
                    if not res.clean(cfg):
                        return res.result
                    if cfg.remain_after_exit:
                        self._set("active", "exited")
                        continue
                    return "success"
                # No main process known (forking without PIDFile= and no single process):
                # the service lives as long as any of its processes does.
                outcome = await self._wait(never, _Deadline(0.5), interruptible=True)
                if outcome == "stop":
                    return "success"
                if not [p for p in self._members() if not p.zombie]:
                    if cfg.remain_after_exit:
                        self._set("active", "exited")
                        continue
                    return "success"
        finally:
            never.cancel()

    def _main_exited(self) -> None:
        main = self.main
        if main is not None and main.result is not None:
            self._say(f"{self.name}: Main process exited, {main.result.describe()}")

    async def _stop_sequence(self, result: str, ran: bool) -> str:
        """ExecStop= (if it ran), the kill phase, ExecStopPost=, the final kill."""
        cfg = self.config
        assert cfg is not None
        stop_requested = not self._want
        deadline = _Deadline(cfg.timeout_stop)
        if ran and stop_requested:
            self._say(f"Stopping {cfg.description}...")
        if ran and cfg.exec_stop:
            self._set("deactivating", "stop")
            for cmd in cfg.exec_stop:
                failed = await self._control_command(cmd, "ExecStop", deadline, False,
                                                     result=result)  # fmt: skip
                if failed == "timeout":
                    result = "timeout" if result == "success" else result
                    break
        if not await self._kill_phase(deadline, final=False) and result == "success":
            result = "timeout"
        if cfg.exec_stop_post:
            self._set("deactivating", "stop-post")
            post_deadline = _Deadline(cfg.timeout_stop)
            for cmd in cfg.exec_stop_post:
                await self._control_command(cmd, "ExecStopPost", post_deadline, False,
                                            result=result)  # fmt: skip
            await self._kill_phase(post_deadline, final=True)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        main = self.main
        if main is not None and main.result is None and main.exited is not None:
            if not proctab.alive(main.pid):
                # Dead but its exit not collected yet: let the watcher record it.
                await asyncio.wait({main.exited}, timeout=1.0)
            if main.result is None:
                # KillMode=process/none: the main process may outlive the unit.
                self.main = None
        if ran and stop_requested and result == "success":
            self._say(f"{self.name}: Deactivated successfully.")
            self._say(f"Stopped {cfg.description}.")
        elif ran and result == "success":
            self._say(f"{self.name}: Deactivated successfully.")
        live = [p for p in self._members() if not p.zombie]
        if live and self.invocation is not None and self.marker is not None:
            self.leftovers.append((set(self.pgids), self.marker))
        self.sup._record(self)
        return result

    async def _kill_phase(self, deadline: _Deadline, final: bool) -> bool:
        """Signal what KillMode= covers and wait; False if SIGKILL was needed."""
        cfg = self.config
        assert cfg is not None
        mode = cfg.kill_mode
        if mode == "none":
            return True
        term, kill = ("final-sigterm", "final-sigkill") if final else ("stop-sigterm",
                                                                      "stop-sigkill")  # fmt: skip
        main = self.main if self.main is not None and self.main.result is None else None
        if mode == "control-group":
            if not [p for p in self._members() if not p.zombie]:
                return True
            self._set("deactivating", term)
            await self._kill_all(cfg.kill_signal, hup=cfg.send_sighup)
            gone = await self._until(lambda: not self._live_members(), deadline)
        else:
            if main is None:
                gone = True
            else:
                self._set("deactivating", term)
                self._signal_pid(main.pid, cfg.kill_signal, hup=cfg.send_sighup)
                gone = await self._until(lambda: not proctab.alive(main.pid), deadline)
            if gone and mode == "mixed" and self._live_members():
                # mixed: SIGTERM to the main process only, SIGKILL to the rest after it.
                await self._kill_all(signal.SIGKILL)
                await self._until(lambda: not self._live_members(), _Deadline(SIGKILL_WAIT))
        if gone:
            await self._collect_zombies()
            return True
        if not cfg.send_sigkill:
            return False
        self._say(f"{self.name}: State '{term}' timed out. Killing.")
        self._set("deactivating", kill)
        if mode in ("control-group", "mixed"):
            for p in self._live_members():
                self._say(f"{self.name}: Killing process {p.pid} ({p.comm}) with signal "
                          f"SIG{signal_name(cfg.final_kill_signal)}.")  # fmt: skip
            await self._kill_all(cfg.final_kill_signal)
            await self._until(lambda: not self._live_members(), _Deadline(SIGKILL_WAIT))
        elif main is not None:
            self._signal_pid(main.pid, cfg.final_kill_signal)
            await self._until(lambda: not proctab.alive(main.pid), _Deadline(SIGKILL_WAIT))
        await self._collect_zombies()
        return False

    async def _collect_zombies(self) -> None:
        """Once nothing lives: reap what is left as zombies (orphans re-parented to us
        when their parent died a moment later), so the unit leaves no trace."""
        if self.config is not None and self.config.kill_mode in ("process", "none"):
            return
        await self._until(lambda: not self._members(), _Deadline(0.5))

    async def _until(self, done: Callable[[], bool], deadline: _Deadline) -> bool:
        """Poll ``done`` (reaping our zombies meanwhile) until true or the deadline."""
        while True:
            self._reap()
            if done():
                return True
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.sleep(POLL if remaining is None else min(POLL, remaining))

    # -- processes ----------------------------------------------------------------------

    def _members(self) -> list[proctab.ProcInfo]:
        if not self.pgids and self.invocation is None:
            return []
        return proctab.unit_processes(self.pgids, self.marker)

    def _live_members(self) -> list[proctab.ProcInfo]:
        return [p for p in self._members() if not p.zombie]

    def _reap(self) -> None:
        members = self._members()
        self.sup.known_pids.update(p.pid for p in members)
        proctab.reap_zombies(members, skip=self.sup.watched)

    def _signal_pid(self, pid: int, sig: int, hup: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                os.kill(pid, signal.SIGCONT)
            if hup:
                os.kill(pid, signal.SIGHUP)

    async def _kill_all(self, sig: int, hup: bool = False) -> None:
        """Signal every process of the current activation (groups first, then stragglers)."""
        proctab.signal_groups(self.pgids, sig)
        members = self._members()
        proctab.signal_processes(members, sig)
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            # A stopped process would never see the signal.
            proctab.signal_processes(members, signal.SIGCONT)
        if hup:
            proctab.signal_processes(members, signal.SIGHUP)

    async def _terminate(self, proc: Proc) -> None:
        """Stop a control process that ran over its time (TERM, then KILL)."""
        cfg = self.config
        assert cfg is not None
        self._signal_pid(proc.pid, cfg.kill_signal)
        deadline = _Deadline(cfg.timeout_stop if cfg.timeout_stop is not None else SIGKILL_WAIT)
        if not await self._until(lambda: proc.result is not None, deadline):
            self._signal_pid(proc.pid, signal.SIGKILL)
            await self._until(lambda: proc.result is not None, _Deadline(SIGKILL_WAIT))

    async def _adopt_leftovers(self) -> None:
        """Before a new activation: note processes an earlier one left (as systemd warns)."""
        keep = []
        for pgids, marker in self.leftovers:
            live = [p for p in proctab.unit_processes(pgids, marker) if not p.zombie]
            for p in live:
                self._say(f"{self.name}: Found left-over process {p.pid} ({p.comm}) in control"
                          " group while starting unit. Ignoring.")  # fmt: skip
            if live:
                keep.append((pgids, marker))
        self.leftovers = keep

    async def kill_leftovers(self) -> None:
        """Kill what earlier activations left alive (KillMode=process/none)."""
        sets = list(self.leftovers)
        if self.invocation is not None and self.marker is not None:
            sets.append((set(self.pgids), self.marker))
        for pgids, marker in sets:
            procs = [p for p in proctab.unit_processes(pgids, marker) if not p.zombie]
            if not procs:
                continue
            proctab.signal_groups(pgids, signal.SIGKILL)
            proctab.signal_processes(procs, signal.SIGKILL)
            deadline = _Deadline(SIGKILL_WAIT)
            while deadline.remaining() > 0:  # type: ignore[operator]
                members = proctab.unit_processes(pgids, marker)
                proctab.reap_zombies(members, skip=self.sup.watched)
                if not [p for p in members if not p.zombie]:
                    break
                await asyncio.sleep(POLL)
        self.leftovers = []

    def _environment(self) -> dict[str, str]:
        cfg = self.config
        assert cfg is not None
        env = {"PATH": DEFAULT_PATH, "INVOCATION_ID": self.invocation or ""}
        if cfg.user is not None:
            pw = lookup_user(cfg.user)
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
                       SHELL=pw.pw_shell or "/bin/sh")  # fmt: skip
        env.update(cfg.environment)
        for path, optional in cfg.environment_files:
            try:
                env.update(read_environment_file(Path(path).read_text()))
            except FileNotFoundError:
                if not optional:
                    raise
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.env_value
        env["INVOCATION_ID"] = self.invocation or ""
        return env

    def _spawn(self, cmd: ExecCommand, key: str, extra: dict[str, str] | None = None) -> Proc:
        """Start one command in the unit's process group; raises `SpawnError`."""
        cfg = self.config
        assert cfg is not None
        env = dict(self.env)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.env_value
        if extra:
            env.update(extra)
        argv = list(cmd.argv) if cmd.no_env_expand else expand_argv(cmd.argv, env)
        if not argv:
            raise SpawnError(203, "empty command line")
        if cmd.path.startswith("/"):
            exe = cmd.path
        else:
            found = shutil.which(cmd.path, path=env.get("PATH", DEFAULT_PATH))
            if found is None:
                raise SpawnError(203, f"{cmd.path}: No such file or directory")
            exe = found
        privileged = cmd.full_privileges or cmd.no_setuid or cmd.ambient_magic
        kwargs: dict[str, object] = {}
        home = "/root"
        if not privileged and cfg.user is not None:
            try:
                pw = lookup_user(cfg.user)
                gid = lookup_group(cfg.group) if cfg.group else pw.pw_gid
                extra_groups = set(os.getgrouplist(pw.pw_name, gid))
                extra_groups.update(lookup_group(g) for g in cfg.supplementary_groups)
            except KeyError as exc:
                raise SpawnError(217, str(exc.args[0])) from None
            kwargs.update(user=pw.pw_uid, group=gid, extra_groups=sorted(extra_groups))
            home = pw.pw_dir
        elif not privileged and cfg.group is not None:
            try:
                kwargs["group"] = lookup_group(cfg.group)
            except KeyError as exc:
                raise SpawnError(216, str(exc.args[0])) from None
        cwd = cfg.working_directory or "/"
        if cwd == "~":
            cwd = home
        if not os.path.isdir(cwd):
            if not cfg.working_directory_optional:
                raise SpawnError(200, f"Changing to the requested working directory failed: "
                                      f"{cwd}: No such file or directory")  # fmt: skip
            cwd = "/"
        if cfg.umask is not None:
            kwargs["umask"] = cfg.umask
        stdout, stderr, pipe_fd = self._output_fds(cfg)
        group = self._live_group()
        try:
            try:
                popen = subprocess.Popen(
                    argv, executable=exe, stdin=subprocess.DEVNULL, stdout=stdout,
                    stderr=stderr, cwd=cwd, env=env, close_fds=True, process_group=group,
                    **kwargs,  # type: ignore[arg-type]
                )  # fmt: skip
            except PermissionError:
                if not group:
                    raise
                # The group emptied between the check and the fork: start a new one.
                popen = subprocess.Popen(
                    argv, executable=exe, stdin=subprocess.DEVNULL, stdout=stdout,
                    stderr=stderr, cwd=cwd, env=env, close_fds=True, process_group=0,
                    **kwargs,  # type: ignore[arg-type]
                )  # fmt: skip
        except FileNotFoundError as exc:
            self._close_output(stdout, stderr, pipe_fd)
            raise SpawnError(203, f"{exe}: {exc.strerror}") from None
        except PermissionError as exc:
            self._close_output(stdout, stderr, pipe_fd)
            status = 203 if exc.filename else 217
            raise SpawnError(status, f"{exe}: {exc.strerror}") from None
        except OSError as exc:
            self._close_output(stdout, stderr, pipe_fd)
            raise SpawnError(203, f"{exe}: {exc.strerror or exc}") from None
        self._close_output(stdout, stderr, None)
        pid = popen.pid
        try:
            self.pgids.add(os.getpgid(pid))
        except ProcessLookupError:
            self.pgids.add(pid if group == 0 else group)
        proc = Proc(pid, key, tuple(argv), time.time(), popen)
        proc.exited = self.sup.watch_exit(pid, proc)
        if pipe_fd is not None:
            self.pipes.add(_OutputPipe(self, pipe_fd, os.path.basename(argv[0]), pid))
        self.history.append(proc)
        self.sup._record(self)
        return proc

    def _live_group(self) -> int:
        """A process group of this activation that still has members (0: none)."""
        for pgid in sorted(self.pgids):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            # Only groups in our own session can be joined (setpgid()).
            try:
                if os.getsid(pgid) == os.getsid(0):
                    return pgid
            except ProcessLookupError:
                continue
        return 0

    def _output_fds(self, cfg: ServiceConfig) -> tuple[int, int, int | None]:
        """(stdout fd, stderr fd, our pipe read end or None) for a new process."""
        read_fd = None

        def open_target(spec: str) -> int:
            nonlocal read_fd
            if spec == "null":
                return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            kind, _, path = spec.partition(":")
            if kind in ("file", "append", "truncate"):
                flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                flags |= {"append": os.O_APPEND, "truncate": os.O_TRUNC, "file": 0}[kind]
                return os.open(path, flags, 0o644)
            r, w = os.pipe2(os.O_CLOEXEC)
            read_fd = r
            return w

        out = open_target(cfg.standard_output)
        if cfg.standard_error == "inherit":
            err = out
        elif cfg.standard_error == "journal" and read_fd is not None:
            err = out
        else:
            err = open_target(cfg.standard_error)
        return out, err, read_fd

    @staticmethod
    def _close_output(stdout: int, stderr: int, pipe_fd: int | None) -> None:
        for fd in {stdout, stderr} | ({pipe_fd} if pipe_fd is not None else set()):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _adopt(self, pid: int, key: str, line: str) -> Proc:
        """Watch a process we did not spawn ourselves (a forking service's daemon)."""
        proc = Proc(pid, key, tuple(line.split()), time.time())
        proc.exited = self.sup.watch_exit(pid, proc)
        with contextlib.suppress(ProcessLookupError):
            self.pgids.add(os.getpgid(pid))
        self.sup._record(self)
        return proc

    def _spawn_failed(self, cmd: ExecCommand, key: str, exc: SpawnError) -> None:
        self._say(f"{self.name}: Failed to execute {cmd.path}: {exc}")
        failed = Proc(0, key, cmd.argv, time.time(), result=ExitResult("exited", exc.status))
        self.history.append(failed)

    async def _control_command(self, cmd: ExecCommand, key: str, deadline: _Deadline,
                               interruptible: bool, result: str | None = None) -> str | None:
        """Run one control command to its end; None if fine, else a result or "stop"."""
        cfg = self.config
        assert cfg is not None
        extra: dict[str, str] = {}
        if self.main is not None and self.main.result is None and self.main.pid:
            extra["MAINPID"] = str(self.main.pid)
        if result is not None:
            extra["SERVICE_RESULT"] = result
            if self.main is not None and self.main.result is not None:
                extra["EXIT_CODE"] = self.main.result.code
                extra["EXIT_STATUS"] = self.main.result.env_status
        try:
            proc = self._spawn(cmd, key, extra)
        except SpawnError as exc:
            self._spawn_failed(cmd, key, exc)
            return None if cmd.ignore_failure else "exit-code"
        self.control = proc
        try:
            assert proc.exited is not None
            outcome = await self._wait(proc.exited, deadline, interruptible)
            if outcome != "done":
                if outcome == "timeout":
                    self._say(f"{self.name}: {key} operation timed out. Terminating.")
                await self._terminate(proc)
                return outcome
        finally:
            self.control = None
        res = proc.result
        assert res is not None
        if cfg.type == "oneshot" and key == "ExecStart":
            self.main = proc
        if not res.clean(cfg) and not cmd.ignore_failure:
            self._say(f"{self.name}: Control process exited, {res.describe()}")
            return res.result
        return None

    def on_notify(self, pid: int | None, message: str) -> None:
        """A datagram on $NOTIFY_SOCKET from ``pid``."""
        cfg = self.config
        if cfg is None:
            return
        access = cfg.notify_access
        main_pid = self.main.pid if self.main else None
        if access == "none":
            return
        if access in ("main", "exec") and pid != main_pid and (
            access == "main" or self.control is None or pid != self.control.pid
        ):
            log.debug("event=notify_refused unit=%s pid=%s", self.name, pid)
            return
        if access == "all" and pid is not None and pid not in {p.pid for p in self._members()}:
            return
        for line in message.splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                self._ready.set()
                self._poke.set()
            elif key == "STATUS":
                self.status_text = value
            elif key == "MAINPID" and value.isdigit() and proctab.alive(int(value)):
                if self.main is None or self.main.pid != int(value):
                    self.main = self._adopt(int(value), "ExecStart", proctab.cmdline(int(value)))
                    self._poke.set()
            elif key == "STOPPING" and value == "1":
                self._say(f"{self.name}: service is stopping")

    # -- status ---------------------------------------------------------------------------

    def status_text_lines(self, journal_lines: int = 10) -> list[str]:
        """``systemctl status`` output."""
        active = self.active_state
        bullet = {"active": "●", "reloading": "●", "failed": "×", "activating": "●",
                  "deactivating": "●"}.get(active, "○")  # fmt: skip
        desc = self.description
        lines = [f"{bullet} {self.name}" + (f" - {desc}" if desc != self.name else "")]
        if self.load_state == "loaded":
            lines.append(f"     Loaded: loaded ({self.path}; static)")
        else:
            lines.append(f"     Loaded: {self.load_state} (Reason: {self.load_error})")
        state = f"{active} ({self.sub_state})"
        if active == "failed":
            state = f"failed (Result: {self.result})"
        since = f" since {_stamp(self.since)}; {_ago(time.time() - self.since)}"
        lines.append(f"     Active: {state}{since}")
        for proc in self.history:
            if proc is self.main or proc.result is None:
                continue
            pid = f"{proc.pid} " if proc.pid else ""
            lines.append(f"    Process: {pid}{proc.line()} ({proc.result.describe()})")
        if self.main is not None:
            if self.main.result is None:
                info = proctab.read_stat(self.main.pid)
                comm = info.comm if info is not None else "?"
                lines.append(f"   Main PID: {self.main.pid} ({comm})")
            else:
                lines.append(f"   Main PID: {self.main.pid} ({self.main.result.describe()})")
        if self.status_text:
            lines.append(f'     Status: "{self.status_text}"')
        live = self._live_members() if self.invocation else []
        for pgids, marker in self.leftovers:
            live += [p for p in proctab.unit_processes(pgids, marker) if not p.zombie]
        if live:
            lines.append(f"      Tasks: {len(live)}")
            lines.append(f"     CGroup: grozd/{self.name}")
            ordered = sorted({p.pid: p for p in live}.values(), key=lambda p: p.pid)
            for i, p in enumerate(ordered):
                branch = "└─" if i == len(ordered) - 1 else "├─"
                lines.append(f"             {branch}{p.pid} {proctab.cmdline(p.pid)}")
        tail = self.sup.journals.tail(self.name, journal_lines)
        if tail:
            lines.append("")
            lines.extend(tail)
        return lines


class Supervisor(Runner):
    """Runs units on this machine; state under ``state_dir`` (units/, journal/, run/)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        hostname: str | None = None,
        context: SpecifierContext | None = None,
        subreaper: bool = True,
        journal_max_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.units_dir = self.state_dir / "units"
        self.run_dir = self.state_dir / "run"
        self.hostname = hostname or os.uname().nodename
        self.journals = Journal(self.state_dir / "journal", self.hostname, journal_max_bytes)
        self.context = context or SpecifierContext()
        self.subreaper = subreaper
        self._units: dict[str, ServiceUnit] = {}
        self._callbacks: list[StateCallback] = []
        self.watched: set[int] = set()
        self.known_pids: set[int] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._opened = False

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        for d in (self.units_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.subreaper and not proctab.become_subreaper():
            log.warning("event=subreaper_unavailable")
        await self._kill_recorded_leftovers()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="sweeper")
        self._opened = True

    async def close(self) -> None:
        units = list(self._units.values())
        await asyncio.gather(*(u.shutdown() for u in units), return_exceptions=True)
        for unit in units:
            self._forget_record(unit.name)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._opened = False

    async def _kill_recorded_leftovers(self) -> None:
        """Kill processes a previous supervisor recorded and did not stop (it crashed)."""
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                marks = [(set(map(int, pg)), m.encode()) for pg, m in data.get("marks", [])]
            except (OSError, ValueError, TypeError):
                marks = []
            for _pgids, marker in marks:
                # Only processes that carry the marker: a recorded group number may have
                # been reused by something else since.
                procs = [p for p in proctab.unit_processes((), marker)]
                if procs:
                    log.warning("event=leftovers_killed unit=%s count=%d", path.stem, len(procs))
                    self.journals.write(path.stem, "grozd", os.getpid(),
                                       f"{path.stem}: Killing {len(procs)} process(es) left by a"
                                       " previous supervisor.")  # fmt: skip
                proctab.signal_processes(procs, signal.SIGKILL)
            path.unlink(missing_ok=True)

    def _record(self, unit: ServiceUnit) -> None:
        """Note the unit's process marks on disk, for `_kill_recorded_leftovers`."""
        marks = [(sorted(pg), m.decode()) for pg, m in unit.leftovers]
        if unit.invocation is not None and unit.marker is not None:
            marks.append((sorted(unit.pgids), unit.marker.decode()))
        path = self.run_dir / f"{unit.name}.json"
        try:
            if marks:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"marks": marks}))
                os.replace(tmp, path)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass

    def _forget_record(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.run_dir / f"{name}.json").unlink(missing_ok=True)

    async def _sweep(self) -> None:
        """Reap zombies of unit processes nobody else waits for (orphans re-parented here)."""
        me = os.getpid()
        passes = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            passes += 1
            if passes % 5 == 0:
                # Learn processes that left the unit's groups (setsid) while they live: as
                # zombies they carry no environment to recognise them by.
                for unit in self._units.values():
                    if unit.active_state != "inactive" and unit.invocation is not None:
                        self.known_pids.update(p.pid for p in unit._members())
            groups: set[int] = set()
            for unit in self._units.values():
                groups |= unit.pgids
                for pgids, _ in unit.leftovers:
                    groups |= pgids
            for pid in proctab.all_pids():
                info = proctab.read_stat(pid)
                if info is None or not info.zombie or info.ppid != me or pid in self.watched:
                    continue
                if info.pgid in groups or pid in self.known_pids:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
            self.known_pids = {p for p in self.known_pids if proctab.read_stat(p) is not None}

    def watch_exit(self, pid: int, proc: Proc) -> asyncio.Future[ExitResult]:
        """A future for ``pid``'s end (collected by us when it is our child)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ExitResult] = loop.create_future()
        self.watched.add(pid)

        def finish(status: int | None) -> None:
            self.watched.discard(pid)
            result = ExitResult.from_wait(status)
            proc.result = result
            if proc.popen is not None:
                # Keeps subprocess from waiting for the PID later (it may be reused).
                proc.popen.returncode = os.waitstatus_to_exitcode(status) if status else 0
            if not fut.done():
                fut.set_result(result)
            for unit in self._units.values():
                if unit.main is proc or unit.control is proc:
                    unit._poke.set()

        def collect() -> bool:
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                finish(None)
                return True
            if wpid == 0:
                return False
            finish(status)
            return True

        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            if not collect():
                finish(None)
            return fut
        except OSError:
            fd = -1
        if fd < 0:
            async def poll() -> None:
                while not collect():
                    if not proctab.alive(pid) and proctab.read_stat(pid) is None:
                        finish(None)
                        return
                    await asyncio.sleep(POLL)

            loop.create_task(poll())
            return fut

        def readable() -> None:
            if collect() or proctab.read_stat(pid) is None:
                loop.remove_reader(fd)
                os.close(fd)
                if not fut.done():
                    finish(None)

        loop.add_reader(fd, readable)
        return fut

    def _changed(self, name: str, state: UnitState | None) -> None:
        for callback in list(self._callbacks):
            try:
                callback(name, state)
            except Exception:  # a subscriber's bug must not break the state machine
                log.exception("event=subscriber_failed unit=%s", name)

    # -- Runner -------------------------------------------------------------------------

    async def load(self, name: str, text: str) -> None:
        UnitName.parse(name)
        old = self._units.get(name)
        if old is not None:
            if old.hash == content_hash(text):
                return
            await self.unload(name, notify=False)
        self.units_dir.mkdir(parents=True, exist_ok=True)
        (self.units_dir / name).write_text(text)
        unit = ServiceUnit(self, name, text)
        self._units[name] = unit
        log.info("event=unit_loaded unit=%s hash=%s load=%s", name, unit.hash[:7], unit.load_state)
        if unit.load_error:
            self.journals.write(name, "grozd", os.getpid(), f"{name}: {unit.load_error}")
        self._changed(name, unit.state())

    async def unload(self, name: str, notify: bool = True) -> None:
        unit = self._units.get(name)
        if unit is None:
            return
        await unit.shutdown()
        self._units.pop(name, None)
        self._forget_record(name)
        with contextlib.suppress(OSError):
            (self.units_dir / name).unlink()
        log.info("event=unit_unloaded unit=%s", name)
        if notify:
            self._changed(name, None)

    async def start(self, name: str) -> None:
        self._unit(name).request_start()

    async def stop(self, name: str) -> None:
        self._unit(name).request_stop()

    def _unit(self, name: str) -> ServiceUnit:
        unit = self._units.get(name)
        if unit is None:
            raise RunnerError(f"unit {name} is not loaded")
        return unit

    def units(self) -> dict[str, UnitState]:
        return {name: unit.state() for name, unit in self._units.items()}

    def unit(self, name: str) -> ServiceUnit | None:
        """The loaded unit object (for tests and status)."""
        return self._units.get(name)

    def subscribe(self, callback: StateCallback) -> None:
        self._callbacks.append(callback)

    async def status(self, name: str) -> tuple[str, int]:
        unit = self._units.get(name)
        if unit is None:
            return f"Unit {name} could not be found.\n", 4
        code = 0 if unit.active_state in ("active", "reloading") else 3
        return "\n".join(unit.status_text_lines()) + "\n", code

    async def journal(self, name: str, lines: int = 10, follow: bool = False) -> AsyncIterator[str]:  # type: ignore[override]
        if not follow:
            for line in self.journals.tail(name, lines):
                yield line
            return
        async for line in self.journals.follow(name, lines):
            yield line

    async def wait_for(self, name: str, predicate: Callable[[UnitState], bool],
                       timeout: float = 10.0) -> UnitState:  # fmt: skip
        """Until ``predicate(state)`` holds (for tests and callers that must block)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            unit = self._units.get(name)
            if unit is not None and predicate(unit.state()):
                return unit.state()
            if loop.time() > end:
                raise TimeoutError(f"{name}: {unit.state() if unit else 'not loaded'}")
            await asyncio.sleep(0.02)
