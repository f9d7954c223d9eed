"""The embedded supervisor running real commands: types, restarts, timeouts, kill modes,
journals, and that no process outlives its unit (or a crashed supervisor)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from grozd.fleet.runners import procs
from grozd.fleet.runners.settings import (
    parse_signal,
    parse_timespan,
    read_environment_file,
)
from grozd.fleet.runners.supervisor import ServiceUnit, Supervisor, expand_argv
from grozd.fleet.unit import SpecifierContext

from .conftest import run_async

PY = sys.executable


@pytest.fixture
def sup(tmp_path: Path) -> Callable[[Callable[[Supervisor], Awaitable[None]]], None]:
    """sup(fn): run ``await fn(supervisor)``; afterwards no unit process may be left."""

    def runner(fn: Callable[[Supervisor], Awaitable[None]]) -> None:
        marks: list[tuple[set[int], bytes]] = []

        async def main() -> None:
            s = Supervisor(tmp_path / "state", hostname="testhost",
                           context=SpecifierContext(machine_id="ab" * 16))  # fmt: skip
            await s.open()
            try:
                await fn(s)
            finally:
                for unit in s._units.values():
                    marks.extend(unit.leftovers)
                    if unit.marker is not None:
                        marks.append((set(unit.pgids), unit.marker))
                await s.close()

        run_async(main())
        for pgids, marker in marks:
            assert procs.unit_processes(pgids, marker) == [], "a unit process outlived close()"

    return runner


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def state(s: Supervisor, name: str) -> tuple[str, str]:
    st = s.units()[name]
    return st.active_state, st.sub_state


def unit(s: Supervisor, name: str) -> ServiceUnit:
    u = s.unit(name)
    assert u is not None
    return u


def journal(s: Supervisor, name: str) -> str:
    return "\n".join(s.journals.tail(name, 1000))


def gone(pgids: set[int], marker: bytes | None) -> bool:
    return procs.unit_processes(pgids, marker) == []


async def load_start(s: Supervisor, name: str, text: str) -> ServiceUnit:
    await s.load(name, textwrap.dedent(text).lstrip())
    await s.start(name)
    return unit(s, name)


def test_simple_service_runs_in_its_own_group_and_leaves_nothing(sup):
    async def go(s: Supervisor):
        u = await load_start(s, "sleepy.service", """
            [Unit]
            Description=Sleepy
            [Service]
            ExecStart=/bin/sh -c 'echo started; sleep 300 & sleep 301'
        """)
        await s.wait_for("sleepy.service", lambda st: st.sub_state == "running")
        await until(lambda: len(u._live_members()) == 3, what="three processes")
        assert os.getpgid(0) not in u.pgids
        assert all(p.pgid in u.pgids for p in u._live_members())
        await until(lambda: "started" in journal(s, "sleepy.service"), what="output")
        text, code = await s.status("sleepy.service")
        assert code == 0
        assert text.startswith("● sleepy.service - Sleepy\n")
        assert "Active: active (running) since" in text and "Tasks: 3" in text
        assert f"Main PID: {u.main.pid} (sh)" in text
        pgids, marker = set(u.pgids), u.marker
        await s.stop("sleepy.service")
        await s.wait_for("sleepy.service", lambda st: st.active_state == "inactive")
        assert gone(pgids, marker)
        for pgid in pgids:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)
        log = journal(s, "sleepy.service")
        for line in ("grozd[", "Starting Sleepy...", "Started Sleepy.", "sh[", "started",
                     "Stopping Sleepy...", "Stopped Sleepy."):  # fmt: skip
            assert line in log
        text, code = await s.status("sleepy.service")
        assert code == 3 and "○ sleepy.service" in text and "inactive (dead)" in text

    sup(go)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_python_http_server(sup):
    port = _free_port()

    async def go(s: Supervisor):
        await load_start(s, "web.service", f"""
            [Service]
            ExecStart={PY} -m http.server {port} --bind 127.0.0.1
        """)

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        loop = asyncio.get_running_loop()
        await until(answers, what="the server to answer")
        await s.stop("web.service")
        await s.wait_for("web.service", lambda st: st.active_state == "inactive")
        assert not await loop.run_in_executor(None, answers)

    sup(go)


def test_oneshot_with_and_without_remain_after_exit(sup, tmp_path):
    out = tmp_path / "out"

    async def go(s: Supervisor):
        await load_start(s, "once.service", f"""
            [Service]
            Type=oneshot
            ExecStart=/bin/sh -c 'echo one >> {out}'
            ExecStart=/bin/sh -c 'echo two >> {out}'
        """)
        await s.wait_for("once.service", lambda st: st.active_state == "inactive")
        assert out.read_text() == "one\ntwo\n"
        assert "Finished once.service." in journal(s, "once.service")
        await load_start(s, "stays.service", f"""
            [Service]
            Type=oneshot
            RemainAfterExit=yes
            ExecStart=/bin/true
            ExecStop=/bin/sh -c 'echo stopped >> {out}'
        """)
        await s.wait_for("stays.service", lambda st: st.sub_state == "exited")
        assert state(s, "stays.service") == ("active", "exited")
        await s.stop("stays.service")
        await s.wait_for("stays.service", lambda st: st.active_state == "inactive")
        assert out.read_text().endswith("stopped\n")

    sup(go)


def test_restart_on_failure_until_it_stays_up(sup, tmp_path):
    counter = tmp_path / "count"
    counter.write_text("0")

    async def go(s: Supervisor):
        u = await load_start(s, "flaky.service", f"""
            [Service]
            ExecStart=/bin/sh -c 'n=$(($(cat {counter}) + 1)); echo $n > {counter}; \\
                [ $n -ge 3 ] && exec sleep 300; exit 1'
            Restart=on-failure
            RestartSec=50ms
        """)
        await until(lambda: counter.read_text().strip() == "3" and u.sub_state == "running",
                    what="the third attempt to stay up")  # fmt: skip
        assert u.n_restarts == 2
        log = journal(s, "flaky.service")
        assert "Main process exited, code=exited, status=1/FAILURE" in log
        assert "Scheduled restart job, restart counter is at 2." in log

    sup(go)


def test_restart_no_and_on_abnormal_and_start_limit(sup):
    async def go(s: Supervisor):
        await load_start(s, "fails.service", "[Service]\nExecStart=/bin/sh -c 'exit 3'\n")
        await s.wait_for("fails.service", lambda st: st.active_state == "failed")
        text, code = await s.status("fails.service")
        assert code == 3 and "× fails.service" in text
        assert "Active: failed (Result: exit-code)" in text
        assert "(code=exited, status=3/NOTIMPLEMENTED)" in text
        # on-abnormal restarts after a signal, not after an exit code; the rate limit ends it.
        u = await load_start(s, "killed.service", """
            [Unit]
            StartLimitBurst=3
            [Service]
            ExecStart=/bin/sh -c 'kill -KILL $$$$'
            Restart=on-abnormal
            RestartSec=10ms
        """)
        await s.wait_for("killed.service", lambda st: st.active_state == "failed")
        assert u.result == "start-limit-hit" and u.n_restarts == 3
        assert "code=killed, signal=KILL" in journal(s, "killed.service")
        u = await load_start(s, "exits.service", """
            [Service]
            ExecStart=/bin/sh -c 'exit 1'
            Restart=on-abnormal
        """)
        await s.wait_for("exits.service", lambda st: st.active_state == "failed")
        assert u.n_restarts == 0 and u.result == "exit-code"

    sup(go)


def test_forking_with_pidfile_and_with_a_guessed_main_pid(sup, tmp_path):
    pidfile = tmp_path / "daemon.pid"

    async def go(s: Supervisor):
        u = await load_start(s, "daemon.service", f"""
            [Service]
            Type=forking
            PIDFile={pidfile}
            ExecStart=/bin/sh -c 'sleep 300 & echo $! > {pidfile}'
        """)
        await s.wait_for("daemon.service", lambda st: st.sub_state == "running")
        assert u.main is not None and u.main.pid == int(pidfile.read_text())
        assert procs.read_stat(u.main.pid).comm == "sleep"
        pgids, marker, main = set(u.pgids), u.marker, u.main.pid
        await s.stop("daemon.service")
        await s.wait_for("daemon.service", lambda st: st.active_state == "inactive")
        assert not procs.alive(main) and gone(pgids, marker)
        u = await load_start(s, "guess.service", """
            [Service]
            Type=forking
            ExecStart=/bin/sh -c 'setsid sleep 300 &'
        """)
        await s.wait_for("guess.service", lambda st: st.sub_state == "running")
        assert u.main is not None and procs.read_stat(u.main.pid).comm == "sleep"
        # setsid left our process group: the INVOCATION_ID mark still finds it.
        assert procs.read_stat(u.main.pid).pgid not in pgids
        pgids, marker, main = set(u.pgids), u.marker, u.main.pid
        await s.stop("guess.service")
        await s.wait_for("guess.service", lambda st: st.active_state == "inactive")
        assert not procs.alive(main) and gone(pgids, marker)

    sup(go)


NOTIFY = """
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(addr)
s.send(b"STATUS=warming up")
time.sleep(float(sys.argv[1]))
if sys.argv[2] == "ready":
    s.send(b"READY=1\\nSTATUS=serving")
time.sleep(300)
"""


def test_notify_waits_for_ready_and_times_out_without_it(sup, tmp_path):
    script = tmp_path / "notify.py"
    script.write_text(NOTIFY)

    async def go(s: Supervisor):
        u = await load_start(s, "ready.service", f"""
            [Service]
            Type=notify
            ExecStart={PY} {script} 0.4 ready
        """)
        await until(lambda: u.status_text == "warming up", what="the first STATUS=")
        assert state(s, "ready.service") == ("activating", "start")
        await s.wait_for("ready.service", lambda st: st.sub_state == "running")
        assert u.status_text == "serving"
        text, _ = await s.status("ready.service")
        assert 'Status: "serving"' in text
        u = await load_start(s, "never.service", f"""
            [Service]
            Type=notify
            TimeoutStartSec=0.5
            ExecStart={PY} {script} 0 never
        """)
        await s.wait_for("never.service", lambda st: st.active_state == "failed")
        assert u.result == "timeout"
        assert gone(set(u.pgids), u.marker)

    sup(go)


def test_exec_prefixes_and_stop_post_sees_the_result(sup, tmp_path):
    out = tmp_path / "result"

    async def go(s: Supervisor):
        await load_start(s, "pre.service", f"""
            [Service]
            ExecStartPre=-/bin/false
            ExecStartPre=-/nonexistent/binary
            ExecStart=/bin/sh -c 'exit 7'
            ExecStop=/bin/sh -c 'echo stop-ran >> {out}'
            ExecStopPost=/bin/sh -c 'echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" >> {out}'
        """)
        await s.wait_for("pre.service", lambda st: st.active_state == "failed")
        # It had started, so ExecStop= ran; ExecStopPost= saw how the main process ended.
        assert out.read_text() == "stop-ran\nexit-code exited 7\n"
        out.unlink()
        u = await load_start(s, "prefail.service", f"""
            [Service]
            ExecStartPre=/bin/false
            ExecStart=/bin/sleep 300
            ExecStop=/bin/sh -c 'echo stop-ran >> {out}'
            ExecStopPost=/bin/sh -c 'echo "post $SERVICE_RESULT" >> {out}'
        """)
        await s.wait_for("prefail.service", lambda st: st.active_state == "failed")
        assert out.read_text() == "post exit-code\n"  # never started: no ExecStop=
        assert u.main is None
        u = await load_start(s, "noexec.service", "[Service]\nExecStart=/nonexistent/binary\n")
        await s.wait_for("noexec.service", lambda st: st.active_state == "failed")
        assert "status=203/EXEC" in journal(s, "noexec.service")

    sup(go)


def test_kill_modes(sup, tmp_path):
    marker_file = tmp_path / "term"

    def children(u: ServiceUnit) -> list[int]:
        return [p.pid for p in u._live_members() if u.main is None or p.pid != u.main.pid]

    async def go(s: Supervisor):
        # control-group: everything goes.
        u = await load_start(s, "cg.service", "[Service]\nExecStart=/bin/sh -c 'sleep 300 & "
                                              "exec sleep 301'\n")  # fmt: skip
        await until(lambda: len(u._live_members()) == 2, what="two processes")
        pgids, marker = set(u.pgids), u.marker
        await s.stop("cg.service")
        await s.wait_for("cg.service", lambda st: st.active_state == "inactive")
        assert gone(pgids, marker)
        # process: only the main process; the child is left (and killed by unload).
        u = await load_start(
            s, "proc.service",
            "[Service]\nKillMode=process\nExecStart=/bin/sh -c 'sleep 300 & exec sleep 301'\n",
        )  # fmt: skip
        await until(lambda: len(u._live_members()) == 2, what="two processes")
        main = u.main.pid
        child = children(u)
        await s.stop("proc.service")
        await s.wait_for("proc.service", lambda st: st.active_state == "inactive")
        assert not procs.alive(main) and all(procs.alive(c) for c in child)
        text, _ = await s.status("proc.service")
        assert f"{child[0]} sleep 300" in text  # still shown as the unit's
        await s.unload("proc.service")
        assert not any(procs.alive(c) for c in child)
        # mixed: SIGTERM to the main process, SIGKILL to the rest.
        u = await load_start(s, "mixed.service", f"""
            [Service]
            KillMode=mixed
            ExecStart=/bin/sh -c 'trap "echo term > {marker_file}; exit 0" TERM; sleep 300 & wait'
        """)
        await until(lambda: len(u._live_members()) == 2, what="two processes")
        pgids, marker = set(u.pgids), u.marker
        await s.stop("mixed.service")
        await s.wait_for("mixed.service", lambda st: st.active_state == "inactive")
        assert marker_file.read_text() == "term\n" and gone(pgids, marker)
        # none: nothing is signalled; close() still leaves nothing behind.
        u = await load_start(s, "none.service", "[Service]\nKillMode=none\n"
                                                "ExecStart=/bin/sleep 300\n")  # fmt: skip
        await s.wait_for("none.service", lambda st: st.sub_state == "running")
        main = u.main.pid
        await s.stop("none.service")
        await s.wait_for("none.service", lambda st: st.active_state == "inactive")
        assert procs.alive(main)

    sup(go)


def test_stop_timeout_escalates_to_sigkill(sup):
    async def go(s: Supervisor):
        u = await load_start(s, "stubborn.service", """
            [Service]
            ExecStart=/bin/sh -c 'trap "" TERM; sleep 300'
            TimeoutStopSec=0.3
        """)
        await until(lambda: len(u._live_members()) == 2, what="two processes")
        pgids, marker = set(u.pgids), u.marker
        await s.stop("stubborn.service")
        await s.wait_for("stubborn.service", lambda st: st.active_state == "failed")
        assert u.result == "timeout" and gone(pgids, marker)
        log = journal(s, "stubborn.service")
        assert "State 'stop-sigterm' timed out. Killing." in log
        assert "with signal SIGKILL" in log

    sup(go)


def test_environment_working_directory_and_user(sup, tmp_path):
    envfile = tmp_path / "env"
    envfile.write_text('# comment\nC=three\nD="quoted value"\n')
    workdir = tmp_path / "work"
    workdir.mkdir()
    root = os.geteuid() == 0
    user = "User=nobody\nGroup=nogroup\n" if root else ""

    async def go(s: Supervisor):
        await load_start(s, "env.service", f"""
            [Service]
            Type=oneshot
            Environment=A=1 "B=two words"
            EnvironmentFile={envfile}
            EnvironmentFile=-/nonexistent/env
            WorkingDirectory={workdir}
            {user}ExecStart=/bin/sh -c 'echo "$A|$B|$C|$D|$(pwd)|$(id -u)|%m|$INVOCATION_ID"'
            ExecStart=/bin/echo $B ${{A}}x $$HOME
        """)
        await s.wait_for("env.service", lambda st: st.active_state == "inactive")
        log = journal(s, "env.service")
        uid = "65534" if root else str(os.getuid())
        assert f"1|two words|three|quoted value|{workdir}|{uid}|{'ab' * 16}|" in log
        assert "echo[" in log and ": two words 1x $HOME" in log
        await load_start(s, "noenv.service", "[Service]\nEnvironmentFile=/nonexistent/env\n"
                                             "ExecStart=/bin/true\n")  # fmt: skip
        await s.wait_for("noenv.service", lambda st: st.active_state == "failed")
        assert unit(s, "noenv.service").result == "resources"

    sup(go)


def test_bad_settings_are_reported_not_run(sup):
    async def go(s: Supervisor):
        await s.load("bad.service", "[Service]\nExecStart=/bin/true\nRestart=sometimes\n")
        assert s.units()["bad.service"].load_state == "bad-setting"
        await s.start("bad.service")
        assert state(s, "bad.service") == ("inactive", "dead")
        text, code = await s.status("bad.service")
        assert code == 3
        assert "Loaded: bad-setting (Reason: " in text
        assert "bad.service:3: Restart=: invalid value 'sometimes'" in text
        await s.load("sock.socket", "[Socket]\nListenStream=1234\n")
        assert s.units()["sock.socket"].load_state == "error"
        text, code = await s.status("missing.service")
        assert code == 4 and "could not be found" in text

    sup(go)


def test_leftovers_of_a_crashed_supervisor_are_killed(tmp_path):
    async def go() -> None:
        first = Supervisor(tmp_path / "state")
        await first.open()
        await first.load("orphan.service", "[Service]\nExecStart=/bin/sh -c 'sleep 300 & "
                                           "setsid sleep 301 & wait'\n")  # fmt: skip
        await first.start("orphan.service")
        u = unit(first, "orphan.service")
        await until(lambda: len(u._live_members()) == 3, what="three processes")
        pids = [p.pid for p in u._live_members()]
        # The supervisor "crashes": nothing is stopped, only its record stays on disk.
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.sleep(0.05)
        assert all(procs.alive(p) for p in pids)
        second = Supervisor(tmp_path / "state")
        await second.open()
        await until(lambda: not any(procs.alive(p) for p in pids), what="the leftovers to die")
        assert "left by a previous supervisor" in journal(second, "orphan.service")
        await second.close()
        # Reap what the first one can no longer.
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass

    run_async(go())


def test_settings_parsers():
    assert parse_timespan("90") == 90.0
    assert parse_timespan("1min 30s") == 90.0
    assert parse_timespan("1h30min") == 5400.0
    assert parse_timespan("100ms") == pytest.approx(0.1)
    assert parse_timespan("infinity") is None
    with pytest.raises(ValueError):
        parse_timespan("5 parsecs")
    assert parse_signal("SIGTERM") == parse_signal("TERM") == parse_signal("15") == signal.SIGTERM
    with pytest.raises(ValueError):
        parse_signal("SIGNOPE")
    assert read_environment_file('A=1\n; c\nB="x \\"y\\""\nC=\'$z\'\nbad line\nD=a\\\nb\n') == {
        "A": "1", "B": 'x "y"', "C": "$z", "D": "ab"}
    env = {"A": "1", "B": "two  words", "E": ""}
    assert expand_argv(("/bin/x", "$B", "${A}-${B}", "$E", "$$A", "$NOPE", "a$A"), env) == [
        "/bin/x", "two", "words", "1-two  words", "$A", "a$A"]
