"""`grozd flanneld`: flags as flannel's, and the real process under SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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


def flanneld(etcd_url: str, prefix: str, netns: str, subnet_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grozd.cli.flanneld", f"--etcd-endpoints={etcd_url}",
         f"--etcd-prefix={prefix}", f"--iface={UNDERLAY}", f"--netns={netns}",
         f"--subnet-file={subnet_file}", "--ip-masq"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


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
        deadline = time.monotonic() + 15
        while not subnet_file.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no subnet file"
            time.sleep(0.05)
        env = dict(line.split("=", 1) for line in subnet_file.read_text().splitlines())
        assert env["FLANNEL_IPMASQ"] == "true" and env["FLANNEL_MTU"] == "1450"
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


def test_a_bad_network_config_exits_1_with_the_reason(hosts: HostPair, etcd_url, prefix, tmp_path):
    etcd = SyncClient([etcd_url])
    etcd.set(f"{prefix}/config", '{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlna"}}')
    etcd.close()
    code, err = finish(flanneld(etcd_url, prefix, hosts.a, tmp_path / "subnet.env"))
    assert code == 1
    assert (f"{prefix}/config: unknown backend type 'vxlna'; did you mean 'vxlan'?"
            " (known: vxlan, udp, host-gw, uvxlan)") in err


def test_a_missing_namespace_exits_1(etcd_url, prefix, tmp_path):
    require_root()
    name = f"grozd-t-{uuid.uuid4().hex[:8]}-missing"
    try:
        code, err = finish(flanneld(etcd_url, prefix, name, tmp_path / "subnet.env"))
        assert code == 1 and f"network namespace {name!r} not found" in err, (code, err)
        assert name not in tool("ip", "netns", "list")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
