"""fleet on three "machines" (network namespaces): a grozd store member on machine 1, a
``grozd fleetd`` process per machine, ``grozd fleetctl`` driving them.

The seed's web unit runs without Docker: ``python -m http.server`` bound to the machine's
own address, registering itself in the store with ``ExecStartPost=`` and removing itself
with ``ExecStopPost=``. The test checks placement by ``MachineMetadata=``, rescheduling
after the unit's machine dies (fleetd SIGKILLed), ``Global=`` and ``Conflicts=`` units, and
``fleetctl journal``. Everything lives in namespaces the test creates and deletes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from grozd.client import Client, KeyNotFoundError
from grozd.fleet.registry import Registry, UnitStateRecord
from tests.integration.members import GROZD, Members
from tests.integration.netns import Lab, skip_unless_possible

AGENT_TTL = 2
API_PORT = 49153
WEB_PORT = 8080
META = {1: "region=us,disk=hdd", 2: "region=eu,disk=ssd", 3: "region=eu,disk=hdd"}

# The unit's helper: the machine's own address is that of eth0 in its namespace.
WEB_SH = """#!/bin/sh
ADDR=$(ip -4 -o addr show dev eth0 | awk '{{split($4, a, "/"); print a[1]}}')
case "$1" in
  serve) exec {py} -u -m http.server --bind "$ADDR" --directory "{root}" {port} ;;
  register) exec curl -sf -X PUT "{store}/v2/keys/web/$ADDR" -d "value=http://$ADDR:{port}" ;;
  deregister) exec curl -sf -X DELETE "{store}/v2/keys/web/$ADDR" ;;
esac
"""

WEB_UNIT = """[Unit]
Description=web server (python http.server) registering itself in the store

[Service]
ExecStart=/bin/sh {sh} serve
ExecStartPost=/bin/sh {sh} register
ExecStopPost=-/bin/sh {sh} deregister

[X-Fleet]
MachineMetadata=region=eu
"""

GLOBAL_UNIT = """[Unit]
Description=runs everywhere

[Service]
ExecStart=/bin/sh -c "while true; do echo tick; sleep 1; done"

[X-Fleet]
Global=true
"""

CONFLICT_UNIT = """[Unit]
Description=at most one of these per machine

[Service]
ExecStart=/bin/sleep 1000

[X-Fleet]
Conflicts=lonely@*.service
MachineMetadata=region=eu
"""


def machine_id(i: int) -> str:
    return f"{i:02d}" * 4 + "0" * 24


class Fleet:
    """The lab, the store member, the fleetd processes (by recorded PID)."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.members = Members(lab, root, size=1)
        self.store = self.members.client_url(1)
        self.fleetd: dict[int, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONPATH": str(Path.cwd())}

    def start_fleetd(self, i: int) -> None:
        args = [
            "ip", "netns", "exec", self.lab.hosts[i - 1], *GROZD, "fleetd",
            "--etcd-servers", self.store, "--machine-id", machine_id(i),
            "--public-ip", self.lab.addr(i), "--metadata", META[i],
            "--agent-ttl", str(AGENT_TTL), "--engine-lease-ttl", "2",
            "--api-listen", f"{self.lab.addr(i)}:{API_PORT}",
            "--state-dir", str(self.root / f"state{i}"), "--runner", "supervisor", "-v",
        ]  # fmt: skip
        with open(self.root / f"fleetd{i}.log", "ab") as log:
            # `ip netns exec` execs: the PID recorded is fleetd's own.
            self.fleetd[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                              env=self.env)  # fmt: skip

    def kill_fleetd(self, i: int) -> None:
        proc = self.fleetd.pop(i)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def fleetctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """fleetctl run from the switch namespace (it reaches the store and every API)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.lab.switch, *GROZD, "fleetctl", "--endpoint",
             self.store, *args],
            capture_output=True, text=True, timeout=30, env=self.env,
        )  # fmt: skip

    def close(self) -> None:
        for i in list(self.fleetd):
            proc = self.fleetd.pop(i)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # Units of a SIGKILLed fleetd outlive it: end what is left in our own namespaces.
        for host in self.lab.hosts:
            out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        self.members.stop_all()

    # -- store views, from the switch namespace --------------------------------------

    def query(self) -> tuple[dict[str, str | None], dict[tuple[str, str], UnitStateRecord],
                             dict[str, str], set[str]]:  # fmt: skip
        """(placements, unit states, web registrations, machines present)."""

        async def get() -> tuple[dict[str, str | None], dict[tuple[str, str], UnitStateRecord],
                                 dict[str, str], set[str]]:  # fmt: skip
            async with Client([self.store]) as client:
                reg = Registry(client)
                jobs, _ = await reg.jobs()
                states = await reg.unit_states()
                machines, _ = await reg.machines()
                web: dict[str, str] = {}
                with contextlib.suppress(KeyNotFoundError):
                    resp = await client.get("/web", recursive=True)
                    for child in resp.node.nodes if resp.node else ():
                        web[child.key.rsplit("/", 1)[1]] = child.value or ""
                places = {n: j.target for n, j in jobs.items() if j.submitted}
                return places, states, web, set(machines)

        return self.lab.run(get(), timeout=15)

    def store_up(self) -> bool:
        try:
            self.query()
        except Exception:  # not answering yet
            return False
        return True

    def running(self, name: str) -> set[str]:
        """Machines reporting ``name`` active/running."""
        _, states, _, _ = self.query()
        return {m for (n, m), st in states.items()
                if n == name and (st.active_state, st.sub_state) == ("active", "running")}

    def wait(self, check: object, timeout: float, what: str) -> float:
        """Poll ``check()`` until true; returns the seconds it took."""
        start = time.monotonic()
        while not check():  # type: ignore[operator]
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out waiting for {what}; logs in {self.root}")
            time.sleep(0.1)
        return time.monotonic() - start

    def http_get(self, url: str) -> str:
        async def get() -> str:
            def fetch() -> str:
                with urllib.request.urlopen(url, timeout=3) as resp:
                    return resp.read().decode()

            # urllib blocks: run it in the loop thread itself (its sockets are in the
            # switch namespace; executor threads are not).
            return fetch()

        return self.lab.run(get(), timeout=10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    skip_unless_possible()
    with Lab(3) as lab:
        f = Fleet(lab, tmp_path)
        try:
            f.members.start(1)
            for i in (1, 2, 3):
                f.start_fleetd(i)
            yield f
        finally:
            f.close()


def test_fleet_on_three_namespace_machines(fleet: Fleet, tmp_path: Path) -> None:
    ids = {i: machine_id(i) for i in (1, 2, 3)}
    addr_of = {ids[i]: fleet.lab.addr(i) for i in (1, 2, 3)}
    fleet.wait(fleet.store_up, 20, "the store")
    fleet.wait(lambda: len(fleet.query()[3]) == 3, 30, "three machines")
    r = fleet.fleetctl("list-machines", "--no-legend", "--full")
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 3):
        assert f"{ids[i]}\t{fleet.lab.addr(i)}\t" in r.stdout, r.stdout

    docroot = tmp_path / "www"
    docroot.mkdir()
    (docroot / "index.html").write_text("hello from the web unit\n")
    sh = tmp_path / "web.sh"
    sh.write_text(WEB_SH.format(py=sys.executable, root=docroot, port=WEB_PORT,
                                store=fleet.store))  # fmt: skip
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.service").write_text(WEB_UNIT.format(sh=sh))
    (units / "everywhere.service").write_text(GLOBAL_UNIT)
    (units / "lonely@.service").write_text(CONFLICT_UNIT)
    names = ["web.service", "everywhere.service", "lonely@1.service", "lonely@2.service",
             "lonely@3.service"]  # fmt: skip
    r = fleet.fleetctl("submit", str(units / "lonely@.service"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = fleet.fleetctl("start", "--no-block", *(str(units / n) for n in names[:2]))
    assert r.returncode == 0, r.stdout + r.stderr
    r = fleet.fleetctl("start", "--no-block", *names[2:])
    assert r.returncode == 0, r.stdout + r.stderr

    # web: on a region=eu machine, serving on that machine's address, registered.
    fleet.wait(lambda: len(fleet.running("web.service")) == 1, 20, "web.service running")
    places, _, _, _ = fleet.query()
    first = places["web.service"]
    assert first in (ids[2], ids[3])
    assert fleet.running("web.service") == {first}
    url = f"http://{addr_of[first]}:{WEB_PORT}"
    fleet.wait(lambda: fleet.query()[2].get(addr_of[first]) == url, 10, "web registered")
    fleet.wait(lambda: _reachable(fleet, url), 10, "web answering")
    assert fleet.http_get(url + "/index.html") == "hello from the web unit\n"

    # Global: on every machine.
    fleet.wait(lambda: fleet.running("everywhere.service") == set(ids.values()), 20,
               "the global unit on all machines")  # fmt: skip

    # Conflicts: two region=eu machines, three mutually conflicting units.
    def lonely() -> list[str | None]:
        p = fleet.query()[0]
        return [p.get(f"lonely@{k}.service") for k in (1, 2, 3)]

    fleet.wait(lambda: sorted(m for m in lonely() if m) == sorted([ids[2], ids[3]]), 20,
               "two conflicting units placed apart")  # fmt: skip
    assert lonely().count(None) == 1

    # fleetctl journal reaches the unit's machine.
    r = fleet.fleetctl("journal", "--lines", "20", "web.service")
    assert r.returncode == 0, r.stderr
    assert f"Serving HTTP on {addr_of[first]} port {WEB_PORT}" in r.stdout, r.stdout

    # The web unit's machine dies: it runs elsewhere within the presence TTL + 5 s.
    dead = next(i for i in (2, 3) if ids[i] == first)
    fleet.kill_fleetd(dead)
    took = fleet.wait(
        lambda: (lambda p: p.get("web.service") not in (None, first))(fleet.query()[0])
        and len(fleet.running("web.service") - {first}) == 1,
        AGENT_TTL + 5, "web.service rescheduled and running",
    )  # fmt: skip
    second = fleet.query()[0]["web.service"]
    assert second == ids[5 - dead] and second != first
    url2 = f"http://{addr_of[second]}:{WEB_PORT}"
    fleet.wait(lambda: fleet.query()[2].get(addr_of[second]) == url2, 10, "web re-registered")
    fleet.wait(lambda: _reachable(fleet, url2), 10, "web answering on the new machine")
    print(f"\nweb.service moved {addr_of[first]} -> {addr_of[second]} in {took:.2f}s")

    # Stopping it runs ExecStopPost=: the registration goes away.
    r = fleet.fleetctl("stop", "web.service")
    assert r.returncode == 0, r.stdout + r.stderr
    fleet.wait(lambda: addr_of[second] not in fleet.query()[2], 10, "web deregistered")


def _reachable(fleet: Fleet, url: str) -> bool:
    try:
        fleet.http_get(url)
    except OSError:
        return False
    return True

