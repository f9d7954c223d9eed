"""Start a real single-member etcd (3.4, v2 API enabled) on loopback for tests.

Usage from a test module or conftest::

    with start_etcd(tmp_path) as (proc, client_url):
        ...

`etcd_or_skip()` skips the calling test when the etcd binary is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD_BIN = os.environ.get("GROZD_ETCD_BIN", "/usr/bin/etcd")
STARTUP_TIMEOUT = 20.0


def etcd_binary() -> str | None:
    """Path of a runnable etcd binary, or None when it is not installed."""
    if os.path.isfile(ETCD_BIN) and os.access(ETCD_BIN, os.X_OK):
        return ETCD_BIN
    return shutil.which("etcd")


def etcd_or_skip() -> str:
    """The etcd binary path; skips the current test when there is none."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip(f"real etcd not installed ({ETCD_BIN} missing); `install.sh --dev` adds it")
    return binary


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (etcd binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=1.0) as r:
            return json.loads(r.read()).get("health") == "true"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # Only ever signal the PID we started ourselves.
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@contextlib.contextmanager
def start_etcd(
    tmp_path: Path, name: str = "grozd-test"
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run etcd with its data dir under tmp_path; yields (process, client URL)."""
    binary = etcd_or_skip()
    last_log = ""
    # The free-port probe is racy (another process may grab the port before etcd binds it),
    # so a start that dies early is retried on fresh ports.
    for attempt in range(3):
        client_port, peer_port = free_port(), free_port()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = tmp_path / f"etcd-data-{attempt}"
        log_path = tmp_path / f"etcd-{attempt}.log"
        args = [
            binary,
            "--name", name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-cluster-state", "new",
            "--enable-v2=true",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            # The log goes to a file, not a pipe nobody reads, so etcd can never block on it.
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _healthy(client_url):
                    break
                time.sleep(0.05)
            else:
                last_log = log_path.read_text(errors="replace")[-2000:]
                _stop(proc)
                continue
        except BaseException:
            _stop(proc)
            raise
        try:
            yield proc, client_url
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"etcd did not become healthy; last log lines:\n{last_log}")
