"""fleetctl end to end: real `grozd fleetd` processes (supervisor runner) on real etcd,
fleetctl's commands, their columns, messages and exit codes; and `grozd fleetd`'s flags."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grozd.cli import fleetctl
from grozd.cli.fleetd import parse_args
from grozd.client import KeyNotFoundError, SyncClient
from grozd.fleet.daemon import FleetdConfig

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[2] / "src")


@dataclass
class Fleet:
    etcd: str
    prefix: str
    machines: list[str]
    procs: list[subprocess.Popen[bytes]]

    def ctl(self, *args: str) -> tuple[int, str, str]:
        """Run fleetctl in-process; (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = fleetctl.main(["--endpoint", self.etcd, "--etcd-key-prefix", self.prefix, *args],
                             out=out, err=err)  # fmt: skip
        return code, out.getvalue(), err.getvalue()

    def env(self) -> dict[str, str]:
        env = dict(os.environ, FLEETCTL_ENDPOINT=self.etcd, FLEETCTL_ETCD_KEY_PREFIX=self.prefix)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        return env


def start_fleetd(etcd: str, prefix: str, mid: str, ip: str, meta: str, state: Path,
                 log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    args = [PY, "-m", "grozd.cli.fleetd", f"--etcd-servers={etcd}",
            f"--etcd-key-prefix={prefix}", f"--machine-id={mid}", f"--public-ip={ip}",
            f"--metadata={meta}", "--api-listen=127.0.0.1:0", f"--state-dir={state}",
            "--agent-ttl=3", "--engine-lease-ttl=2", "--engine-reconcile-interval=2",
            "-v"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)  # fmt: skip


def stop_fleetd(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(check, timeout: float = 10.0, what: str = "it") -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def fleet_cluster(etcd_url: str, tmp: Path, metas: list[str]) -> Iterator[Fleet]:
    prefix = f"/test-fleetctl/{uuid.uuid4().hex[:8]}"
    mids = [f"{i + 1:04d}".rjust(8, "e") + uuid.uuid4().hex[:24] for i in range(len(metas))]
    procs = [
        start_fleetd(etcd_url, prefix, mid, f"127.0.0.{i + 1}", meta, tmp / f"m{i + 1}",
                     tmp / f"m{i + 1}.log")  # fmt: skip
        for i, (mid, meta) in enumerate(zip(mids, metas, strict=True))
    ]
    fleet = Fleet(etcd_url, prefix, mids, procs)
    try:
        wait_until(lambda: fleet.ctl("list-machines", "--no-legend")[1].count("\n") == len(mids),
                   what="the machines to join")  # fmt: skip
        yield fleet
    finally:
        for proc in procs:
            stop_fleetd(proc)
        with SyncClient([etcd_url]) as client, contextlib.suppress(KeyNotFoundError):
            client.delete(prefix, recursive=True)


@pytest.fixture(scope="module")
def fleet(etcd_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two fleetd machines (eu/ssd and us) sharing one prefix for the module."""
    with fleet_cluster(etcd_url, tmp_path_factory.mktemp("fleetd"),
                       ["region=eu,disk=ssd", "region=us"]) as f:  # fmt: skip
        yield f


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_list_machines_columns(fleet: Fleet):
    m1, m2 = fleet.machines
    code, out, _ = fleet.ctl("list-machines")
    assert code == 0
    assert out == ("MACHINE\t\tIP\t\tMETADATA\n"
                   f"{m1[:8]}...\t127.0.0.1\tdisk=ssd,region=eu\n"
                   f"{m2[:8]}...\t127.0.0.2\tregion=us\n")  # fmt: skip
    code, out, _ = fleet.ctl("list-machines", "-l", "--no-legend")
    assert out.splitlines()[0] == f"{m1}\t127.0.0.1\tdisk=ssd,region=eu"
    code, out, _ = fleet.ctl("list-machines", "--fields=ip,machine", "-full")
    assert out.splitlines() == ["IP\t\tMACHINE", f"127.0.0.1\t{m1}", f"127.0.0.2\t{m2}"]
    assert fleet.ctl("list-machines", "--fields=ip,nope") == (
        1, "", 'Invalid key in output format: "nope"\n')
    assert fleet.ctl("list-machines", "--fields=")[2] == "Must define output format\n"


def test_submit_start_status_journal_stop_destroy(fleet: Fleet, tmp_path: Path):
    m1 = fleet.machines[0]
    tag = uuid.uuid4().hex[:8]
    path = write(tmp_path, "hello.service", f"""[Unit]
Description=Hello {tag}
[Service]
ExecStart=/bin/sh -c "while true; do echo hello-{tag}; sleep 0.2; done"
[X-Fleet]
MachineMetadata=disk=ssd
""")
    code, out, err = fleet.ctl("submit", path)
    assert (code, out, err) == (0, "Unit hello.service inactive\n", "")
    code, out, _ = fleet.ctl("list-unit-files")
    assert out.splitlines()[0] == "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET"
    row = [line for line in out.splitlines() if line.startswith("hello.service")][0]
    assert row.split() == ["hello.service", row.split()[1], "inactive", "inactive", "-"]
    assert len(row.split()[1]) == 7
    code, out, err = fleet.ctl("start", "hello")  # the name without .service, as fleetctl
    assert code == 0, err
    assert out == f"Unit hello.service launched on {m1[:8]}.../127.0.0.1\n"
    code, out, _ = fleet.ctl("list-units")
    assert out.splitlines()[0] == "UNIT\t\tMACHINE\t\t\tACTIVE\tSUB"
    assert f"hello.service\t{m1[:8]}.../127.0.0.1\tactive\trunning" in out.splitlines()
    code, out, _ = fleet.ctl("list-units", "--fields=unit,load,hash,machine", "-l")
    assert "hello.service\tloaded\t" in out and f"\t{m1}/127.0.0.1" in out
    code, out, _ = fleet.ctl("list-unit-files", "--fields=unit,dstate,state,target,desc")
    assert f"hello.service\tlaunched\tlaunched\t{m1[:8]}.../127.0.0.1\tHello {tag}" in out
    code, out, _ = fleet.ctl("cat", "hello.service")
    assert out == Path(path).read_text()
    code, out, _ = fleet.ctl("status", "hello.service")
    assert code == 0
    assert out.startswith(f"● hello.service - Hello {tag}\n")
    assert "Active: active (running)" in out and "CGroup: grozd/hello.service" in out
    wait_until(lambda: fleet.ctl("journal", "--lines", "3", "hello")[1].count(f"hello-{tag}") >= 3,
               what="three journal lines")  # fmt: skip
    code, out, _ = fleet.ctl("journal", "--lines=2", "hello.service")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and all("sh[" in ln for ln in lines)
    # -f follows new lines as they come (the real CLI, in a process of its own).
    follower = subprocess.Popen(
        [PY, "-m", "grozd.cli.fleetctl", "journal", "-f", "--lines=1", "hello.service"],
        stdout=subprocess.PIPE, env=fleet.env(),
    )  # fmt: skip
    try:
        got = [follower.stdout.readline() for _ in range(4)]
        assert all(f"hello-{tag}".encode() in line for line in got)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
    code, out, err = fleet.ctl("stop", "hello.service")
    assert code == 0
    assert out == f"Unit hello.service loaded on {m1[:8]}.../127.0.0.1\n"
    assert err == "Successfully stopped units [hello.service].\n"
    code, out, _ = fleet.ctl("status", "hello.service")
    assert code == 3 and "inactive (dead)" in out and "Stopped Hello" in out
    assert not _processes_with(f"hello-{tag}")
    assert fleet.ctl("unload", "hello.service")[:2] == (0, "Unit hello.service inactive\n")
    code, out, err = fleet.ctl("stop", "hello.service")
    assert (code, err) == (1, "Unable to stop unit hello.service in state inactive\n")
    assert fleet.ctl("load", "hello.service")[:2] == (
        0, f"Unit hello.service loaded on {m1[:8]}.../127.0.0.1\n")
    assert fleet.ctl("start", "--no-block", "hello.service")[1] == (
        "Triggered unit hello.service start\n")
    assert fleet.ctl("destroy", "hello.service")[:2] == (0, "Destroyed hello.service\n")
    assert "hello.service" not in fleet.ctl("list-unit-files")[1]
    assert fleet.ctl("cat", "hello.service") == (1, "", "Unit hello.service not found.\n")


def _processes_with(text: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
    return False


def test_bad_input_and_usage(fleet: Fleet, tmp_path: Path):
    bad = write(tmp_path, "bad.service", "[Service]\nExecStart=/bin/true\n[Oops\n")
    assert fleet.ctl("submit", bad) == (
        1, "", f"Error creating units: {bad}:3: invalid section header '[Oops'\n")
    noeq = write(tmp_path, "noeq.service", "[Service]\nExecStart\n")
    assert fleet.ctl("start", "--no-block", noeq)[2] == (
        f"Error creating units: {noeq}:2: missing '=' in 'ExecStart'\n")
    odd = write(tmp_path, "odd.service",
                "[Service]\nExecStart=/bin/sleep 300\n[X-Fleet]\nMachineMetdata=region=us\n")
    code, out, err = fleet.ctl("submit", odd)
    assert code == 0 and out == "Unit odd.service inactive\n"
    assert err == (f"WARNING: {odd}:4: unknown [X-Fleet] option 'MachineMetdata', ignoring it"
                   " (did you mean 'MachineMetadata'?)\n")
    meta = write(tmp_path, "meta.service", "[Service]\nExecStart=/bin/true\n"
                                           "[X-Fleet]\nMachineMetadata=region\n")  # fmt: skip
    assert fleet.ctl("submit", meta)[2] == (
        f"Error creating units: {meta}:4: MachineMetadata=: expected key=value, got 'region'\n")
    assert fleet.ctl("destroy", "odd.service")[0] == 0
    tmpl = write(tmp_path, "tpl@.service", "[Service]\nExecStart=/bin/sleep 300\n")
    assert fleet.ctl("submit", tmpl)[0] == 0
    code, _, err = fleet.ctl("start", "tpl@.service")
    assert code == 1 and "is a template unit" in err
    assert fleet.ctl("status", "nope.service") == (1, "", "Unit nope.service does not exist.\n")
    assert fleet.ctl("journal", "tpl@.service") == (
        1, "", "Unit tpl@.service does not appear to be running.\n")
    assert fleet.ctl("journal")[2] == "One unit file must be provided.\n"
    assert fleet.ctl("start") == (0, "", "No units given\n")
    assert fleet.ctl("destroy", "never-submitted.service") == (0, "", "")
    code, out, _ = fleet.ctl("frobnicate")
    assert code == 2 and 'unknown subcommand: "frobnicate"' in out
    assert fleet.ctl("list-units", "--bogus")[0] == 2
    code, _, err = fleet.ctl("ssh", fleet.machines[0])
    assert code == 1 and "not supported" in err
    code, out, _ = fleet.ctl("help")
    assert code == 0 and "ssh" in out and "out of scope" in out
    # An instance is created from the template in the registry.
    code, out, err = fleet.ctl("start", "tpl@web1")
    assert code == 0, err
    assert out.startswith("Unit tpl@web1.service inactive\nUnit tpl@web1.service launched on ")
    assert fleet.ctl("cat", "tpl@web1.service")[1] == "[Service]\nExecStart=/bin/sleep 300\n"
    for name in ("tpl@.service", "tpl@web1.service"):
        assert fleet.ctl("destroy", name)[0] == 0


def test_submit_replace(fleet: Fleet, tmp_path: Path):
    path = write(tmp_path, "ver.service", "[Unit]\nDescription=v1\n[Service]\n"
                                          "ExecStart=/bin/sleep 300\n")  # fmt: skip
    assert fleet.ctl("start", path)[0] == 0
    Path(path).write_text("[Unit]\nDescription=v2\n[Service]\nExecStart=/bin/sleep 301\n")
    code, _, err = fleet.ctl("submit", path)
    assert code == 0
    assert err == (f"WARNING: Unit ver.service in registry differs from local unit file {path}."
                   " Add --replace to override.\n")  # fmt: skip
    assert fleet.ctl("submit", path)[2] == err
    code, out, err = fleet.ctl("start", "--replace", path)
    assert code == 0 and fleet.ctl("cat", "ver.service")[1] == Path(path).read_text()
    # The agent reloads the new file and starts it again.
    wait_until(lambda: "● ver.service - v2" in fleet.ctl("status", "ver.service")[1],
               what="the new version to run")  # fmt: skip
    assert fleet.ctl("destroy", "ver.service")[0] == 0


def test_global_units_and_unschedulable_units(fleet: Fleet, tmp_path: Path):
    g = write(tmp_path, "everywhere.service",
              "[Service]\nExecStart=/bin/sleep 300\n[X-Fleet]\nGlobal=true\n")
    code, out, _ = fleet.ctl("start", g)
    assert code == 0
    assert out == ("Unit everywhere.service inactive\n"
                   "Triggered global unit everywhere.service start\n")  # fmt: skip
    wait_until(lambda: fleet.ctl("list-units")[1].count("everywhere.service") == 2,
               what="the global unit on both machines")  # fmt: skip
    code, out, _ = fleet.ctl("list-unit-files", "--fields=unit,global,state,target")
    assert ["everywhere.service", "true", "-", "global"] in [ln.split() for ln in out.splitlines()]
    assert fleet.ctl("status", "everywhere.service")[2] == (
        "Unable to determine status of global unit everywhere.service.\n")
    mars = write(tmp_path, "mars.service",
                 "[Service]\nExecStart=/bin/sleep 300\n[X-Fleet]\nMachineMetadata=region=mars\n")
    code, out, err = fleet.ctl("start", "--block-attempts=3", mars)
    assert code == 1
    assert "Unit mars.service is not scheduled: no eligible machine (" in err
    assert err.endswith("Error waiting for units: timed out waiting for unit mars.service to"
                        " report state launched\n")  # fmt: skip
    code, out, err = fleet.ctl("list-units")
    assert ["mars.service", "-", "-", "-"] in [ln.split() for ln in out.splitlines()]
    assert err.startswith("Unit mars.service is not scheduled: no eligible machine")
    code, out, _ = fleet.ctl("list-units", "--fields=unit,reason", "--no-legend")
    rows = {ln.split("\t")[0]: ln.split("\t")[-1] for ln in out.splitlines()}
    assert rows["mars.service"].startswith("no eligible machine (")
    assert "metadata does not match region=mars" in rows["mars.service"]
    assert rows["everywhere.service"] == "-"
    for name in ("everywhere.service", "mars.service"):
        assert fleet.ctl("destroy", name)[0] == 0
    wait_until(lambda: "everywhere" not in fleet.ctl("list-units")[1], what="global to go")


def test_real_cli_with_environment_and_exit_codes(fleet: Fleet):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "grozd.cli.fleetctl", *args], env=fleet.env(),
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    proc = run("list-machines", "--no-legend", "--fields=machine")
    assert proc.returncode == 0
    assert proc.stdout.split() == [f"{m[:8]}..." for m in fleet.machines]
    assert run("--version").stdout.startswith("fleetctl version ")
    assert run("no-such-command").returncode == 2
    assert run("status", "missing.service").returncode == 1


def test_fleetd_sigterm_stops_units_and_leaves_the_cluster(etcd_url: str, tmp_path: Path):
    with fleet_cluster(etcd_url, tmp_path, ["role=solo"]) as f:
        tag = uuid.uuid4().hex[:8]
        unit = write(tmp_path, "busy.service",
                     f"[Service]\nExecStart=/bin/sh -c 'sleep 300 & sleep 301 # {tag}'\n")
        assert f.ctl("start", unit)[0] == 0
        wait_until(lambda: _processes_with(tag), what="the unit to run")
        assert stop_fleetd(f.procs[0]) == 0
        assert not _processes_with(tag)
        assert f.ctl("list-machines", "--no-legend") == (0, "", "")
        assert f.ctl("list-units", "--no-legend")[1] == ""


def test_fleetd_flags():
    config, verbosity = parse_args([])
    assert config.etcd_servers == ["http://127.0.0.1:2379"]
    assert config.etcd_key_prefix == "/_grozd/fleet/"
    assert (config.agent_ttl, config.runner, verbosity) == (30, "auto", 0)
    config, verbosity = parse_args([
        "--etcd-servers=http://127.0.0.1:2379,http://127.0.0.1:4001",
        "-metadata=region=eu,disk=ssd",
        "--public_ip", "203.0.113.7", "--etcd_key_prefix=/x/", "--agent-ttl=10s",
        "--machine-id=" + "f" * 32, "--disable-engine", "-vv",
    ])  # fmt: skip
    assert config == FleetdConfig(
        etcd_servers=["http://127.0.0.1:2379", "http://127.0.0.1:4001"],
        etcd_key_prefix="/x/", machine_id="f" * 32, public_ip="203.0.113.7",
        metadata={"region": "eu", "disk": "ssd"}, agent_ttl=10, disable_engine=True,
        state_dir=config.state_dir,
    )  # fmt: skip
    assert verbosity == 2
    with pytest.raises(SystemExit) as exc:
        parse_args(["--metadata=region"])
    assert exc.value.code == 2
