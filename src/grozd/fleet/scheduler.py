"""Where each unit should run: a pure function of the units and the present machines.

Rules, as fleet's engine applies them to non-global units that should be loaded or
launched:

* ``MachineID=`` pins a unit to that machine; ``MachineMetadata=`` keeps it to machines
  whose metadata has, for every key, one of the listed values.
* ``MachineOf=X`` puts it on the machine running X (every machine a global X runs on is
  a candidate); while X is unplaced, so is the unit.
* ``Conflicts=`` globs keep two units apart, whichever side declares the glob; global
  units count as present on every machine they match.
* ``Replaces=X`` keeps the unit and X apart too, but where a conflict would rule a
  machine out, a replacement takes it over: the unit prefers a machine running X and X is
  moved elsewhere (or left unplaced with a reason if nowhere else fits).
* Among the machines left, the one with the fewest units wins (ties by machine ID).

A placement that is still valid is never changed (no rebalancing); units on machines that
are gone, or whose rules no longer hold, are placed again. Global units are not placed
here at all: every agent whose metadata matches runs them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from grozd.fleet.registry import INACTIVE, MachineState, short_id
from grozd.fleet.unit import FleetOptions

# Bound on displacement chains (A replaces B, B replaces C ...), so a cycle cannot spin.
_MAX_PASSES = 8


@dataclass(frozen=True)
class SchedUnit:
    """What the scheduler needs to know about one unit."""

    name: str
    desired: str
    target: str | None = None
    options: FleetOptions | None = None
    # Why the unit cannot be scheduled at all (unreadable file, template ...), if so.
    error: str | None = None

    @property
    def is_global(self) -> bool:
        return self.options is not None and self.options.is_global


@dataclass(frozen=True)
class Placement:
    """The decision for one unit: a machine, or None and (if wanted) the reason."""

    machine: str | None
    reason: str | None = None


def _globmatch(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _conflict(a: SchedUnit, b: SchedUnit) -> bool:
    """True if ``a`` and ``b`` may not share a machine (Conflicts or Replaces, either way)."""
    oa, ob = a.options, b.options
    if oa is None or ob is None:
        return False
    return (
        _globmatch(oa.conflicts, b.name)
        or _globmatch(ob.conflicts, a.name)
        or _globmatch(oa.replaces, b.name)
        or _globmatch(ob.replaces, a.name)
    )


def _replaces(a: SchedUnit, b: SchedUnit) -> bool:
    """True if ``a`` may displace ``b`` (a declares Replaces= matching b, and b does not
    itself conflict with a by a Conflicts= rule)."""
    oa, ob = a.options, b.options
    if oa is None or ob is None or not _globmatch(oa.replaces, b.name):
        return False
    return not (_globmatch(oa.conflicts, b.name) or _globmatch(ob.conflicts, a.name))


class _State:
    """Machines and what is on them while a plan is built."""

    def __init__(self, machines: Mapping[str, MachineState], units: Mapping[str, SchedUnit]):
        self.machines = machines
        self.units = units
        self.on: dict[str, dict[str, SchedUnit]] = {m: {} for m in machines}
        self.where: dict[str, str] = {}
        self.global_on: dict[str, list[SchedUnit]] = {m: [] for m in machines}
        # Whether any unit has Conflicts=/Replaces=: without them, and without placement
        # options of its own, every machine suits a unit (see `_choose`).
        self.rules = any(u.options is not None and (u.options.conflicts or u.options.replaces)
                         for u in units.values())  # fmt: skip
        for u in units.values():
            if u.is_global and u.desired != INACTIVE and u.error is None and u.options:
                for mid, m in machines.items():
                    if u.options.metadata_matches(m.metadata):
                        self.global_on[mid].append(u)

    def load(self, mid: str) -> int:
        return len(self.on[mid])

    def put(self, u: SchedUnit, mid: str) -> None:
        self.on[mid][u.name] = u
        self.where[u.name] = mid

    def remove(self, name: str) -> None:
        mid = self.where.pop(name, None)
        if mid is not None:
            self.on[mid].pop(name, None)

    def leader_machines(self, leader: str) -> set[str] | None:
        """Machines a MachineOf= leader is on (None: not placed anywhere)."""
        if leader in self.where:
            return {self.where[leader]}
        found = {mid for mid, gs in self.global_on.items() if any(g.name == leader for g in gs)}
        return found or None

    def why_not(self, u: SchedUnit, mid: str, *, displace: bool) -> str | None:
        """None if ``u`` may go on ``mid``; else a short reason.

        With ``displace`` a unit that ``u`` replaces does not count against the machine.
        """
        opts = u.options
        assert opts is not None
        machine = self.machines[mid]
        if opts.machine_id is not None and opts.machine_id != mid:
            return "not the MachineID"
        if not opts.metadata_matches(machine.metadata):
            wanted = ",".join(
                f"{k}={'|'.join(v)}" for k, v in sorted(opts.machine_metadata.items())
            )
            return f"metadata does not match {wanted}"
        for leader in opts.machine_of:
            machines = self.leader_machines(leader)
            if machines is None or mid not in machines:
                return f"{leader} is not there"
        for other in list(self.on[mid].values()) + self.global_on[mid]:
            if other.name == u.name or not _conflict(u, other):
                continue
            if displace and not other.is_global and _replaces(u, other):
                continue
            return f"conflicts with {other.name}"
        return None


def _order(units: Mapping[str, SchedUnit], names: Iterable[str]) -> list[str]:
    """Names with MachineOf= leaders before their followers, otherwise by name."""
    pending = sorted(names)
    wanted = set(pending)
    done: list[str] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in placed or name in visiting:
            return
        visiting.add(name)
        opts = units[name].options
        for leader in opts.machine_of if opts else ():
            if leader in wanted:
                visit(leader)
        visiting.discard(name)
        placed.add(name)
        done.append(name)

    for name in pending:
        visit(name)
    return done


def schedule(
    units: Mapping[str, SchedUnit], machines: Mapping[str, MachineState]
) -> dict[str, Placement]:
    """The placement of every non-global unit (see the module docstring)."""
    result: dict[str, Placement] = {}
    state = _State(machines, units)
    wanted: list[str] = []
    for name, u in units.items():
        if u.is_global:
            continue
        if u.desired == INACTIVE:
            result[name] = Placement(None)
        elif u.error is not None or u.options is None:
            result[name] = Placement(None, u.error or "unit cannot be scheduled")
        else:
            wanted.append(name)
    order = _order(units, wanted)

    # Pass 1: keep every placement that still holds, leaders first.
    pending: list[str] = []
    for name in order:
        u = units[name]
        if u.target in machines and state.why_not(u, u.target, displace=False) is None:
            state.put(u, u.target)
        else:
            pending.append(name)

    # Pass 2: place the rest. A replacement pushes the unit it replaces back in line, and
    # a unit that moved takes its MachineOf= followers along: re-check, then go again.
    for _ in range(_MAX_PASSES):
        if not pending:
            break
        for name in pending:
            u = units[name]
            mid, reason = _choose(u, state)
            if mid is None:
                result[name] = Placement(None, reason)
                continue
            for other in list(state.on[mid].values()):
                if other.name != name and _replaces(u, other):
                    state.remove(other.name)
            state.put(u, mid)
            result.pop(name, None)
        pending = []
        for name in order:
            mid = state.where.get(name)
            if mid is None:
                if name not in result:
                    pending.append(name)
                continue
            state.remove(name)
            if state.why_not(units[name], mid, displace=False) is None:
                state.put(units[name], mid)
            else:
                pending.append(name)
    for name in pending:
        result[name] = Placement(None, "placement did not settle (Replaces= or MachineOf= cycle)")
    for name, mid in state.where.items():
        result[name] = Placement(mid)
    return result


def _choose(u: SchedUnit, state: _State) -> tuple[str | None, str | None]:
    """The best machine for ``u`` (or None and why there is none)."""
    opts = u.options
    assert opts is not None
    if not state.machines:
        return None, "no machines in the cluster"
    if opts.machine_id is not None and opts.machine_id not in state.machines:
        return None, f"MachineID {opts.machine_id} is not in the cluster"
    for leader in opts.machine_of:
        if state.leader_machines(leader) is None:
            return None, f"MachineOf {leader}: {leader} is not scheduled"
    if not (state.rules or opts.machine_id or opts.machine_of or opts.machine_metadata):
        # Nothing can rule a machine out: the least loaded (lowest ID first), as below,
        # without checking each machine (that made large clusters block the engine).
        return min(state.machines, key=lambda mid: (len(state.on[mid]), mid)), None
    candidates: list[tuple[int, int, str]] = []
    refusals: list[str] = []
    for mid in sorted(state.machines):
        why = state.why_not(u, mid, displace=True)
        if why is None:
            hosts_replaced = any(
                _replaces(u, other) and _conflict(u, other) for other in state.on[mid].values()
            )
            # A machine running a unit this one replaces comes first; then the least loaded.
            candidates.append((0 if hosts_replaced else 1, state.load(mid), mid))
        elif why != "not the MachineID":
            refusals.append(f"{short_id(mid)}: {why}")
    if candidates:
        return min(candidates)[2], None
    if not refusals:
        return None, "no eligible machine"
    return None, "no eligible machine (" + "; ".join(refusals) + ")"
