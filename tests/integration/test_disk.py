"""A member whose disk fills up: writes fail with a clear error, nothing half-written stays,
and once space is freed it serves writes again and restarts with every acknowledged write."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def put(url: str, key: str, value: str) -> tuple[int, dict]:
    body = urllib.parse.urlencode({"value": value}).encode()
    req = urllib.request.Request(f"{url}/v2/keys/{key}", data=body, method="PUT",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str, key: str) -> dict:
    with urllib.request.urlopen(f"{url}/v2/keys/{key}", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def start_member(data_dir: Path, log: Path, client: int,
                 peer: int) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{client}"
    args = [sys.executable, "-m", "grozd", "etcd", "--data-dir", str(data_dir),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--heartbeat-interval", "20", "--election-timeout", "200"]
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if put(url, "ready", "1")[0] in (200, 201):
                return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("member did not start: " + log.read_text())


def test_full_disk_fails_writes_then_recovers(small_disk: Path, tmp_path: Path) -> None:
    log = tmp_path / "member.log"
    ports = free_port(), free_port()  # the same on restart: the member ID derives from them
    proc, url = start_member(small_disk / "data", log, *ports)
    try:
        # Leave a little room, then write until the disk refuses.
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 300_000))
        acked, failure = [], None
        for n in range(100):
            status, body = put(url, f"k{n}", "v" * 20_000)
            if status in (200, 201):
                acked.append(n)
            else:
                failure = (status, body)
                break
        assert failure is not None, "the disk never filled"
        status, body = failure
        assert status == 500 and "No space left on device" in body.get("cause", ""), failure
        filler.unlink()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, _ = put(url, "after", "space freed")
            if status in (200, 201):
                break
            time.sleep(0.2)
        assert status in (200, 201), "writes did not resume after space was freed"
        proc.terminate()
        proc.wait(10)
        proc, url = start_member(small_disk / "data", log, *ports)
        for n in acked:
            assert get(url, f"k{n}")["node"]["value"] == "v" * 20_000
        assert get(url, "after")["node"]["value"] == "space freed"
    finally:
        proc.kill()
        proc.wait(10)


def test_corruption_before_the_tail_stops_the_member_naming_file_and_offset(
        tmp_path: Path) -> None:
    log = tmp_path / "member.log"
    ports = free_port(), free_port()
    proc, url = start_member(tmp_path / "data", log, *ports)
    try:
        for n in range(30):
            assert put(url, f"k{n}", "x" * 50)[0] in (200, 201)
    finally:
        proc.terminate()
        proc.wait(10)
    wal = sorted((tmp_path / "data" / "member" / "wal").glob("*.wal"))[-1]
    data = bytearray(wal.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wal.write_bytes(bytes(data))
    client, peer = ports
    args = [sys.executable, "-m", "grozd", "etcd", "--data-dir", str(tmp_path / "data"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("grozd etcd: ") and wal.name in last and "offset" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert wal.read_bytes() == bytes(data)  # nothing was "repaired" away


def test_metrics_show_proposals_fsyncs_and_leader_changes(tmp_path: Path) -> None:
    proc, url = start_member(tmp_path / "data", tmp_path / "member.log", free_port(),
                             free_port())
    try:
        for n in range(5):
            put(url, f"k{n}", "v")
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                       if line and not line.startswith("#"))
        assert float(samples["etcd_server_proposals_total"]) >= 5
        assert float(samples["etcd_server_leader_changes_seen_total"]) >= 1
        assert float(samples["etcd_disk_wal_fsync_duration_seconds_count"]) >= 5
        assert float(samples["etcd_disk_wal_fsync_total"]) >= 5
        with urllib.request.urlopen(f"{url}/v2/stats/self", timeout=5) as resp:
            assert "raft" not in json.loads(resp.read())  # etcd's body, nothing added
    finally:
        proc.kill()
        proc.wait(10)
