"""`grozd flanneld`: the flannel daemon (subnet lease, backend, routes to other hosts).

Flags are flannel's (Go style ``-flag=value`` works too)::

    grozd flanneld --etcd-endpoints=http://127.0.0.1:2379 --etcd-prefix=/coreos.com/network \\
        --iface=eth0 --subnet-file=/run/flannel/subnet.env --ip-masq

SIGTERM or SIGINT stops it cleanly and keeps the lease.
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
from grozd.flannel.config import DEFAULT_PREFIX
from grozd.flannel.daemon import (
    DEFAULT_ENDPOINTS,
    Flanneld,
    FlanneldConfig,
    FlanneldError,
    make_app,
)
from grozd.flannel.healthz import HealthServer
from grozd.flannel.subnetenv import DEFAULT_SUBNET_FILE

log = logging.getLogger("grozd.flanneld")


def _bool(text: str) -> bool:
    # Go's flag package takes these spellings for a boolean flag's value.
    value = text.strip().lower()
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (`parse_args` also takes Go's single-dash spellings)."""
    p = argparse.ArgumentParser(
        prog="grozd flanneld",
        description="flannel: lease a subnet of the overlay network in etcd, write"
        " subnet.env, and route to the subnets of the other hosts.",
        allow_abbrev=False,
    )

    def flag(name: str, **kwargs: object) -> None:
        p.add_argument(f"--{name}", **kwargs)  # type: ignore[arg-type]

    flag("etcd-endpoints", default=",".join(DEFAULT_ENDPOINTS), metavar="URLS",
         help="comma-separated etcd endpoints (default %(default)s)")
    flag("etcd-prefix", default=DEFAULT_PREFIX, metavar="PATH",
         help="etcd prefix of the network config and leases (default %(default)s)")
    flag("iface", action="append", default=[], metavar="NAME|IP",
         help="interface (name or address) for inter-host traffic; may repeat, the first"
         " found is used (default: the interface of the default route)")
    flag("public-ip", metavar="IP",
         help="IP other hosts reach this one at (default: the interface's address)")
    flag("subnet-file", default=str(DEFAULT_SUBNET_FILE), metavar="PATH",
         help="where to write the subnet env (default %(default)s)")
    flag("ip-masq", nargs="?", const=True, default=False, type=_bool, metavar="BOOL",
         help="masquerade traffic leaving the overlay (iptables nat rules, removed on exit)"
         " and set FLANNEL_IPMASQ=true in the subnet file")
    flag("subnet-lease-renew-margin", type=int, default=60, metavar="MINUTES",
         help="renew the lease this many minutes before it expires (default %(default)s)")
    flag("netns", metavar="NAME",
         help="program network namespace NAME instead of this one (grozd; for testing)")
    flag("vxlan-userspace", nargs="?", const=True, default=False, type=_bool, metavar="BOOL",
         help="run a vxlan network's data path in userspace on this host (TAP + UDP socket,"
         " wire-compatible with kernel VXLAN hosts; grozd's, e.g. for kernels without VXLAN)")
    flag("healthz-ip", default="127.0.0.1", metavar="IP",
         help="address for the health and metrics endpoint (default 127.0.0.1)")
    flag("healthz-port", type=int, default=0, metavar="PORT",
         help="serve /healthz and /metrics (data path counters) on this port; 0: off")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=0, metavar="LEVEL",
                   help="log verbosity; 1 or more logs debug messages")
    return p


def parse_args(argv: list[str]) -> tuple[FlanneldConfig, int]:
    """The daemon config and log verbosity for a command line (exits 2 on a usage error)."""
    p = build_parser()
    args = p.parse_args(_go_style(p, argv))
    endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
    if not endpoints:
        p.error("--etcd-endpoints needs at least one URL")
    if args.subnet_lease_renew_margin < 1:
        p.error("--subnet-lease-renew-margin must be at least 1 minute")
    config = FlanneldConfig(
        etcd_endpoints=endpoints,
        etcd_prefix=args.etcd_prefix,
        iface=list(args.iface),
        public_ip=args.public_ip,
        subnet_file=Path(args.subnet_file),
        ip_masq=args.ip_masq,
        netns=args.netns,
        vxlan_userspace=args.vxlan_userspace,
        renew_margin=args.subnet_lease_renew_margin * 60.0,
    )
    if not 0 <= args.healthz_port <= 65535:
        p.error("--healthz-port must be a port number")
    config.healthz = (args.healthz_ip, args.healthz_port) if args.healthz_port else None
    return config, args.verbosity


def _go_style(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Rewrite ``-etcd-endpoints=x`` (Go's flag syntax) to ``--etcd-endpoints=x``."""
    longs = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and "-" + arg.split("=", 1)[0] in longs:
            arg = "-" + arg
        out.append(arg)
    return out


async def serve(app: Flanneld, healthz: tuple[str, int] | None) -> None:
    """The daemon, with its health and metrics endpoint when asked for."""
    if healthz is None:
        await app.run()
        return
    server = HealthServer(app)
    try:
        await server.start(*healthz)
    except OSError as e:
        raise FlanneldError(f"cannot serve --healthz-port on {healthz[0]}:{healthz[1]}:"
                            f" {e.strerror}") from None
    try:
        await app.run()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; non-zero when it cannot go on."""
    config, verbosity = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app = make_app(config)
    # A loop factory rather than uvloop's policy: pyroute2's thread must get a plain loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop = runner.get_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app.stop)
        try:
            runner.run(serve(app, config.healthz))
        except FlanneldError as exc:
            log.error("%s", exc)
            return ExitCode.FAILURE
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
