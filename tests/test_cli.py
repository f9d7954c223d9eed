"""The `grozd` entry point: dispatch, --version, --help, errors, and `grozd sim`."""

import subprocess
import sys

from grozd import __version__
from grozd.cli import main


def grozd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grozd", *args], capture_output=True,
                          text=True, timeout=60)


def test_version_and_help() -> None:
    assert grozd("--version").stdout.strip() == f"grozd {__version__}"
    out = grozd("--help").stdout
    for tool in ("etcd", "sim", "flanneld"):
        assert f"  {tool}" in out


def test_no_arguments_prints_usage_and_fails() -> None:
    r = grozd()
    assert r.returncode == 2 and "usage: grozd" in r.stdout


def test_unknown_tool_is_one_clear_line() -> None:
    r = grozd("etcdd")
    assert r.returncode == 2
    assert r.stderr.strip() == "grozd: unknown tool 'etcdd'; run `grozd --help` for the list"


def test_sim_reports_and_replays(capsys) -> None:
    assert main(["sim", "--seed", "3", "--seeds", "2", "--nodes", "5"]) == 0
    out = capsys.readouterr().out
    assert "seed 3: 5 nodes" in out and "all safety checks held" in out
    assert "2 passed, 0 failed" in out


def test_etcd_flag_errors_are_one_line() -> None:
    r = grozd("etcd", "--initial-cluster-state", "maybe")
    assert r.returncode == 2
    assert r.stderr.strip() == ("grozd etcd: --initial-cluster-state must be 'new' or"
                                " 'existing', got 'maybe'")
    r = grozd("etcd", "--name", "a", "--initial-cluster", "b=http://127.0.0.1:2380")
    assert "has no entry for this member's --name 'a'" in r.stderr
    r = grozd("etcd", "--heartbeat-interval", "100", "--election-timeout", "200")
    assert "must be at least 5 times" in r.stderr


def test_etcd_flags_read_their_environment_twins(monkeypatch) -> None:
    from grozd.cli.etcd import build_parser, config_from_args

    monkeypatch.setenv("ETCD_NAME", "infra1")
    monkeypatch.setenv("ETCD_INITIAL_ADVERTISE_PEER_URLS", "http://127.0.0.1:12380")
    monkeypatch.setenv("ETCD_SNAPSHOT_COUNT", "500")
    cfg, client = config_from_args(build_parser().parse_args(["--max-wals", "3"]))
    assert cfg.name == "infra1" and str(cfg.data_dir) == "infra1.grozd"
    assert cfg.initial_cluster == {"infra1": ["http://127.0.0.1:12380"]}
    assert cfg.snapshot_count == 500 and cfg.max_wals == 3
    assert client["listen_client_urls"] == ["http://127.0.0.1:2379"]
