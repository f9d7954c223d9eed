"""`grozd etcd`: run a store member with etcd's flags (and their ETCD_* environment twins)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from grozd.cli.exit import ExitCode
from grozd.raft.node import NodeConfig

# flag -> (default, help). Each also reads ETCD_<FLAG> and GROZD_<FLAG> from the environment.
FLAGS: dict[str, tuple[str, str]] = {
    "name": ("default", "human-readable name for this member"),
    "data-dir": ("", "path to the data directory (default: ./<name>.grozd)"),
    "wal-dir": ("", "path to a dedicated WAL directory (default: <data-dir>/member/wal)"),
    "listen-peer-urls": ("http://127.0.0.1:2380", "URLs to listen on for peer traffic"),
    "listen-client-urls": ("http://127.0.0.1:2379", "URLs to listen on for client traffic"),
    "initial-advertise-peer-urls": ("http://127.0.0.1:2380",
                                    "this member's peer URLs to advertise to the cluster"),
    "advertise-client-urls": ("http://127.0.0.1:2379",
                              "this member's client URLs to advertise to the cluster"),
    "initial-cluster": ("", "initial cluster configuration, e.g. a=http://10.0.0.1:2380,..."
                        " (default: <name>=<initial-advertise-peer-urls>)"),
    "initial-cluster-state": ("new", "'new' to bootstrap a cluster, 'existing' to join one"),
    "initial-cluster-token": ("etcd-cluster", "initial cluster token for bootstrapping"),
    "heartbeat-interval": ("100", "time (in milliseconds) of a heartbeat interval"),
    "election-timeout": ("1000", "time (in milliseconds) for an election to timeout"),
    "snapshot-count": ("100000", "number of committed transactions to trigger a snapshot"),
    "max-snapshots": ("5", "maximum number of snapshot files to retain"),
    "max-wals": ("5", "maximum number of WAL files to retain"),
    "max-request-bytes": ("1572864", "maximum client request size in bytes"),
    "experimental-snapshot-catchup-entries": (
        "5000", "entries kept behind a snapshot for slow followers to catch up from"),
}


class ConfigError(ValueError):
    """A flag or environment value that cannot be used; the message says which and why."""


def env_default(flag: str, default: str) -> str:
    key = flag.upper().replace("-", "_")
    return os.environ.get(f"GROZD_{key}", os.environ.get(f"ETCD_{key}", default))


def split_urls(flag: str, value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ConfigError(f"--{flag} needs at least one URL")
    for u in urls:
        if not u.startswith(("http://", "https://")) or u.count(":") < 2:
            raise ConfigError(f"--{flag}: {u!r} is not a URL like http://127.0.0.1:2380")
        if u.startswith("https://"):
            raise ConfigError(f"--{flag}: {u!r}: TLS is not supported yet; use http://")
    return urls


def parse_initial_cluster(value: str) -> dict[str, list[str]]:
    cluster: dict[str, list[str]] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        name, sep, url = part.strip().partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--initial-cluster: {part!r} is not name=http://host:port")
        cluster.setdefault(name, []).extend(split_urls("initial-cluster", url))
    return cluster


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grozd etcd",
        description="Run a member of a grozd store cluster (the etcd v2 API over Raft)."
        " With no flags: a single-member cluster in ./default.grozd on 127.0.0.1:2379/2380."
        " Every flag can also be set as ETCD_<FLAG> (for example ETCD_NAME).",
    )
    for flag, (default, help_text) in FLAGS.items():
        p.add_argument(f"--{flag}", default=env_default(flag, default), help=help_text)
    p.add_argument("--enable-v2", default="true", help="accepted for compatibility (always on)")
    p.add_argument("--debug", action="store_true", help="log everything, tracebacks on errors")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[NodeConfig, dict]:
    """The member's configuration, checked; the rest (client side) as a dict."""
    def number(flag: str, low: int) -> int:
        raw = getattr(args, flag.replace("-", "_"))
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"--{flag}: {raw!r} is not a whole number") from None
        if value < low:
            raise ConfigError(f"--{flag} must be at least {low}, got {value}")
        return value

    heartbeat = number("heartbeat-interval", 1)
    election = number("election-timeout", 1)
    if election < 5 * heartbeat:
        raise ConfigError(f"--election-timeout ({election}) must be at least 5 times"
                          f" --heartbeat-interval ({heartbeat})")
    if args.initial_cluster_state not in ("new", "existing"):
        raise ConfigError(f"--initial-cluster-state must be 'new' or 'existing', got"
                          f" {args.initial_cluster_state!r}")
    peer_urls = split_urls("initial-advertise-peer-urls", args.initial_advertise_peer_urls)
    cluster = (parse_initial_cluster(args.initial_cluster) if args.initial_cluster
               else {args.name: peer_urls})
    if args.name not in cluster:
        raise ConfigError(f"--initial-cluster has no entry for this member's --name"
                          f" {args.name!r} (it names {', '.join(sorted(cluster))})")
    if sorted(cluster[args.name]) != sorted(peer_urls):
        raise ConfigError(f"--initial-cluster gives {args.name!r} the peer URLs"
                          f" {cluster[args.name]}, but --initial-advertise-peer-urls are"
                          f" {peer_urls}")
    cfg = NodeConfig(
        name=args.name,
        data_dir=Path(args.data_dir or f"{args.name}.grozd"),
        wal_dir=Path(args.wal_dir) if args.wal_dir else None,
        listen_peer_urls=split_urls("listen-peer-urls", args.listen_peer_urls),
        initial_advertise_peer_urls=peer_urls,
        client_urls=split_urls("advertise-client-urls", args.advertise_client_urls),
        initial_cluster=cluster,
        initial_cluster_state=args.initial_cluster_state,
        initial_cluster_token=args.initial_cluster_token,
        heartbeat_interval_ms=heartbeat,
        election_timeout_ms=election,
        snapshot_count=number("snapshot-count", 1),
        max_snapshots=number("max-snapshots", 1),
        max_wals=number("max-wals", 1),
        snapshot_catchup_entries=number("experimental-snapshot-catchup-entries", 1),
    )
    client = {
        "listen_client_urls": split_urls("listen-client-urls", args.listen_client_urls),
        "max_request_bytes": number("max-request-bytes", 1024),
    }
    return cfg, client


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg, client = config_from_args(args)
    except ConfigError as e:
        print(f"grozd etcd: {e}", file=sys.stderr)
        return ExitCode.USAGE
    from grozd import gcpolicy
    from grozd.api.member import Member, StartError

    async def serve() -> None:
        member = Member(cfg, **client)
        await member.start()
        gcpolicy.install()  # after start: a restored store is already in place
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.wait([asyncio.ensure_future(stop.wait()),
                            asyncio.ensure_future(member.stopped())],
                           return_when=asyncio.FIRST_COMPLETED)
        await member.stop()

    try:
        import uvloop

        uvloop.run(serve())
    except StartError as e:
        if args.debug:
            raise
        print(f"grozd etcd: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
