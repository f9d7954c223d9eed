"""`grozd fleetctl`: fleet's command-line client, talking to etcd directly.

Commands, flags, columns, messages and exit codes are fleetctl's (0 success, 1 failure,
2 usage). ``--endpoint`` (or ``FLEETCTL_ENDPOINT``) names the etcd endpoint, as in
fleetctl's default (registry) mode; every global flag can come from
``FLEETCTL_<FLAG>``. ``status`` and ``journal`` reach the unit's machine through that
machine's fleetd API rather than SSH; ``ssh`` itself is not supported.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import quote, urlsplit

from grozd import __version__
from grozd.cli.exit import ExitCode
from grozd.client import Client, EtcdError, EtcdUnavailable
from grozd.fleet.registry import (
    DEFAULT_PREFIX,
    INACTIVE,
    LAUNCHED,
    LOADED,
    JobRecord,
    MachineState,
    Registry,
    UnitExistsError,
    UnitStateRecord,
    current_state,
)
from grozd.fleet.spec import UnitFileError, UnitSpec, parse_spec, spec_for
from grozd.fleet.unit import UNIT_TYPES, UnitName

T = TypeVar("T")
PROG = "fleetctl"
log = logging.getLogger(__name__)
# Log records reach stderr only with --debug; without it, no last-resort printing.
log.addHandler(logging.NullHandler())
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
# fleetctl waits 500 ms per attempt; polling faster keeps commands snappy while
# --block-attempts keeps its meaning in time.
ATTEMPT = 0.5
POLL = 0.1


class Fail(Exception):
    """Stop the command: print ``message`` to stderr and exit with ``code``."""

    def __init__(self, message: str, code: int = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


def tabulate(rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned like Go's tabwriter with tab padding (fleetctl's output)."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = []
    for col in range(ncols - 1):
        w = max((len(r[col]) for r in rows if col < len(r) - 1), default=0) + 1
        widths.append(math.ceil(w / 8) * 8)
    lines = []
    for row in rows:
        cells = []
        for col, cell in enumerate(row):
            if col < len(row) - 1:
                cells.append(cell + "\t" * math.ceil((widths[col] - len(cell)) / 8))
            else:
                cells.append(cell)
        lines.append("".join(cells))
    return "\n".join(lines) + "\n"


def mangle(arg: str) -> str:
    """fleetctl's unitNameMangle: the base name, ``.service`` added if it has no type."""
    name = os.path.basename(arg.rstrip("/"))
    dot = name.rfind(".")
    if dot <= 0 or name[dot + 1 :] not in UNIT_TYPES:
        name += ".service"
    return name


def machine_legend(m: MachineState, full: bool) -> str:
    """``113f16a7...`` (or the full ID)."""
    return m.id if full else f"{m.short_id}..."


def machine_full_legend(m: MachineState, full: bool) -> str:
    """``113f16a7.../172.17.8.103``."""
    legend = machine_legend(m, full)
    return f"{legend}/{m.public_ip}" if m.public_ip else legend


def format_metadata(meta: dict[str, str]) -> str:
    return ",".join(f"{k}={meta[k]}" for k in sorted(meta))


class Session:
    """The registry, on a private event loop so commands stay plain functions."""

    def __init__(self, endpoint: str, prefix: str, timeout: float, out: TextIO,
                 err: TextIO) -> None:  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.client = Client(endpoint, timeout=timeout)
        self.registry = Registry(self.client, prefix)
        self.timeout = timeout
        self.out = out
        self.err = err
        self._machines: dict[str, MachineState] | None = None
        self._texts: dict[str, str] = {}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def stdout(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def stderr(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # -- views --------------------------------------------------------------------------

    def machines(self, cached: bool = True) -> dict[str, MachineState]:
        if self._machines is None or not cached:
            self._machines = self.call(self.registry.machines())[0]
        return self._machines

    def jobs(self) -> dict[str, JobRecord]:
        jobs, _ = self.call(self.registry.jobs())
        return {n: j for n, j in jobs.items() if j.submitted}

    def text(self, job: JobRecord) -> str:
        digest = job.hash or ""
        if digest not in self._texts:
            # Content under a hash never changes: fetch each once per command.
            self._texts[digest] = self.call(self.registry.unit_text(digest)) or ""
        return self._texts[digest]

    def is_global(self, job: JobRecord) -> bool:
        spec = spec_for(job.name, self.text(job))
        return isinstance(spec, UnitSpec) and spec.is_global

    def states(self) -> dict[tuple[str, str], UnitStateRecord]:
        return self.call(self.registry.unit_states())

    def current(self, job: JobRecord) -> str:
        return current_state(job, self.states(), self.machines(cached=False))


# -- unit creation ------------------------------------------------------------------------


def _read_spec(s: Session, name: str, path: str) -> UnitSpec:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise Fail(f"Error creating units: failed getting Unit({name}) from file: {exc}") from None
    try:
        spec = parse_spec(name, data, source=path)
    except UnitFileError as exc:
        raise Fail(f"Error creating units: {exc}") from None
    for warning in spec.warnings:
        s.stderr(f"WARNING: {warning}")
    for warning in spec.unit.fleet_warnings():
        log.warning("event=unit_warning unit=%s warning=%r", name, warning)
    return spec


def _local_spec(s: Session, arg: str, name: str) -> UnitSpec:
    """The unit for ``arg`` from disk: the file itself, or the instance's template."""
    if os.path.exists(arg):
        return _read_spec(s, name, arg)
    unit = UnitName.parse(name)
    if not unit.is_instance:
        raise Fail(
            f"Error creating units: unable to find Unit({name}) in Registry or on filesystem"
        )
    template = unit.template or ""
    job = s.call(s.registry.job(template))
    if job is not None:
        text = s.text(job)
        try:
            return parse_spec(name, text)
        except UnitFileError as exc:
            raise Fail(f"Error creating units: {exc}") from None
    path = os.path.join(os.path.dirname(arg), template)
    if not os.path.exists(path):
        raise Fail(f"Error creating units: unable to find template Unit({template}) in"
                   " Registry or on filesystem")  # fmt: skip
    spec = _read_spec(s, template, path)
    return parse_spec(name, spec.text)


def create_units(s: Session, args: list[str], replace: bool, command: str,
                 attempts: int) -> None:  # fmt: skip
    """fleetctl's lazyCreateUnits: submit what the registry lacks (or --replace it)."""
    created = []
    for arg in args:
        name = mangle(arg)
        try:
            UnitName.parse(name)
        except ValueError:
            raise Fail(f"Error creating units: invalid unit name {name!r}") from None
        job = s.call(s.registry.job(name))
        if job is not None:
            if os.path.exists(arg):
                local = _read_spec(s, name, arg)
                if local.hash != job.hash:
                    if not replace:
                        s.stderr(f"WARNING: Unit {name} in registry differs from local unit"
                                 f" file {arg}. Add --replace to override.")  # fmt: skip
                        continue
                    allowed = {"submit": (INACTIVE,), "load": (INACTIVE, LOADED),
                               "start": (INACTIVE, LOADED, LAUNCHED)}[command]  # fmt: skip
                    if job.desired_state not in allowed:
                        s.stderr(
                            f"Warning: can not replace Unit({name}) in state"
                            f" '{job.desired_state}', use the appropriate command"
                        )
                        continue
                    s.call(s.registry.replace(name, local.text))
                elif replace:
                    s.stdout(f"Found same Unit({name}) in Registry, nothing to do")
            continue
        spec = _local_spec(s, arg, name)
        try:
            s.call(s.registry.submit(name, spec.text))
        except UnitExistsError:
            continue
        except ValueError as exc:
            raise Fail(f"Error creating units: {exc}") from None
        created.append(name)
    if created:
        errors = wait_states(s, created, INACTIVE, attempts)
        for error in errors:
            s.stderr(f"Error waiting on unit creation: {error}")
        if errors:
            raise Fail("Error creating units: One or more errors creating units")


def set_desired(s: Session, names: list[str], state: str, verb: str) -> list[JobRecord]:
    """Set the desired state of existing units; the ones that changed."""
    triggered = []
    for name in names:
        job = s.call(s.registry.job(name))
        if job is None:
            raise Fail(f"Error {verb} units: unable to find unit {name}")
        if state != INACTIVE and UnitName.parse(name).is_template:
            raise Fail(f"Error {verb} units: {name} is a template unit; use an instance of it,"
                       f" e.g. {UnitName.parse(name).instantiate('1')}")  # fmt: skip
        if job.desired_state == state:
            continue
        s.call(s.registry.set_desired_state(name, state))
        triggered.append(job)
    return triggered


def wait_states(s: Session, names: list[str], state: str, attempts: int) -> list[str]:
    """fleetctl's waitForUnitStates: poll until each unit is ``state``; the errors."""
    pending = list(names)
    errors: list[str] = []
    start = time.monotonic()
    told: set[str] = set()
    while pending:
        jobs = s.jobs()
        states = s.states()
        machines = s.machines(cached=False)
        for name in list(pending):
            job = jobs.get(name)
            if job is None:
                continue
            cur = job.desired_state if s.is_global(job) else current_state(job, states, machines)
            if cur == state:
                msg = f"Unit {name} {current_state(job, states, machines)}"
                if job.target and job.target in machines:
                    msg += f" on {machine_full_legend(machines[job.target], False)}"
                s.stdout(msg)
                pending.remove(name)
            elif job.reason and name not in told and time.monotonic() - start > ATTEMPT:
                s.stderr(f"Unit {name} is not scheduled: {job.reason}")
                told.add(name)
        if not pending:
            break
        if attempts > 0 and time.monotonic() - start >= attempts * ATTEMPT:
            errors += [f"timed out waiting for unit {n} to report state {state}" for n in pending]
            break
        time.sleep(POLL)
    return errors


def try_wait(s: Session, names: list[str], verb: str, state: str, attempts: int) -> int:
    """fleetctl's tryWaitForUnitStates."""
    if attempts < 0:
        for name in names:
            s.stdout(f"Triggered unit {name} {verb}")
        return ExitCode.OK
    errors = wait_states(s, names, state, attempts)
    for error in errors:
        s.stderr(f"Error waiting for units: {error}")
    return ExitCode.FAILURE if errors else ExitCode.OK


def _attempts(args: argparse.Namespace) -> int:
    if getattr(args, "no_block", False):
        return -1
    return max(0, getattr(args, "block_attempts", 0) or 0)


# -- commands -----------------------------------------------------------------------------


def cmd_submit(s: Session, args: argparse.Namespace) -> int:
    if not args.units:
        s.stderr("No units given")
        return ExitCode.OK
    create_units(s, args.units, args.replace, "submit", 0)
    return ExitCode.OK


def _load_or_start(s: Session, args: argparse.Namespace, command: str) -> int:
    if not args.units:
        s.stderr("No units given")
        return ExitCode.OK
    verb, state, noun = {
        "load": ("loading", LOADED, "load"),
        "start": ("starting", LAUNCHED, "start"),
    }[command]
    create_units(s, args.units, args.replace, command, _attempts(args) if _attempts(args) > 0
                 else 0)  # fmt: skip
    triggered = set_desired(s, [mangle(a) for a in args.units], state, verb)
    waiting = []
    for job in triggered:
        if s.is_global(job):
            s.stdout(f"Triggered global unit {job.name} {noun}")
        else:
            waiting.append(job.name)
    return try_wait(s, waiting, noun, state, _attempts(args))


def cmd_load(s: Session, args: argparse.Namespace) -> int:
    return _load_or_start(s, args, "load")


def cmd_start(s: Session, args: argparse.Namespace) -> int:
    return _load_or_start(s, args, "start")


def _find(s: Session, args: list[str]) -> list[JobRecord]:
    jobs = s.jobs()
    return [jobs[mangle(a)] for a in args if mangle(a) in jobs]


def cmd_stop(s: Session, args: argparse.Namespace) -> int:
    if not args.units:
        s.stderr("No units given")
        return ExitCode.OK
    stopping = []
    for job in _find(s, args.units):
        is_global = s.is_global(job)
        if not is_global:
            cur = s.current(job)
            if cur == INACTIVE:
                s.stderr(f"Unable to stop unit {job.name} in state {INACTIVE}")
                return ExitCode.FAILURE
            if cur == LOADED:
                continue
        s.call(s.registry.set_desired_state(job.name, LOADED))
        if is_global:
            s.stdout(f"Triggered global unit {job.name} stop")
        else:
            stopping.append(job.name)
    code = try_wait(s, stopping, "stop", LOADED, _attempts(args))
    listed = "[" + " ".join(stopping) + "]"
    if code == ExitCode.OK:
        s.stderr(f"Successfully stopped units {listed}.")
    else:
        s.stderr(f"Failed to stop units {listed}. exit == {code}.")
    return code


def cmd_unload(s: Session, args: argparse.Namespace) -> int:
    if not args.units:
        s.stderr("No units given")
        return ExitCode.OK
    waiting = []
    for job in _find(s, args.units):
        is_global = s.is_global(job)
        if not is_global and s.current(job) == INACTIVE and job.desired_state == INACTIVE:
            continue
        s.call(s.registry.set_desired_state(job.name, INACTIVE))
        if is_global:
            s.stdout(f"Triggered global unit {job.name} unload")
        else:
            waiting.append(job.name)
    return try_wait(s, waiting, "unload", INACTIVE, _attempts(args))


def cmd_destroy(s: Session, args: argparse.Namespace) -> int:
    code = ExitCode.OK
    attempts = _attempts(args)
    for job in _find(s, args.units):
        try:
            s.call(s.registry.destroy(job.name))
        except (EtcdError, EtcdUnavailable) as exc:
            s.stderr(f"Error destroying units: {exc}")
            code = ExitCode.FAILURE
            continue
        if attempts >= 0:
            start = time.monotonic()
            while s.call(s.registry.job(job.name)) is not None:
                if attempts and time.monotonic() - start > attempts * ATTEMPT:
                    break
                time.sleep(POLL)
        s.stdout(f"Destroyed {job.name}")
    return code


def cmd_cat(s: Session, args: argparse.Namespace) -> int:
    if len(args.units) != 1:
        s.stderr("One unit file must be provided.")
        return ExitCode.FAILURE
    name = mangle(args.units[0])
    job = s.call(s.registry.job(name))
    if job is None:
        s.stderr(f"Unit {name} not found.")
        return ExitCode.FAILURE
    s.out.write(s.text(job))
    s.out.flush()
    return ExitCode.OK


def _fields(s: Session, text: str, known: dict[str, Any]) -> list[str]:
    if not text:
        raise Fail("Must define output format")
    cols = text.split(",")
    for col in cols:
        if col not in known:
            raise Fail(f'Invalid key in output format: "{col}"')
    return cols


def cmd_list_machines(s: Session, args: argparse.Namespace) -> int:
    fields: dict[str, Callable[[MachineState, bool], str]] = {
        "machine": machine_legend,
        "ip": lambda m, full: m.public_ip or "-",
        "metadata": lambda m, full: format_metadata(dict(m.metadata)) if m.metadata else "-",
    }
    cols = _fields(s, args.fields, fields)
    try:
        machines = s.machines()
    except (EtcdError, EtcdUnavailable) as exc:
        raise Fail(f"Error retrieving list of active machines: {exc}") from None
    rows = [] if args.no_legend else [[c.upper() for c in cols]]
    for mid in sorted(machines):
        rows.append([fields[c](machines[mid], args.full) for c in cols])
    s.out.write(tabulate(rows))
    return ExitCode.OK


def cmd_list_units(s: Session, args: argparse.Namespace) -> int:
    machines = s.machines()

    def machine(rec: UnitStateRecord | None, full: bool) -> str:
        if rec is None or not rec.machine_id:
            return "-"
        m = machines.get(rec.machine_id) or MachineState(rec.machine_id)
        return machine_full_legend(m, full)

    fields: dict[str, Callable[[UnitStateRecord | None, bool], str]] = {
        "unit": lambda r, full: r.name if r else "-",
        "load": lambda r, full: (r.load_state or "-") if r else "-",
        "active": lambda r, full: (r.active_state or "-") if r else "-",
        "sub": lambda r, full: (r.sub_state or "-") if r else "-",
        "machine": machine,
        "hash": lambda r, full: ((r.unit_hash if full else r.unit_hash[:7]) or "-") if r else "-",
        "reason": lambda r, full: "-",
    }
    cols = _fields(s, args.fields, fields)
    try:
        jobs = s.jobs()
        states = s.states()
    except (EtcdError, EtcdUnavailable) as exc:
        raise Fail(f"Error retrieving list of units from repository: {exc}") from None
    rows = [] if args.no_legend else [[c.upper() for c in cols]]
    entries: list[tuple[str, list[str]]] = []
    for (name, _mid), rec in sorted(states.items()):
        if name in jobs:
            entries.append((name, [fields[c](rec, args.full) for c in cols]))
    # Wanted units no machine can take (grozd): listed with their reason.
    unplaced = []
    for name, job in sorted(jobs.items()):
        if job.desired_state != INACTIVE and job.target is None and job.reason:
            if any(n == name for n, _ in states):
                continue
            row = [name if c == "unit" else job.reason if c == "reason" else "-" for c in cols]
            entries.append((name, row))
            unplaced.append(job)
    entries.sort(key=lambda e: e[0])
    rows += [row for _, row in entries]
    s.out.write(tabulate(rows))
    if unplaced and "reason" not in cols and not args.no_legend:
        for job in unplaced:
            s.stderr(f"Unit {job.name} is not scheduled: {job.reason}")
    return ExitCode.OK


def cmd_list_unit_files(s: Session, args: argparse.Namespace) -> int:
    machines = s.machines()
    states = s.states()

    def target(j: JobRecord, full: bool) -> str:
        if s.is_global(j):
            return "global"
        if not j.target:
            return "-"
        return machine_full_legend(machines.get(j.target) or MachineState(j.target), full)

    def desc(j: JobRecord, full: bool) -> str:
        spec = spec_for(j.name, s.text(j))
        return (spec.description or "-") if isinstance(spec, UnitSpec) else "-"

    fields: dict[str, Callable[[JobRecord, bool], str]] = {
        "unit": lambda j, full: j.name,
        "global": lambda j, full: "true" if s.is_global(j) else "false",
        "dstate": lambda j, full: j.desired_state or "-",
        "target": target,
        "tmachine": target,
        "state": lambda j, full: "-" if s.is_global(j) else current_state(j, states, machines),
        "hash": lambda j, full: (j.hash or "") if full else (j.hash or "")[:7],
        "desc": desc,
        "reason": lambda j, full: j.reason or "-",
    }
    cols = _fields(s, args.fields, fields)
    if "tmachine" in cols:
        s.stderr('WARNING: The "tmachine" field is deprecated. Use "target" instead')
    try:
        jobs = s.jobs()
    except (EtcdError, EtcdUnavailable) as exc:
        raise Fail(f"Error retrieving list of units from repository: {exc}") from None
    rows = [] if args.no_legend else [[c.upper() for c in cols]]
    for name in sorted(jobs):
        rows.append([fields[c](jobs[name], args.full) for c in cols])
    s.out.write(tabulate(rows))
    return ExitCode.OK


def _endpoint_of(s: Session, job: JobRecord) -> str:
    machines = s.machines(cached=False)
    m = machines.get(job.target or "")
    if m is None:
        raise Fail(f"Unit {job.name} is not on any machine in the cluster.")
    if not m.endpoint:
        raise Fail(f"Machine {m.id} publishes no API endpoint; cannot reach unit {job.name}.")
    return m.endpoint


def _http_get(s: Session, base: str, path: str, stream: bool = False
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:  # fmt: skip
    parts = urlsplit(base)
    if parts.scheme != "http" or not parts.hostname:
        raise Fail(f"unsupported API endpoint {base!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=s.timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
    except OSError as exc:
        conn.close()
        raise Fail(f"Error reaching {base}: {exc}") from None
    if stream and conn.sock is not None:
        # Following a journal may mean a long silence: no read timeout from here on.
        conn.sock.settimeout(None)
    return conn, resp


def _check_loaded(s: Session, name: str, what: str, inactive_msg: str) -> JobRecord:
    job = s.jobs().get(name)
    if job is None:
        raise Fail(f"Unit {name} does not exist.")
    if s.is_global(job):
        raise Fail(f"Unable to {what} of global unit {name}.")
    if s.current(job) == INACTIVE:
        raise Fail(inactive_msg.format(name=name))
    return job


def cmd_status(s: Session, args: argparse.Namespace) -> int:
    names = [mangle(a) for a in args.units]
    jobs = []
    for name in names:
        jobs.append(_check_loaded(s, name, "determine status",
                                  "Unit {name} does not appear to be loaded."))  # fmt: skip
    code = ExitCode.OK
    for i, job in enumerate(jobs):
        if i:
            s.out.write("\n")
        base = _endpoint_of(s, job)
        conn, resp = _http_get(s, base, f"/grozd/v1/units/{quote(job.name)}/status")
        try:
            body = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        if resp.status != 200:
            raise Fail(f"Error retrieving status of {job.name} from {base}: HTTP {resp.status}")
        s.out.write(body)
        s.out.flush()
        code = int(resp.headers.get("X-Exit-Status", "0") or 0)
        if code != 0:
            break
    return code


def cmd_journal(s: Session, args: argparse.Namespace) -> int:
    if len(args.units) != 1:
        s.stderr("One unit file must be provided.")
        return ExitCode.FAILURE
    name = mangle(args.units[0])
    job = _check_loaded(s, name, "retrieve journal", "Unit {name} does not appear to be running.")
    base = _endpoint_of(s, job)
    query = f"?lines={args.lines}" + ("&follow=true" if args.follow else "")
    conn, resp = _http_get(s, base, f"/grozd/v1/units/{quote(name)}/journal{query}",
                           stream=args.follow)  # fmt: skip
    try:
        if resp.status != 200:
            raise Fail(f"Error retrieving journal of {name} from {base}: HTTP {resp.status}")
        while True:
            line = resp.readline()
            if not line:
                break
            s.out.write(line.decode("utf-8", "replace"))
            s.out.flush()
    except KeyboardInterrupt:
        return 130
    finally:
        conn.close()
    return ExitCode.OK


def cmd_ssh(err: TextIO) -> int:
    print(
        "fleetctl ssh is not supported by grozd: there is no SSH transport. Use `fleetctl"
        " status` and `fleetctl journal`, which reach the unit's machine through its fleetd"
        " API.",
        file=err,
    )
    return ExitCode.FAILURE


# -- argument parsing ---------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, str]] = {
    "cat": ("UNIT", "Output the contents of a submitted unit"),
    "destroy": ("UNIT...", "Destroy one or more units in the cluster"),
    "help": ("[COMMAND]", "Show a list of commands or help for one command"),
    "journal": ("[--lines=N] [-f|--follow] UNIT", "Print the journal of a unit in the cluster"
                " to stdout"),
    "list-machines": ("[-l|--full] [--no-legend] [--fields]",
                      "Enumerate the current hosts in the cluster"),
    "list-unit-files": ("[--full] [--no-legend] [--fields]",
                        "List the units that exist in the cluster."),
    "list-units": ("[--no-legend] [-l|--full] [--fields]",
                   "List the current state of units in the cluster"),
    "load": ("[--no-block|--block-attempts=N] [--replace] UNIT...",
             "Schedule one or more units in the cluster, first submitting them if necessary."),
    "ssh": ("", "(not supported by grozd: no SSH transport; use status and journal)"),
    "start": ("[--no-block|--block-attempts=N] [--replace] UNIT...",
              "Instruct systemd to start one or more units in the cluster, first submitting"
              " and loading if necessary."),
    "status": ("UNIT...", "Output the status of one or more units in the cluster"),
    "stop": ("[--no-block|--block-attempts=N] UNIT...",
             "Instruct systemd to stop one or more units in the cluster."),
    "submit": ("[--replace] UNIT...",
               "Upload one or more units to the cluster without starting them"),
    "unload": ("[--no-block|--block-attempts=N] UNIT...",
               "Unschedule one or more units in the cluster."),
    "version": ("", "Print the version and exit"),
}  # fmt: skip

HANDLERS: dict[str, Callable[[Session, argparse.Namespace], int]] = {
    "cat": cmd_cat,
    "destroy": cmd_destroy,
    "journal": cmd_journal,
    "list-machines": cmd_list_machines,
    "list-unit-files": cmd_list_unit_files,
    "list-units": cmd_list_units,
    "load": cmd_load,
    "start": cmd_start,
    "status": cmd_status,
    "stop": cmd_stop,
    "submit": cmd_submit,
    "unload": cmd_unload,
}

GLOBAL_FLAGS = ("endpoint", "etcd-key-prefix", "request-timeout", "debug")


def global_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    p.add_argument("--endpoint", default=None,
                   help=f"etcd endpoint for fleet (default {DEFAULT_ENDPOINT})")
    p.add_argument("--etcd-key-prefix", default=None,
                   help=f"keyspace for fleet data in etcd (default {DEFAULT_PREFIX})")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds allowed for a single request (default 3.0)")
    p.add_argument("--debug", action="store_true", help="print more information to stderr")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--experimental-api", action="store_true",
                   help="not supported by grozd (fleetctl talks to etcd directly)")
    p.add_argument("--tunnel", default=None, help="not supported by grozd (no SSH transport)")
    p.add_argument("-h", "--help", action="store_true")
    return p


def command_parser(name: str) -> argparse.ArgumentParser:
    usage, summary = COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"{PROG} {name}", description=summary,
                                usage=f"{PROG} {name} {usage}", allow_abbrev=False)  # fmt: skip
    defaults = {"list-units": "unit,machine,active,sub",
                "list-unit-files": "unit,hash,dstate,state,target",
                "list-machines": "machine,ip,metadata"}  # fmt: skip
    if name in defaults:
        p.add_argument("-l", "--full", action="store_true", help="do not ellipsize fields")
        p.add_argument("--no-legend", action="store_true", help="do not print column headers")
        p.add_argument("--fields", default=defaults[name], help="columns to print")
    if name in ("load", "start", "stop", "unload", "destroy"):
        p.add_argument("--block-attempts", type=int, default=0,
                       help="wait up to N attempts (0: no limit)")
        p.add_argument("--no-block", action="store_true", help="do not wait")
    if name in ("submit", "load", "start"):
        p.add_argument("--replace", action="store_true",
                       help="replace the units already in the cluster with these versions")
        p.add_argument("--sign", action="store_true", help="deprecated; cannot be used")
    if name == "journal":
        p.add_argument("--lines", type=int, default=10, help="number of recent lines")
        p.add_argument("-f", "--follow", action="store_true", help="print new entries as they come")
    if name not in ("help", "version", "ssh"):
        p.add_argument("units", nargs="*", metavar="UNIT")
    else:
        p.add_argument("rest", nargs="*")
    return p


def _go_style(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Go's flag package takes ``-no-legend`` and ``-fields=x`` too."""
    longs = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and "-" + arg.split("=", 1)[0] in longs:
            arg = "-" + arg
        out.append(arg)
    return out


def usage_text() -> str:
    lines = [
        f"NAME:\n   {PROG} - fleetctl is a command-line interface to fleet, the cluster-wide"
        " init system (grozd).",
        f"\nUSAGE:\n   {PROG} [global options] <command> [command options] [arguments...]",
        "\nCOMMANDS:",
    ]
    lines += [f"   {name:<16} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "\nGLOBAL OPTIONS:",
        f"   --endpoint            etcd endpoint for fleet (default {DEFAULT_ENDPOINT};"
        " FLEETCTL_ENDPOINT)",
        f"   --etcd-key-prefix     keyspace for fleet data in etcd (default {DEFAULT_PREFIX})",
        "   --request-timeout     seconds allowed for a single request (default 3.0)",
        "   --debug               print more information to stderr",
        "   --version             print the version and exit",
        "\nEvery global option may also be set as FLEETCTL_<OPTION> in the environment.",
        "`ssh` is out of scope for grozd: status and journal reach machines over fleetd's API.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:  # fmt: skip
    """Run one fleetctl command."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = list(sys.argv[1:] if argv is None else argv)
    gp = global_parser()
    # Global options come before the command, as with fleetctl; some take a value.
    split = 0
    while split < len(args) and args[split].startswith("-"):
        flag = args[split].lstrip("-")
        takes_value = flag in ("endpoint", "etcd-key-prefix", "request-timeout", "tunnel")
        split += 2 if takes_value else 1
    split = min(split, len(args))
    try:
        gargs = gp.parse_args(_go_style(gp, args[:split]))
    except SystemExit as exc:
        return ExitCode.USAGE if exc.code else ExitCode.OK
    rest = args[split:]
    if gargs.version or (rest and rest[0] == "version"):
        print(f"{PROG} version {__version__} (grozd)", file=out)
        return ExitCode.OK
    if gargs.help or not rest or rest[0] == "help":
        topic = rest[1] if len(rest) > 1 else None
        if topic in COMMANDS:
            out.write(command_parser(topic).format_help())
        else:
            out.write(usage_text())
        return ExitCode.OK
    command = rest[0]
    if command not in COMMANDS:
        print(f'{PROG}: unknown subcommand: "{command}"', file=out)
        print(f"Run '{PROG} help' for usage.", file=out)
        return ExitCode.USAGE
    cp = command_parser(command)
    try:
        cargs = cp.parse_args(_go_style(cp, rest[1:]))
    except SystemExit as exc:
        return ExitCode.USAGE if exc.code else ExitCode.OK
    if getattr(cargs, "sign", False):
        print("WARNING: The signed/verified units feature is DEPRECATED and cannot be used.",
              file=err)  # fmt: skip
        return ExitCode.USAGE
    if command == "ssh":
        return cmd_ssh(err)
    if gargs.tunnel or os.environ.get("FLEETCTL_TUNNEL"):
        print("fleetctl: --tunnel is not supported by grozd (no SSH transport)", file=err)
        return ExitCode.FAILURE
    if gargs.experimental_api:
        print("fleetctl: --experimental-api is not supported; --endpoint names etcd", file=err)
        return ExitCode.FAILURE
    if gargs.debug or os.environ.get("FLEETCTL_DEBUG", "").lower() in ("1", "true"):
        logging.basicConfig(level=logging.DEBUG, stream=err,
                            format="%(asctime)s level=%(levelname)s %(name)s %(message)s")
    endpoint = gargs.endpoint or os.environ.get("FLEETCTL_ENDPOINT") or DEFAULT_ENDPOINT
    prefix = gargs.etcd_key_prefix or os.environ.get("FLEETCTL_ETCD_KEY_PREFIX") or DEFAULT_PREFIX
    timeout = gargs.request_timeout
    if timeout is None:
        try:
            timeout = float(os.environ.get("FLEETCTL_REQUEST_TIMEOUT") or 3.0)
        except ValueError:
            print("fleetctl: invalid FLEETCTL_REQUEST_TIMEOUT", file=err)
            return ExitCode.USAGE
    try:
        session = Session(endpoint, prefix, timeout, out, err)
    except ValueError as exc:
        print(f"Unable to initialize client: {exc}", file=err)
        return ExitCode.FAILURE
    try:
        return HANDLERS[command](session, cargs)
    except Fail as exc:
        print(str(exc), file=err)
        return exc.code
    except (EtcdError, EtcdUnavailable) as exc:
        print(f"Error: {exc}", file=err)
        return ExitCode.FAILURE
    finally:
        session.close()


if __name__ == "__main__":
    raise SystemExit(main())
