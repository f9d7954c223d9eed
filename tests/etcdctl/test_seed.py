"""The examples etcd's documentation starts with, run as a person would: `grozd etcdctl` as
a process (and the real etcdctl beside it where they should agree), against `grozd etcd`."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grozd.client import SyncClient
from tests.etcdctl.servers import (
    GROZD_CMD,
    Server,
    etcdctl_or_skip,
    grozd_env,
    start_grozd,
    start_real,
)
from tests.realetcd import etcd_or_skip


@pytest.fixture(scope="module")
def grozd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_grozd(tmp_path_factory.mktemp("seed-grozd")) as server:
        yield server


def tool_cmd(tool: str, server: Server) -> list[str]:
    base = GROZD_CMD if tool == "grozd" else [etcdctl_or_skip()]
    return [*base, "--endpoints", server.client_url]


def tool_env() -> dict[str, str]:
    return {**grozd_env(), "ETCDCTL_API": "2"}


def run(tool: str, server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tool_cmd(tool, server), *args], capture_output=True, text=True,
                          env=tool_env(), timeout=30)


class Background:
    """A long-running etcdctl whose stdout is read line by line; killed by its own PID."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=tool_env())
        self.buffer = b""

    def lines(self, count: int, timeout: float = 10) -> list[str]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.buffer += chunk
        return self.buffer.decode().splitlines()[:count]

    def stop(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


def watchers(server: Server) -> int:
    """Watches registered on the server (its store stats)."""
    with SyncClient([server.client_url]) as c:
        return int(c.store_stats().get("watchers", 0))


def wait_for_watchers(server: Server, count: int, timeout: float = 10) -> None:
    """Until at least `count` watches are registered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watchers(server) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} watchers")


def test_set_with_ttl_then_get(grozd: Server) -> None:
    r = run("grozd", grozd, "set", "/foo/bar", "Hello world", "--ttl", "60")
    assert (r.stdout, r.stderr, r.returncode) == ("Hello world\n", "", 0)
    r = run("grozd", grozd, "get", "/foo/bar")
    assert (r.stdout, r.returncode) == ("Hello world\n", 0)
    r = run("grozd", grozd, "-o", "extended", "get", "/foo/bar")
    ttl = int(re.search(r"^TTL: (\d+)$", r.stdout, re.M).group(1))
    assert 50 <= ttl <= 60, r.stdout


def test_watch_forever_prints_every_write_like_etcdctl(grozd: Server) -> None:
    before = watchers(grozd)
    bg = [Background([*tool_cmd(tool, grozd), "watch", "/seed/w", "--forever"])
          for tool in ("grozd", "etcdctl")]
    try:
        wait_for_watchers(grozd, before + 2)
        with SyncClient([grozd.client_url]) as c:
            c.set("/seed/w", "one")
            c.set("/seed/w", "two")
        outputs = [w.lines(2) for w in bg]
    finally:
        codes = [w.stop() for w in bg]
    assert outputs == [["one", "two"], ["one", "two"]]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]


def test_watch_ends_quietly_on_ctrl_c(grozd: Server) -> None:
    before = watchers(grozd)
    w = Background([*tool_cmd("grozd", grozd), "watch", "/seed/int", "--forever"])
    try:
        wait_for_watchers(grozd, before + 1)
    finally:
        code = w.stop(signal.SIGINT)
    assert code == 0


def test_exec_watch_runs_the_command_with_the_event_in_its_environment(grozd: Server) -> None:
    # The form etcd's README shows: key, then `--`, then the command.
    before = watchers(grozd)
    w = Background([*tool_cmd("grozd", grozd), "exec-watch", "/seed/e", "--",
                    "sh", "-c", "env | grep ^ETCD_WATCH_ | sort"])
    try:
        wait_for_watchers(grozd, before + 1)
        with SyncClient([grozd.client_url]) as c:
            index = c.set("/seed/e", "Hello world").node.modified_index
        lines = w.lines(4)
    finally:
        w.stop()
    assert lines == ["ETCD_WATCH_ACTION=set", "ETCD_WATCH_KEY=/seed/e",
                     f"ETCD_WATCH_MODIFIED_INDEX={index}", "ETCD_WATCH_VALUE=Hello world"]


def test_exec_watch_agrees_with_etcdctl(grozd: Server) -> None:
    # etcdctl 3.4 reads `exec-watch KEY -- CMD` right only after a flag (or as CMD... KEY).
    forms = [["--recursive", "/seed/x", "--", "sh", "-c", "env | grep ^ETCD_WATCH_ | sort"],
             ["sh", "-c", "env | grep ^ETCD_WATCH_ | sort", "/seed/x/k"]]
    before = watchers(grozd)
    bg = [Background([*tool_cmd(tool, grozd), "exec-watch", *form])
          for form in forms for tool in ("grozd", "etcdctl")]
    try:
        wait_for_watchers(grozd, before + 4)
        with SyncClient([grozd.client_url]) as c:
            c.set("/seed/x/k", "v1")
        outputs = [w.lines(4) for w in bg]
    finally:
        for w in bg:
            w.stop()
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    assert "ETCD_WATCH_VALUE=v1" in outputs[0]


def test_ls_recursive_p_then_rm_recursive(grozd: Server) -> None:
    for key in ("/path/to/dir/a", "/path/to/dir/sub/b", "/path/to/c"):
        assert run("grozd", grozd, "set", key, "v").returncode == 0
    r = run("grozd", grozd, "ls", "--recursive", "-p", "/path")
    assert sorted(r.stdout.splitlines()) == ["/path/to/", "/path/to/c", "/path/to/dir/",
                                             "/path/to/dir/a", "/path/to/dir/sub/",
                                             "/path/to/dir/sub/b"]
    r = run("grozd", grozd, "rm", "/path/to/dir", "--recursive")
    assert (r.stdout, r.stderr, r.returncode) == ("", "", 0)
    r = run("grozd", grozd, "ls", "/path/to")
    assert (r.stdout, r.returncode) == ("/path/to/c\n", 0)
    r = run("grozd", grozd, "get", "/path/to/dir/a")
    assert r.returncode == 4 and r.stderr.startswith("Error:  100: Key not found (/path/to/dir)")


def curl_put(url: str) -> dict:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    p = subprocess.run([curl, "-sS", "-L", f"{url}/v2/keys/mykey", "-XPUT", "-d",
                        "value=this is awesome"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_curl_put_answers_like_etcd(grozd: Server, tmp_path: Path) -> None:
    etcd_or_skip()
    got = curl_put(grozd.client_url)
    with start_real(tmp_path) as real:
        want = curl_put(real.client_url)
    for answer in (got, want):
        answer["node"].pop("createdIndex")
        answer["node"].pop("modifiedIndex")
    assert got == want == {"action": "set", "node": {"key": "/mykey",
                                                     "value": "this is awesome"}}
    r = run("grozd", grozd, "get", "/mykey")
    assert r.stdout == "this is awesome\n"
