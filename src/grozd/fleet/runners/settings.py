"""The ``[Service]`` settings the embedded supervisor honours, read from a parsed unit.

Values follow systemd 252 (defaults, time spans, signal names, ``-`` prefixes). A setting
systemd would refuse makes `service_config` raise `UnitFileError` naming the line; the
supervisor then reports the unit as ``bad-setting``.
"""

from __future__ import annotations

import grp
import pwd
import re
import signal
from dataclasses import dataclass, field

from grozd.fleet.unit import (
    ExecCommand,
    Option,
    SpecifierContext,
    SpecifierError,
    Unit,
    UnitFileError,
)

USEC = 1e-6
_SPAN_UNITS = {
    "us": USEC, "usec": USEC, "µs": USEC,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}  # fmt: skip
_SPAN_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ]*)")

SERVICE_TYPES = ("simple", "exec", "forking", "oneshot", "notify", "idle")
RESTART_VALUES = ("no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort",
                  "always")  # fmt: skip
KILL_MODES = ("control-group", "process", "mixed", "none")
# Exit signals systemd counts as a clean exit for every service.
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_timespan(text: str, default_unit: float = 1.0) -> float | None:
    """Seconds in a systemd time span ("90", "1min 30s", "100ms"); None for "infinity"."""
    value = text.strip()
    if value == "infinity":
        return None
    if not value:
        raise ValueError("empty time span")
    total = 0.0
    pos = 0
    while pos < len(value):
        m = _SPAN_PART.match(value, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"invalid time span {text!r}")
        number, unit = m.groups()
        if unit and unit not in _SPAN_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}")
        total += float(number) * (_SPAN_UNITS[unit] if unit else default_unit)
        pos = m.end()
        while pos < len(value) and value[pos].isspace():
            pos += 1
    return total


def parse_signal(text: str) -> int:
    """A signal given as ``SIGTERM``, ``TERM`` or a number."""
    value = text.strip()
    if value.isdigit():
        num = int(value)
        signal.Signals(num)
        return num
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text!r}") from None


def signal_name(num: int) -> str:
    """``TERM`` for 15 (systemd prints signals without the SIG prefix)."""
    try:
        return signal.Signals(num).name[3:]
    except ValueError:
        return str(num)


@dataclass
class ServiceConfig:
    """What to run and how, for one service unit."""

    description: str
    type: str = "simple"
    exec_start_pre: list[ExecCommand] = field(default_factory=list)
    exec_start: list[ExecCommand] = field(default_factory=list)
    exec_start_post: list[ExecCommand] = field(default_factory=list)
    exec_stop: list[ExecCommand] = field(default_factory=list)
    exec_stop_post: list[ExecCommand] = field(default_factory=list)
    restart: str = "no"
    restart_sec: float = 0.1
    timeout_start: float | None = 90.0
    timeout_stop: float | None = 90.0
    remain_after_exit: bool = False
    pid_file: str | None = None
    guess_main_pid: bool = True
    notify_access: str = "none"
    environment: dict[str, str] = field(default_factory=dict)
    # (path, optional) in order; read at each start, later files win.
    environment_files: list[tuple[str, bool]] = field(default_factory=list)
    working_directory: str | None = None
    working_directory_optional: bool = False
    user: str | None = None
    group: str | None = None
    supplementary_groups: list[str] = field(default_factory=list)
    umask: int | None = None
    kill_mode: str = "control-group"
    kill_signal: int = signal.SIGTERM
    final_kill_signal: int = signal.SIGKILL
    send_sigkill: bool = True
    send_sighup: bool = False
    success_exit_status: frozenset[int] = frozenset()
    success_signals: frozenset[int] = frozenset()
    restart_prevent_status: frozenset[int] = frozenset()
    restart_prevent_signals: frozenset[int] = frozenset()
    restart_force_status: frozenset[int] = frozenset()
    restart_force_signals: frozenset[int] = frozenset()
    start_limit_interval: float = 10.0
    start_limit_burst: int = 5
    # "journal", "null", or ("file"|"append"|"truncate", path) as a "kind:path" string.
    standard_output: str = "journal"
    standard_error: str = "inherit"


_BOOL = {"1": True, "yes": True, "y": True, "true": True, "t": True, "on": True,
         "0": False, "no": False, "n": False, "false": False, "f": False, "off": False}  # fmt: skip


class _Reader:
    """Reads single settings from one section, turning bad values into UnitFileError."""

    def __init__(self, unit: Unit, section: str) -> None:
        self.unit = unit
        self.section = section

    def last(self, key: str, section: str | None = None) -> Option | None:
        opts = self.unit.effective(section or self.section, key)
        return opts[-1] if opts and opts[-1].value != "" else None

    def fail(self, opt: Option, message: str) -> UnitFileError:
        return UnitFileError(opt.source, opt.line, f"{opt.key}=: {message}")

    def str(self, key: str, section: str | None = None) -> str | None:
        opt = self.last(key, section)
        return opt.value if opt is not None else None

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        opt = self.last(key)
        if opt is None:
            return default
        if opt.value not in choices:
            raise self.fail(opt, f"invalid value {opt.value!r}")
        return opt.value

    def bool(self, key: str, default: bool) -> bool:
        opt = self.last(key)
        if opt is None:
            return default
        value = _BOOL.get(opt.value.lower())
        if value is None:
            raise self.fail(opt, f"not a boolean: {opt.value!r}")
        return value

    def span(self, key: str, default: float | None, section: str | None = None) -> float | None:
        opt = self.last(key, section)
        if opt is None:
            return default
        try:
            value = parse_timespan(opt.value)
        except ValueError as exc:
            raise self.fail(opt, str(exc)) from None
        return value

    def timeout(self, key: str, default: float | None) -> float | None:
        value = self.span(key, default)
        # A zero timeout means "no timeout" for TimeoutStartSec=/TimeoutStopSec=.
        return None if value == 0 else value

    def signal(self, key: str, default: int) -> int:
        opt = self.last(key)
        if opt is None:
            return default
        try:
            return parse_signal(opt.value)
        except ValueError as exc:
            raise self.fail(opt, str(exc)) from None

    def statuses(self, key: str) -> tuple[frozenset[int], frozenset[int]]:
        codes: set[int] = set()
        signals: set[int] = set()
        for opt in self.unit.effective(self.section, key):
            for word in opt.value.split():
                if word.isdigit() and 0 <= int(word) <= 255:
                    codes.add(int(word))
                    continue
                try:
                    signals.add(parse_signal(word))
                except ValueError:
                    raise self.fail(opt, f"invalid exit status {word!r}") from None
        return frozenset(codes), frozenset(signals)


def service_config(unit: Unit, context: SpecifierContext | None = None) -> ServiceConfig:
    """Read a service unit's settings; `UnitFileError` for what systemd would refuse."""
    r = _Reader(unit, "Service")
    name = unit.name or "unit.service"
    execs = {
        key: unit.exec_commands(key, context)
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost")
    }
    type_opt = r.last("Type")
    if type_opt is not None and type_opt.value == "dbus":
        raise r.fail(type_opt, "Type=dbus is not supported by the embedded supervisor")
    stype = r.choice("Type", SERVICE_TYPES, "simple" if execs["ExecStart"] else "oneshot")
    if stype in ("exec", "idle"):
        # Started when exec() succeeded / no job ordering: both are "simple" here.
        stype = "simple"
    if not execs["ExecStart"] and not (stype == "oneshot" and execs["ExecStop"]):
        if stype != "oneshot" or not r.bool("RemainAfterExit", False):
            raise UnitFileError(unit.source, None, f"{name} has no ExecStart= setting")
    if stype != "oneshot" and len(execs["ExecStart"]) > 1:
        raise UnitFileError(
            unit.source, None, "more than one ExecStart= command, which only Type=oneshot allows"
        )
    restart = r.choice("Restart", RESTART_VALUES, "no")
    if stype == "oneshot" and restart in ("always", "on-success"):
        opt = r.last("Restart")
        assert opt is not None
        raise r.fail(opt, f"Restart={restart} is not allowed with Type=oneshot")
    # TimeoutSec= sets both; the specific ones win. Type=oneshot has no start timeout
    # unless one is given.
    both_set = r.last("TimeoutSec") is not None
    both = r.timeout("TimeoutSec", None)
    start_default = both if both_set else (None if stype == "oneshot" else 90.0)
    stop_default = both if both_set else 90.0
    cfg = ServiceConfig(
        description=unit.get("Unit", "Description") or name,
        type=stype,
        exec_start_pre=execs["ExecStartPre"],
        exec_start=execs["ExecStart"],
        exec_start_post=execs["ExecStartPost"],
        exec_stop=execs["ExecStop"],
        exec_stop_post=execs["ExecStopPost"],
        restart=restart,
        restart_sec=r.span("RestartSec", 0.1) or 0.0,
        timeout_start=r.timeout("TimeoutStartSec", start_default),
        timeout_stop=r.timeout("TimeoutStopSec", stop_default),
        remain_after_exit=r.bool("RemainAfterExit", False),
        guess_main_pid=r.bool("GuessMainPID", True),
        notify_access=r.choice(
            "NotifyAccess", ("none", "main", "exec", "all"), "main" if stype == "notify" else "none"
        ),
        environment=unit.environment(context),
        kill_mode=r.choice("KillMode", KILL_MODES, "control-group"),
        kill_signal=r.signal("KillSignal", signal.SIGTERM),
        final_kill_signal=r.signal("FinalKillSignal", signal.SIGKILL),
        send_sigkill=r.bool("SendSIGKILL", True),
        send_sighup=r.bool("SendSIGHUP", False),
        user=r.str("User"),
        group=r.str("Group"),
        start_limit_burst=5,
    )
    expand = unit.expander(context)
    cfg.success_exit_status, cfg.success_signals = r.statuses("SuccessExitStatus")
    cfg.restart_prevent_status, cfg.restart_prevent_signals = r.statuses("RestartPreventExitStatus")
    cfg.restart_force_status, cfg.restart_force_signals = r.statuses("RestartForceExitStatus")
    pid_opt = r.last("PIDFile")
    if pid_opt is not None:
        path = _expand(r, pid_opt, expand)
        cfg.pid_file = path if path.startswith("/") else f"/run/{path}"
    for opt in unit.effective("Service", "EnvironmentFile"):
        if not opt.value:
            continue
        optional = opt.value.startswith("-")
        path = _expand(r, opt, expand, opt.value[1:] if optional else opt.value)
        if not path.startswith("/"):
            raise r.fail(opt, f"path is not absolute: {path!r}")
        cfg.environment_files.append((path, optional))
    wd = r.last("WorkingDirectory")
    if wd is not None:
        value = wd.value
        cfg.working_directory_optional = value.startswith("-")
        value = value[1:] if cfg.working_directory_optional else value
        cfg.working_directory = value if value == "~" else _expand(r, wd, expand, value)
        if cfg.working_directory != "~" and not cfg.working_directory.startswith("/"):
            raise r.fail(wd, f"path is not absolute: {cfg.working_directory!r}")
    groups = []
    for opt in unit.effective("Service", "SupplementaryGroups"):
        groups.extend(opt.value.split())
    cfg.supplementary_groups = groups
    umask = r.last("UMask")
    if umask is not None:
        try:
            cfg.umask = int(umask.value, 8)
        except ValueError:
            raise r.fail(umask, f"invalid umask {umask.value!r}") from None
    for key in ("StandardOutput", "StandardError"):
        opt = r.last(key)
        if opt is None:
            continue
        kind, _, path = opt.value.partition(":")
        if opt.value in ("journal", "journal+console", "syslog", "kmsg", "tty", "console"):
            value = "journal"
        elif opt.value in ("inherit", "null"):
            value = opt.value
        elif kind in ("file", "append", "truncate") and path.startswith("/"):
            value = f"{kind}:{_expand(r, opt, expand, path)}"
        else:
            raise r.fail(opt, f"unsupported value {opt.value!r}")
        if key == "StandardOutput":
            cfg.standard_output = "journal" if value == "inherit" else value
        else:
            cfg.standard_error = value
    interval = r.span("StartLimitIntervalSec", 10.0, "Unit")
    if r.last("StartLimitIntervalSec", "Unit") is None:
        interval = r.span("StartLimitInterval", 10.0)  # the old spelling, in [Service]
    # 0 (or infinity) turns rate limiting off.
    cfg.start_limit_interval = interval or 0.0
    burst = r.last("StartLimitBurst", "Unit") or r.last("StartLimitBurst")
    if burst is not None:
        if not burst.value.isdigit():
            raise r.fail(burst, f"invalid number {burst.value!r}")
        cfg.start_limit_burst = int(burst.value)
    for key, value in (("User", cfg.user), ("Group", cfg.group)):
        opt = r.last(key)
        if opt is not None and value is not None:
            try:
                if key == "User":
                    lookup_user(value)
                else:
                    lookup_group(value)
            except KeyError as exc:
                raise r.fail(opt, str(exc.args[0])) from None
    return cfg


def _expand(r: _Reader, opt: Option, expand: object, value: str | None = None) -> str:
    try:
        return expand(opt.value if value is None else value)  # type: ignore[operator]
    except SpecifierError as exc:
        raise r.fail(opt, str(exc)) from None


def lookup_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of a user name or numeric UID (KeyError if unknown)."""
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise KeyError(f"unknown user {name!r}") from None


def lookup_group(name: str) -> int:
    """The GID of a group name or number (KeyError if unknown)."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise KeyError(f"unknown group {name!r}") from None


def read_environment_file(text: str) -> dict[str, str]:
    """Parse an EnvironmentFile= (``KEY=value`` lines, quotes, ``#``/``;`` comments)."""
    env: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        # A trailing backslash continues an unquoted value on the next line.
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i]
            i += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, eq, value = stripped.partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\`$])', r"\1", value[1:-1])
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key] = value
    return env
