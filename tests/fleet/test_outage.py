"""A store outage: etcd dies under a running fleetd and comes back on the same ports and data.

Units keep running while the store is away (fleet's agent never stops units because it
cannot reach etcd), and once etcd is back the agent reports again and still controls the
very same processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from grozd.cli import fleetctl
from grozd.client import Client
from grozd.fleet.registry import LAUNCHED, LOADED
from tests.realetcd import etcd_or_skip, free_port

from .conftest import Cluster, FakeRunner, run_async
from .test_fleetctl import SRC, stop_fleetd, wait_until

OUTAGE = 5.0  # seconds etcd stays down; well inside the agent TTL below


class FixedEtcd:
    """One etcd member on fixed loopback ports and a fixed data dir, restartable."""

    def __init__(self, tmp: Path) -> None:
        self.binary = etcd_or_skip()
        self.client_url = f"http://127.0.0.1:{free_port()}"
        self.peer_url = f"http://127.0.0.1:{free_port()}"
        self.data_dir = tmp / "etcd-data"
        self.log = tmp / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary,
            "--name", "outage",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"outage={self.peer_url}",
            "--initial-cluster-state", "new",
            "--enable-v2=true",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(self.healthy, timeout=20, what="etcd to become healthy")

    def healthy(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-2000:]
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1.0) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL the etcd we started, by its recorded PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def fixed_etcd(tmp: Path) -> Iterator[FixedEtcd]:
    etcd = FixedEtcd(tmp)
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.kill()


def ctl(etcd: FixedEtcd, prefix: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = fleetctl.main(
        ["--endpoint", etcd.client_url, "--etcd-key-prefix", prefix, *args], out=out, err=err
    )
    return code, out.getvalue(), err.getvalue()


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pids_with(text: str) -> set[int]:
    """PIDs of processes whose command line contains ``text``, leaving out their children.

    The shell's forks (for ``sleep``) carry its command line until they exec.
    """
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
    return {pid for pid in found if _ppid(pid) not in found}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_units_survive_a_store_outage_and_the_agent_takes_them_back(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"/test-outage/{tag}"
    mid = "0a" * 16
    state = tmp_path / "fleetd"
    unit = tmp_path / "tick.service"
    unit.write_text(
        f"[Service]\nExecStart=/bin/sh -c 'while true; do echo tick-{tag}; sleep 0.2; done'\n"
    )
    journal = state / "journal" / "tick.service.log"

    def ticks() -> int:
        try:
            return journal.read_text(errors="replace").count(f"tick-{tag}")
        except OSError:
            return 0

    with fixed_etcd(tmp_path) as etcd:
        fleetd = start_long_ttl_fleetd(etcd.client_url, prefix, mid, state,
                                       tmp_path / "fleetd.log")  # fmt: skip
        try:
            wait_until(lambda: mid[:8] in ctl(etcd, prefix, "list-machines")[1],
                       what="the machine to join")  # fmt: skip
            code, out, err = ctl(etcd, prefix, "start", str(unit))
            assert code == 0, err
            assert out.endswith(f"Unit tick.service launched on {mid[:8]}.../127.0.0.1\n")
            wait_until(lambda: ticks() >= 3, what="the unit to tick")
            pids = pids_with(f"tick-{tag}")
            assert len(pids) == 1
            (pid,) = pids

            etcd.kill()
            outage_start = time.monotonic()
            code, _, err = ctl(etcd, prefix, "--request-timeout=1", "list-units")
            assert code != 0 and err, "the store still answers"
            seen = ticks()
            while time.monotonic() - outage_start < OUTAGE:
                time.sleep(0.5)
                assert fleetd.poll() is None, "fleetd died without its store"
                assert alive(pid), "the unit was stopped while etcd was down"
                now = ticks()
                assert now > seen, "the unit's journal stopped growing during the outage"
                seen = now
            assert pids_with(f"tick-{tag}") == {pid}

            etcd.start()
            # The agent reconciles against the store again: the unit's state is there,
            # still active, from the same process (no restart, no second start).
            wait_until(lambda: "active" in ctl(etcd, prefix, "list-units", "--no-legend")[1],
                       timeout=20, what="the unit's state to be reported again")  # fmt: skip
            code, out, _ = ctl(etcd, prefix, "list-units", "--no-legend")
            assert code == 0
            assert out.split() == ["tick.service", f"{mid[:8]}.../127.0.0.1", "active",
                                   "running"]  # fmt: skip
            assert alive(pid) and pids_with(f"tick-{tag}") == {pid}
            assert ticks() > seen

            code, out, err = ctl(etcd, prefix, "stop", "tick.service")
            assert code == 0, err
            assert out == f"Unit tick.service loaded on {mid[:8]}.../127.0.0.1\n"
            wait_until(lambda: not alive(pid), what="the unit's process to end")
            assert not pids_with(f"tick-{tag}")
            log = (tmp_path / "fleetd.log").read_text(errors="replace")
            assert "event=lease_renew_failed" in log or "event=lease_error" in log
            assert "event=unit_stop unit=tick.service" in log
            assert log.count("event=unit_start unit=tick.service") == 1
        finally:
            stop_fleetd(fleetd)


def start_long_ttl_fleetd(etcd: str, prefix: str, mid: str, state: Path,
                         log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    """A fleetd whose presence outlives the outage (the usual test one has a 3 s TTL)."""
    args = [sys.executable, "-m", "grozd.cli.fleetd", f"--etcd-servers={etcd}",
            f"--etcd-key-prefix={prefix}", f"--machine-id={mid}", "--public-ip=127.0.0.1",
            "--metadata=role=outage", "--api-listen=127.0.0.1:0", f"--state-dir={state}",
            "--agent-ttl=30", "--engine-lease-ttl=2", "--engine-reconcile-interval=2",
            "-v"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)  # fmt: skip


def test_agent_keeps_units_through_failed_resyncs(tmp_path: Path) -> None:
    """In process, with a short reconcile interval: the agent's full resyncs fail all
    through the outage and must leave the runner alone; then it picks up again."""
    prefix = f"/test-outage/{uuid.uuid4().hex[:8]}"
    text = "[Service]\nExecStart=/bin/sleep 1000\n"

    async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not await check():
            assert loop.time() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def go(etcd: FixedEtcd) -> None:
        async with Client([etcd.client_url]) as client:
            c = Cluster(client, prefix, ttl=30, lease_ttl=2, interval=0.5)
            try:
                runner = FakeRunner()
                node = await c.add(runner=runner)
                await c.registry.submit("a.service", text, LAUNCHED)
                await c.settle()

                async def state_is(active: str) -> bool:
                    rec = (await c.registry.unit_states()).get(("a.service", node.id))
                    return rec is not None and rec.active_state == active

                await until(lambda: state_is("active"), "the state to be reported")
                await asyncio.to_thread(etcd.kill)
                before = node.agent.reconciles
                await asyncio.sleep(OUTAGE)
                # Only the reconciles before the first failed resync, none after it.
                assert node.agent.reconciles <= before + 1
                assert runner.units()["a.service"].active_state == "active"
                assert runner.starts == ["a.service"]
                await asyncio.to_thread(etcd.start)
                await until(lambda: _async(node.agent.reconciles > before + 1),
                            "the agent to reconcile again")  # fmt: skip
                assert await state_is("active")
                await c.registry.set_desired_state("a.service", LOADED)
                await until(lambda: state_is("inactive"), "the stop to be reported")
                assert runner.starts == ["a.service"]
            finally:
                await c.close()

    with fixed_etcd(tmp_path) as etcd:
        run_async(go(etcd))


async def _async(value: bool) -> bool:
    return value
