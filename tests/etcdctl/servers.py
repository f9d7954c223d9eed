"""A real etcd and a single `grozd etcd` member on free loopback ports, and both etcdctls.

`run_real` runs /usr/bin/etcdctl (ETCDCTL_API=2) as a process; `run_grozd` calls
`grozd.cli.etcdctl.main` in this process with its streams captured (fast, same code).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grozd.cli import etcdctl
from tests.realetcd import free_port, start_etcd

ETCDCTL = os.environ.get("GROZD_ETCDCTL_BIN", "/usr/bin/etcdctl")
NAME = "node1"
GROZD_CMD = [sys.executable, "-m", "grozd.cli.etcdctl"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


@dataclass
class Server:
    """A running single-member server: its kind, client URL and peer URL."""

    kind: str  # "etcd" | "grozd"
    client_url: str
    peer_url: str


@dataclass(frozen=True)
class Result:
    """What one etcdctl run printed and returned."""

    stdout: str
    stderr: str
    code: int


def etcdctl_or_skip() -> str:
    if not (os.path.isfile(ETCDCTL) and os.access(ETCDCTL, os.X_OK)):
        found = shutil.which("etcdctl")
        if found is None:
            pytest.skip("real etcdctl not installed; `install.sh --dev` adds it")
        return found
    return ETCDCTL


def run_real(args: list[str], stdin: str = "", env: dict[str, str] | None = None,
             timeout: float = 10) -> Result:
    """The real etcdctl, v2 API."""
    full_env = {**os.environ, "ETCDCTL_API": "2", **(env or {})}
    for name in ("ETCDCTL_ENDPOINTS", "ETCDCTL_ENDPOINT", "ETCDCTL_PEERS"):
        if env is None or name not in env:
            full_env.pop(name, None)
    p = subprocess.run([etcdctl_or_skip(), *args], input=stdin.encode(), capture_output=True,
                       env=full_env, timeout=timeout)
    return Result(p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"),
                  p.returncode)


@contextlib.contextmanager
def _patched_env(env: dict[str, str] | None) -> Iterator[None]:
    names = ("ETCDCTL_ENDPOINTS", "ETCDCTL_ENDPOINT", "ETCDCTL_PEERS")
    saved = {n: os.environ.get(n) for n in names}
    try:
        for n in names:
            os.environ.pop(n, None)
        os.environ.update(env or {})
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def run_grozd(args: list[str], stdin: str = "", env: dict[str, str] | None = None) -> Result:
    """`grozd etcdctl`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with _patched_env(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = etcdctl.main(args)
    finally:
        sys.stdin = old
    return Result(out.getvalue(), err.getvalue(), code)


def grozd_env() -> dict[str, str]:
    """Environment for a `python -m grozd...` child that imports this checkout."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": SRC + (os.pathsep + path if path else "")}


def _healthy(url: str) -> bool:
    """Healthy, and its client URL published in /v2/members (grozd serves before it has
    published; see test_a_member_serves_clients_only_once_its_client_urls_are_published)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as r:
            if json.loads(r.read()).get("health") != "true":
                return False
        with urllib.request.urlopen(url + "/v2/members", timeout=1.0) as r:
            return any(url in m.get("clientURLs", []) for m in json.loads(r.read())["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def start_grozd(tmp_path: Path, name: str = NAME) -> Iterator[Server]:
    """One `grozd etcd` member as a subprocess, data under tmp_path."""
    log_text = ""
    for attempt in range(3):
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        log_path = tmp_path / f"grozd-{attempt}.log"
        args = [sys.executable, "-m", "grozd", "etcd", "--name", name,
                "--data-dir", str(tmp_path / f"grozd-data-{attempt}"),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--heartbeat-interval", "20", "--election-timeout", "200"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=grozd_env())
        try:
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if _healthy(client_url):
                    break
                time.sleep(0.05)
            else:
                log_text = log_path.read_text(errors="replace")[-2000:]
                continue
            yield Server("grozd", client_url, peer_url)
            return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    raise RuntimeError(f"grozd etcd did not become healthy:\n{log_text}")


@contextlib.contextmanager
def start_real(tmp_path: Path, name: str = NAME) -> Iterator[Server]:
    """A real etcd member (tests/realetcd.py), named like the grozd one."""
    with start_etcd(tmp_path, name=name) as (proc, client_url):
        peer = next(a for a in proc.args if str(a).startswith("http://")
                    and str(a) != client_url)
        yield Server("etcd", client_url, str(peer))


@contextlib.contextmanager
def start_server(kind: str, tmp_path: Path) -> Iterator[Server]:
    with (start_real if kind == "etcd" else start_grozd)(tmp_path) as server:
        yield server


def etcd_index(url: str) -> int:
    """The server's current X-Etcd-Index."""
    with urllib.request.urlopen(url + "/v2/keys/", timeout=5) as r:
        return int(r.headers["X-Etcd-Index"])


def modified_index(url: str, key: str) -> int:
    with urllib.request.urlopen(url + "/v2/keys" + key, timeout=5) as r:
        return int(json.loads(r.read())["node"]["modifiedIndex"])
