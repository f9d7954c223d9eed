"""Side by side, one run: a 3-member grozd and a 3-member etcd 3.4 on loopback, fsync on.

Writes (PUT, 100-byte values) and reads (default and quorum=true) at 1, 16, 64 and 256
concurrent clients (wrk, keep-alive), throughput and p50/p99 latency; then members' CPU
seconds and resident memory after 100k keys. Prints a table with the grozd/etcd ratio per row;
the two measurements of a row are taken back to back (both clusters stay up).

Run: .venv/bin/python bench/compare_etcd.py [--seconds 5] [--clients 1,16,64,256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PUT_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/v2/keys/bench/k" .. (counter % 100000),
    {["Content-Type"] = "application/x-www-form-urlencoded"}, "value=" .. string.rep("x", 100))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.client_urls: list[str] = []

    def start(self) -> None:
        peers = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
        clients = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
        cluster = ",".join(f"m{i}={u}" for i, u in enumerate(peers))
        for i in range(3):
            common = [
                "--name", f"m{i}", "--data-dir", str(self.root / f"{self.kind}-m{i}"),
                "--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
                "--listen-client-urls", clients[i], "--advertise-client-urls", clients[i],
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"bench-{self.kind}",
            ]  # fmt: skip
            if self.kind == "etcd":
                args = ["etcd", *common, "--enable-v2=true", "--log-level", "error",
                        "--logger", "zap"]
            else:
                args = [sys.executable, "-m", "grozd", "etcd", *common]
            log = open(self.root / f"{self.kind}-m{i}.log", "wb")
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        self.client_urls = clients
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.leader_url() and all(self.answers(u) for u in clients):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} cluster did not elect a leader")

    @staticmethod
    def answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/v2/keys/", timeout=1):
                return True
        except OSError:
            return False

    def leader_url(self) -> str | None:
        for url in self.client_urls:
            try:
                with urllib.request.urlopen(f"{url}/v2/stats/self", timeout=1) as r:
                    if b"StateLeader" in r.read():
                        return url
            except OSError:
                pass
        return None

    def usage(self) -> tuple[float, float]:
        """CPU seconds and resident MiB, averaged over the members."""
        cpu, rss = 0.0, 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            status = Path(f"/proc/{p.pid}/status").read_text()
            rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        return cpu / len(self.procs), rss / len(self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def wrk(url: str, clients: int, seconds: float, script: Path | None) -> dict:
    args = ["wrk", "-t", str(min(2, clients)), "-c", str(clients),
            "-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    if script:
        args += ["-s", str(script)]
    proc = subprocess.run([*args, url], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"wrk failed: {proc.stdout}{proc.stderr}")
    out = proc.stdout

    def latency(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": latency("50%"), "p99": latency("99%"),
            "errors": int(errors.group(1)) if errors else 0}


LOADS = ("write", "read", "quorum read")


class Target:
    """Where each load goes in one cluster: writes and quorum reads to the leader (as a
    client library would), default reads to a follower."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.leader = cluster.leader_url()
        self.follower = next(u for u in cluster.client_urls if u != self.leader)
        urllib.request.urlopen(urllib.request.Request(
            f"{self.leader}/v2/keys/bench/read", data=b"value=" + b"x" * 100, method="PUT"))

    def load(self, load: str, clients: int, seconds: float, script: Path) -> dict:
        if load == "write":
            return wrk(self.leader, clients, seconds, script)
        if load == "read":
            return wrk(f"{self.follower}/v2/keys/bench/read", clients, seconds, None)
        return wrk(f"{self.leader}/v2/keys/bench/read?quorum=true", clients, seconds, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", default="1,16,64,256")
    args = p.parse_args()
    if not shutil.which("wrk") or not shutil.which("etcd"):
        sys.exit("needs wrk and etcd (apt-get install wrk etcd-server)")
    counts = [int(c) for c in args.clients.split(",")]
    kinds = ("grozd", "etcd")
    results: dict[str, dict[tuple[str, int], dict]] = {k: {} for k in kinds}
    usage: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script = root / "put.lua"
        script.write_text(PUT_SCRIPT)
        clusters = {k: Cluster(k, root) for k in kinds}
        try:
            for cluster in clusters.values():
                cluster.start()
            targets = {k: Target(c) for k, c in clusters.items()}
            # Both clusters stay up (an idle one costs next to nothing) and each measurement
            # is taken back to back with its twin, first one then the other, so the ratio of
            # a row is not skewed by the machine drifting between two halves of the run.
            for n, key in enumerate((load, c) for c in counts for load in LOADS):
                for kind in kinds if n % 2 == 0 else kinds[::-1]:
                    results[kind][key] = targets[kind].load(*key, args.seconds, script)
            for kind in kinds:
                # Fill to 100k keys (the write runs wrapped around keys k0..k99999).
                rate = max(results[kind].get(("write", 64), {"rps": 5000})["rps"], 1)
                wrk(targets[kind].leader, 64, max(args.seconds, 100_000 / rate + 2), script)
                usage[kind] = clusters[kind].usage()
        finally:
            for cluster in clusters.values():
                cluster.stop()
    grozd, etcd = results["grozd"], results["etcd"]
    grozd_use, etcd_use = usage["grozd"], usage["etcd"]
    print(f"\n{'load':<12}{'clients':>8} | {'grozd req/s':>12}{'p50 ms':>8}{'p99 ms':>8} |"
          f" {'etcd req/s':>11}{'p50 ms':>8}{'p99 ms':>8} | {'ratio':>6}")
    for key in grozd:
        g, e = grozd[key], etcd[key]
        print(f"{key[0]:<12}{key[1]:>8} | {g['rps']:>12,.0f}{g['p50']:>8.2f}{g['p99']:>8.2f} |"
              f" {e['rps']:>11,.0f}{e['p50']:>8.2f}{e['p99']:>8.2f} | {g['rps'] / e['rps']:>6.2f}"
              + (f"  (errors: grozd {g['errors']}, etcd {e['errors']})"
                 if g["errors"] or e["errors"] else ""))
    print(f"{'after 100k keys':<21}| CPU s/member {grozd_use[0]:>7.1f},"
          f" RSS {grozd_use[1]:>6.0f} MiB"
          f" | CPU s/member {etcd_use[0]:>6.1f}, RSS {etcd_use[1]:>5.0f} MiB"
          f" | RSS ratio {grozd_use[1] / etcd_use[1]:.2f}")


if __name__ == "__main__":
    main()
