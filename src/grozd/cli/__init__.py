"""`grozd <tool> ...`: one entry point dispatching to a module per tool."""

from __future__ import annotations

import importlib
import sys

from grozd import __version__
from grozd.cli.exit import ExitCode

# tool name -> (module under grozd.cli, one-line summary)
TOOLS: dict[str, tuple[str, str]] = {
    "etcd": ("grozd.cli.etcd", "run a store member (the etcd v2 API over Raft), etcd's flags"),
    "sim": ("grozd.cli.sim", "run a simulated Raft cluster under faults and report what happened"),
    "etcdctl": ("grozd.cli.etcdctl",
                "the etcd v2 command-line client (etcdctl 3.4, ETCDCTL_API=2)"),
    "fleetd": ("grozd.cli.fleetd",
               "fleet: run the units placed on this machine, elect the engine, serve the API"),
    "fleetctl": ("grozd.cli.fleetctl",
                 "fleet's client: submit, start, stop and inspect units across the cluster"),
    "flanneld": ("grozd.cli.flanneld",
                 "flannel: lease an overlay subnet in the store and route to the other hosts"),
}

USAGE = f"""usage: grozd [--version] [--help] <tool> [args...]

grozd {__version__}: a small-cluster stack.

tools:
""" + "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in TOOLS.items()) + """

Run `grozd <tool> --help` for a tool's own options.
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the tool named by the first argument."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return ExitCode.OK if args else ExitCode.USAGE
    if args[0] in ("-v", "--version", "version"):
        print(f"grozd {__version__}")
        return ExitCode.OK
    tool = TOOLS.get(args[0])
    if tool is None:
        print(f"grozd: unknown tool {args[0]!r}; run `grozd --help` for the list", file=sys.stderr)
        return ExitCode.USAGE
    module = importlib.import_module(tool[0])
    return module.main(args[1:])
