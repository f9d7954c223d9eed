"""`grozd fleetd`: fleet's daemon (agent, engine candidate and API) for this machine.

Flags follow fleet's configuration names; both ``--etcd-servers`` and fleet's own
``--etcd_servers`` spelling (and Go's single dash) are accepted::

    grozd fleetd --etcd-servers=http://127.0.0.1:2379 --metadata=region=eu,disk=ssd \\
        --public-ip=203.0.113.7 --etcd-key-prefix=/_grozd/fleet/

SIGTERM or SIGINT stops it cleanly: its units are stopped and the machine leaves the
cluster, so the engine moves the units elsewhere at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from grozd.cli.exit import ExitCode
from grozd.fleet.daemon import (
    DEFAULT_API_LISTEN,
    Fleetd,
    FleetdConfig,
    FleetdError,
    default_state_dir,
    parse_metadata,
)
from grozd.fleet.registry import DEFAULT_PREFIX
from grozd.fleet.runners import RunnerError
from grozd.fleet.runners.settings import parse_timespan

log = logging.getLogger("grozd.fleetd")


def _seconds(text: str) -> float:
    try:
        value = parse_timespan(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive time span: {text!r}")
    return value


def _metadata(text: str) -> dict[str, str]:
    try:
        return parse_metadata(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every long flag also answers to its underscore spelling."""
    p = argparse.ArgumentParser(
        prog="grozd fleetd",
        description="fleet's daemon: announce this machine, run the units the engine places"
        " here, take part in the engine election, and serve fleet's HTTP API.",
        allow_abbrev=False,
    )

    def flag(name: str, **kwargs: object) -> None:
        names = [f"--{name}"]
        if "-" in name:
            names.append(f"--{name.replace('-', '_')}")
        p.add_argument(*names, **kwargs)  # type: ignore[arg-type]

    flag("etcd-servers", default="http://127.0.0.1:2379", metavar="URLS",
         help="comma-separated etcd endpoints (default %(default)s)")
    flag("etcd-key-prefix", default=DEFAULT_PREFIX, metavar="PATH",
         help="keyspace of fleet's data in etcd (default %(default)s)")
    flag("etcd-request-timeout", type=_seconds, default=3.0, metavar="SECONDS",
         help="time allowed for one etcd request (default %(default)s)")
    flag("metadata", type=_metadata, default={}, metavar="K=V,...",
         help="this machine's metadata, e.g. region=eu,disk=ssd")
    flag("public-ip", default="", metavar="IP", help="IP other machines reach this one at")
    flag("machine-id", metavar="ID", help="machine ID (default: /etc/machine-id)")
    flag("agent-ttl", type=_seconds, default=30.0, metavar="SPAN",
         help="how long the machine stays present without a heartbeat (default 30s)")
    flag("engine-reconcile-interval", type=_seconds, default=10.0, metavar="SPAN",
         help="period of the engine's full reconcile (default 10s)")
    flag("engine-lease-ttl", type=_seconds, default=10.0, metavar="SPAN",
         help="TTL of the engine leadership lease (default 10s)")
    flag("disable-engine", action="store_true",
         help="never take part in the engine election (agent and API only)")
    flag("api-listen", default=DEFAULT_API_LISTEN, metavar="HOST:PORT",
         help="where the HTTP API listens (default %(default)s; port 0 picks one)")
    flag("api-advertise", metavar="URL",
         help="URL other machines use for this API (default: from --api-listen)")
    flag("state-dir", type=Path, default=None, metavar="DIR",
         help="unit files, journals and runtime records (default /var/lib/grozd/fleet)")
    flag("runner", choices=("auto", "supervisor", "systemd"), default="auto",
         help="what runs units: the embedded supervisor, systemd over D-Bus, or auto"
         " (systemd when it is PID 1)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (-v: what happens to units, -vv: debug)")
    return p


def _go_style(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Rewrite ``-etcd_servers=x`` (Go's flag syntax) to ``--etcd_servers=x``."""
    longs = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and "-" + arg.split("=", 1)[0] in longs:
            arg = "-" + arg
        out.append(arg)
    return out


def parse_args(argv: list[str]) -> tuple[FleetdConfig, int]:
    """The daemon config and verbosity (exits 2 on a usage error)."""
    p = build_parser()
    args = p.parse_args(_go_style(p, argv))
    servers = [s.strip() for s in args.etcd_servers.split(",") if s.strip()]
    if not servers:
        p.error("--etcd-servers needs at least one URL")
    prefix = args.etcd_key_prefix
    if not prefix.startswith("/"):
        p.error("--etcd-key-prefix must start with /")
    config = FleetdConfig(
        etcd_servers=servers,
        etcd_key_prefix=prefix,
        etcd_request_timeout=args.etcd_request_timeout,
        machine_id=args.machine_id,
        public_ip=args.public_ip,
        metadata=args.metadata,
        agent_ttl=max(1, round(args.agent_ttl)),
        engine_reconcile_interval=args.engine_reconcile_interval,
        engine_lease_ttl=max(1, round(args.engine_lease_ttl)),
        disable_engine=args.disable_engine,
        api_listen=args.api_listen,
        api_advertise=args.api_advertise,
        state_dir=args.state_dir or default_state_dir(),
        runner=args.runner,
    )
    return config, args.verbose


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    config, verbosity = parse_args(sys.argv[1:] if argv is None else argv)
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        daemon = Fleetd(config)
    except FleetdError as exc:
        print(f"grozd fleetd: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop = runner.get_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        try:
            runner.run(daemon.run())
        except (FleetdError, RunnerError, OSError, ValueError) as exc:
            print(f"grozd fleetd: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
