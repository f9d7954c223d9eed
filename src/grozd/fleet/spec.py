"""A unit as fleet handles it: the parsed file, its ``[X-Fleet]`` options, and warnings.

Errors (`UnitFileError`, message ``file:line: reason``) are what fleet must refuse: a file
systemd's parser cannot read, or ``[X-Fleet]`` values that cannot be understood. Anything
fleet can still schedule is a warning: an unknown ``[X-Fleet]`` key (ignored), a
deprecated spelling, options that ``Global=true`` ignores, and what systemd itself would
complain about when loading the unit (`grozd.fleet.unit.validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from grozd.fleet.unit import (
    FleetOptions,
    Unit,
    UnitFileError,
    UnitName,
    parse_unit,
    unknown_fleet_key_warning,
    validate,
)

__all__ = [
    "FLEET_UNIT_TYPES",
    "KNOWN_FLEET_KEYS",
    "UnitSpec",
    "UnitFileError",
    "check_name",
    "parse_spec",
    "spec_for",
]

# Unit types fleet schedules (fleet's own list).
FLEET_UNIT_TYPES = frozenset({"service", "socket", "device", "mount", "automount", "timer", "path"})

_DEPRECATED = {
    "X-ConditionMachineID": "MachineID",
    "X-ConditionMachineOf": "MachineOf",
    "X-ConditionMachineMetadata": "MachineMetadata",
    "X-Conflicts": "Conflicts",
}
KNOWN_FLEET_KEYS = frozenset(
    {"MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Replaces", "Global"}
    | set(_DEPRECATED)
)


@dataclass(frozen=True)
class UnitSpec:
    """A unit file ready for scheduling."""

    name: str
    text: str
    unit: Unit
    options: FleetOptions
    warnings: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        """SHA-1 of the file's bytes."""
        return self.unit.hash

    @property
    def is_global(self) -> bool:
        return self.options.is_global

    @property
    def description(self) -> str:
        """``Description=``, or empty."""
        return self.unit.get("Unit", "Description") or ""

    @property
    def is_template(self) -> bool:
        return UnitName.parse(self.name).is_template


def check_name(name: str) -> UnitName:
    """Parse a unit name fleet accepts; ValueError with the reason otherwise."""
    try:
        unit = UnitName.parse(name)
    except ValueError:
        raise ValueError(f"invalid unit name {name!r}") from None
    if unit.type not in FLEET_UNIT_TYPES:
        kinds = ", ".join(sorted(FLEET_UNIT_TYPES))
        raise ValueError(f"unit {name}: fleet does not schedule .{unit.type} units ({kinds})")
    return unit


def parse_spec(name: str, text: str | bytes, source: str | None = None) -> UnitSpec:
    """Parse unit ``name``; raises `UnitFileError` (``source:line: reason``) when invalid."""
    label = source or name
    try:
        check_name(name)
    except ValueError as exc:
        raise UnitFileError(label, None, str(exc)) from None
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnitFileError(label, None, f"unit file is not valid UTF-8: {exc}") from None
    unit = parse_unit(raw, name, source=label)
    warnings: list[str] = []
    kept = []
    for opt in unit.options:
        if opt.section == "X-Fleet":
            if opt.key not in KNOWN_FLEET_KEYS:
                warnings.append(unknown_fleet_key_warning(opt))
                continue
            if opt.key in _DEPRECATED:
                warnings.append(
                    f"{opt.source}:{opt.line}: [X-Fleet] {opt.key}= is deprecated,"
                    f" use {_DEPRECATED[opt.key]}="
                )
        kept.append(opt)
    options = dataclasses.replace(unit, options=tuple(kept)).fleet_options()
    if options.is_global:
        ignored = [
            key
            for key, present in (
                ("MachineID", options.machine_id),
                ("MachineOf", options.machine_of),
                ("Conflicts", options.conflicts),
                ("Replaces", options.replaces),
            )
            if present
        ]
        if ignored:
            warnings.append(
                f"{label}: Global=true only honours MachineMetadata=; ignoring "
                + ", ".join(f"{k}=" for k in ignored)
            )
            options = FleetOptions(machine_metadata=options.machine_metadata, is_global=True)
    for problem in validate(unit):
        suffix = " (systemd would refuse to load this unit)" if problem.fatal else ""
        warnings.append(f"{problem}{suffix}")
    return UnitSpec(name, decoded, unit, options, tuple(warnings))


@lru_cache(maxsize=4096)
def spec_for(name: str, text: str) -> UnitSpec | UnitFileError:
    """Cached `parse_spec` for the engine and agents: the spec, or the error."""
    try:
        return parse_spec(name, text)
    except UnitFileError as exc:
        return exc
