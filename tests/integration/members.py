"""Real `grozd etcd` processes, one per namespace host, started and killed by recorded PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.netns import Lab

GROZD = [sys.executable, "-m", "grozd"]


class Members:
    def __init__(self, lab: Lab, root: Path, size: int = 3, token: str = "it-cluster",
                 extra: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.root = root
        self.size = size
        self.token = token
        self.extra = extra
        self.procs: dict[int, subprocess.Popen] = {}

    def peer_url(self, i: int) -> str:
        return f"http://{self.lab.addr(i)}:2380"

    def client_url(self, i: int) -> str:
        return f"http://{self.lab.addr(i)}:2379"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url(i) for i in range(1, self.size + 1)]

    def data_dir(self, i: int) -> Path:
        return self.root / f"m{i}"

    def start(self, i: int, state: str = "new", cluster: str | None = None) -> None:
        cluster = cluster or ",".join(f"m{j}={self.peer_url(j)}"
                                      for j in range(1, self.size + 1))
        args = [
            "ip", "netns", "exec", self.lab.hosts[i - 1], *GROZD, "etcd",
            "--name", f"m{i}", "--data-dir", str(self.data_dir(i)),
            "--listen-peer-urls", self.peer_url(i),
            "--initial-advertise-peer-urls", self.peer_url(i),
            "--listen-client-urls", self.client_url(i),
            "--advertise-client-urls", self.client_url(i),
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50", "--election-timeout", "500", *self.extra,
        ]  # fmt: skip
        log = open(self.root / f"m{i}.log", "ab")
        # `ip netns exec` execs the command: the PID recorded is the member's own.
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        log.close()

    def start_all(self) -> None:
        for i in range(1, self.size + 1):
            self.start(i)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(i)
        proc.send_signal(sig)
        proc.wait(10)

    def log(self, i: int) -> str:
        return (self.root / f"m{i}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for i in list(self.procs):
            proc = self.procs.pop(i)
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def wait_exit(self, i: int, timeout: float = 15) -> int:
        proc = self.procs[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.procs.pop(i)
                return proc.returncode
            time.sleep(0.05)
        raise AssertionError(f"member {i} still running")
