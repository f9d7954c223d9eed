"""fleet against grozd's own store (the other fleet tests use real etcd 3.4): a member, a
fleetd, and fleetctl starting, inspecting and destroying the classic hello unit."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

HELLO = """[Unit]
Description=Hello World

[Service]
ExecStart=/bin/sh -c "while true; do echo Hello World; sleep 1; done"

[X-Fleet]
MachineMetadata=region=eu
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleetctl(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grozd", "fleetctl", "--endpoint", endpoint,
                           *args], capture_output=True, text=True, timeout=60)


def test_hello_unit_runs_on_a_grozd_store(tmp_path: Path) -> None:
    client, peer, api = free_port(), free_port(), free_port()
    store_url = f"http://127.0.0.1:{client}"
    procs = []
    try:
        with open(tmp_path / "etcd.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "grozd", "etcd", "--data-dir", str(tmp_path / "store"),
                 "--listen-client-urls", store_url, "--advertise-client-urls", store_url,
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--heartbeat-interval", "20", "--election-timeout", "200"],
                stdout=log, stderr=subprocess.STDOUT))
        with open(tmp_path / "fleetd.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "grozd", "fleetd", "--etcd-servers", store_url,
                 "--metadata", "region=eu", "--public-ip", "127.0.0.1",
                 "--api-listen", f"127.0.0.1:{api}", "--state-dir", str(tmp_path / "state"),
                 "--machine-id", "0123456789abcdef0123456789abcdef"],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = fleetctl(store_url, "list-machines", "--no-legend")
            if r.returncode == 0 and "region=eu" in r.stdout:
                break
            time.sleep(0.3)
        assert "region=eu" in r.stdout, r.stderr
        unit = tmp_path / "hello.service"
        unit.write_text(HELLO)
        r = fleetctl(store_url, "start", str(unit))
        assert r.returncode == 0 and "launched on 01234567.../127.0.0.1" in r.stdout, r
        while time.monotonic() < deadline:
            r = fleetctl(store_url, "list-units", "--no-legend")
            if "active\trunning" in r.stdout:
                break
            time.sleep(0.3)
        assert "hello.service\t01234567.../127.0.0.1\tactive\trunning" in r.stdout, r.stdout
        time.sleep(1.2)
        assert "Hello World" in fleetctl(store_url, "journal", "--lines", "2",
                                         "hello.service").stdout
        assert fleetctl(store_url, "destroy", "hello.service").returncode == 0
        assert "hello.service" not in fleetctl(store_url, "list-units").stdout
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
