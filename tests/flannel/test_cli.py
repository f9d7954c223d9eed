"""`grozd flanneld`: flags as flannel's, and the real process under SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from grozd.cli.flanneld import parse_args
from grozd.client import SyncClient
from grozd.flannel.daemon import FlanneldConfig

from .nshelp import UNDERLAY, HostPair, require_root, tool


def test_defaults_are_flannels():
    config, verbosity = parse_args([])
    assert config == FlanneldConfig(
        etcd_endpoints=["http://127.0.0.1:2379"],
        etcd_prefix="/coreos.com/network",
        iface=[],
        subnet_file=Path("/run/flannel/subnet.env"),
        ip_masq=False,
        renew_margin=3600.0,
    )
    assert verbosity == 0


def test_flags_in_both_gnu_and_go_spelling():
    config, verbosity = parse_args([
        "--etcd-endpoints=http://127.0.0.1:2379, http://127.0.0.1:4001",
        "-etcd-prefix=/my/net", "--iface", "eth1", "-iface=eth0", "--public-ip=203.0.113.4",
        "-subnet-file", "/tmp/s.env", "--ip-masq", "-subnet-lease-renew-margin=5", "-v=2",
    ])  # fmt: skip
    assert config.etcd_endpoints == ["http://127.0.0.1:2379", "http://127.0.0.1:4001"]
    assert (config.etcd_prefix, config.iface, config.public_ip) == (
        "/my/net", ["eth1", "eth0"], "203.0.113.4")
    assert (config.subnet_file, config.ip_masq, config.renew_margin, verbosity) == (
        Path("/tmp/s.env"), True, 300.0, 2)
    assert parse_args(["--ip-masq=false"])[0].ip_masq is False
    assert parse_args(["-ip-masq=true"])[0].ip_masq is True
    assert parse_args([])[0].vxlan_userspace is False
    assert parse_args(["--vxlan-userspace"])[0].vxlan_userspace is True
    assert parse_args(["-vxlan-userspace=false"])[0].vxlan_userspace is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--etcd-endpoints=,"], "--etcd-endpoints needs at least one URL"),
        (["--ip-masq=maybe"], "not a boolean: 'maybe'"),
        (["--subnet-lease-renew-margin=0"], "must be at least 1 minute"),
        (["--etcd-endpoint=x"], "unrecognized arguments: --etcd-endpoint=x"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


#: --ip-masq programs iptables (in the test's namespace): only where iptables is installed.
IP_MASQ = shutil.which("iptables") is not None


def flanneld(etcd_url: str, prefix: str, netns: str, subnet_file: Path,
             *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grozd.cli.flanneld", f"--etcd-endpoints={etcd_url}",
         f"--etcd-prefix={prefix}", f"--iface={UNDERLAY}", f"--netns={netns}",
         f"--subnet-file={subnet_file}", f"--ip-masq={IP_MASQ}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_file(proc: subprocess.Popen, path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # only ever our own child
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_sigterm_stops_cleanly_and_keeps_the_lease(hosts: HostPair, etcd_url, prefix, tmp_path):
    etcd = SyncClient([etcd_url])
    etcd.set(f"{prefix}/config", json.dumps({"Network": "198.18.0.0/16"}))
    subnet_file = tmp_path / "run" / "subnet.env"
    proc = flanneld(etcd_url, prefix, hosts.a, subnet_file)
    try:
        wait_for_file(proc, subnet_file)
        env = dict(line.split("=", 1) for line in subnet_file.read_text().splitlines())
        assert env["FLANNEL_IPMASQ"] == str(IP_MASQ).lower() and env["FLANNEL_MTU"] == "1450"
        assert "flannel.1" in tool("ip", "-n", hosts.a, "link")
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err
    subnet = env["FLANNEL_SUBNET"].replace(".1/", ".0-")
    assert f"stopped; lease {subnet.replace('-', '/')} kept" in err
    lease = json.loads(etcd.get(f"{prefix}/subnets/{subnet}").value)
    assert lease["PublicIP"] == "192.0.2.1" and lease["BackendType"] == "vxlan"
    etcd.close()


def test_a_bad_network_config_is_reported_and_waited_out(hosts: HostPair, etcd_url, prefix,
                                                         tmp_path):
    """As flannel: the daemon says what is wrong and starts once the config is fixed."""
    etcd = SyncClient([etcd_url])
    etcd.set(f"{prefix}/config", '{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlna"}}')
    subnet_file = tmp_path / "subnet.env"
    proc = flanneld(etcd_url, prefix, hosts.a, subnet_file)
    try:
        time.sleep(1.5)
        assert proc.poll() is None and not subnet_file.exists()
        etcd.set(f"{prefix}/config", '{"Network": "198.18.0.0/16"}')
        wait_for_file(proc, subnet_file)
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        etcd.close()
    assert code == 0, err
    assert (f"invalid network config (waiting for a valid one): {prefix}/config: unknown"
            " backend type 'vxlna'; did you mean 'vxlan'? (known: vxlan, udp, host-gw, uvxlan)"
            ) in err
    assert err.count("invalid network config") == 1  # reported once, not at every retry


def test_a_missing_namespace_exits_1(etcd_url, prefix, tmp_path):
    require_root()
    name = f"grozd-t-{uuid.uuid4().hex[:8]}-missing"
    try:
        code, err = finish(flanneld(etcd_url, prefix, name, tmp_path / "subnet.env"))
        assert code == 1 and f"network namespace {name!r} not found" in err, (code, err)
        assert name not in tool("ip", "netns", "list")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize(
    ("backend", "extra", "device", "mtu", "kind"),
    [
        ("udp", (), "flannel0", 1472, "tun type tun"),
        ("uvxlan", (), "flannel.1", 1450, "tun type tap"),
        ("vxlan", ("--vxlan-userspace",), "flannel.1", 1450, "tun type tap"),
    ],
)
def test_userspace_backends_run_and_stop_as_a_process(hosts: HostPair, etcd_url, prefix, tmp_path,
                                                     backend, extra, device, mtu, kind):
    """The whole daemon, its data path threads included: up, subnet.env, SIGTERM, device gone."""
    etcd = SyncClient([etcd_url])
    etcd.set(f"{prefix}/config",
             json.dumps({"Network": "198.18.0.0/16", "Backend": {"Type": backend}}))
    etcd.close()
    subnet_file = tmp_path / "subnet.env"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = flanneld(etcd_url, prefix, hosts.a, subnet_file, *extra, "--healthz-port", str(port))
    try:
        wait_for_file(proc, subnet_file)
        assert f"FLANNEL_MTU={mtu}\n" in subnet_file.read_text()
        details = tool("ip", "-n", hosts.a, "-d", "link", "show", device)
        assert kind in details and f"mtu {mtu} " in details
        health = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{health}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{health}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        # The data path's counters are exported (they exist from the start, zero or not).
        assert "flannel_ready 1" in metrics and "flannel_datapath_" in metrics, metrics
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err
    assert device not in tool("ip", "-n", hosts.a, "link")
    if IP_MASQ:
        assert "FLANNEL-POSTRTG" not in tool("ip", "netns", "exec", hosts.a, "iptables", "-t",
                                             "nat", "-S")
