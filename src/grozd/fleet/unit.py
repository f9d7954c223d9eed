"""systemd unit files as systemd 252 reads them: parsing, specifiers, drop-ins, [X-Fleet].

The line-level rules (comments, continuations, whitespace, section headers) follow
systemd's configuration parser; ``Exec*=`` and ``Environment=`` follow its word
splitter (quotes and C escapes).  Parsing is strict where systemd would only warn
(an assignment outside a section, a line without ``=``): fleet stores unit files,
and a store should not silently drop lines.  What would make systemd itself refuse
the unit is reported separately by :func:`validate`, because such a unit may still
be stored.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
import pwd
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EXEC_KEYS",
    "RESET_ON_EMPTY",
    "UNIT_TYPES",
    "ExecCommand",
    "FleetOptions",
    "Option",
    "Problem",
    "SpecifierContext",
    "SpecifierError",
    "Unit",
    "UnitFileError",
    "UnitName",
    "content_hash",
    "dropin_dirs",
    "expand_specifiers",
    "load_unit",
    "merge_dropins",
    "parse_environment",
    "parse_exec",
    "parse_unit",
    "parse_unit_file",
    "unit_name_escape",
    "unit_name_path_escape",
    "unit_name_path_unescape",
    "unit_name_unescape",
    "validate",
]

# systemd's WHITESPACE: deliberately not str.isspace(), which also strips \v, \f and
# Unicode spaces that systemd keeps as part of a value.
_WS = " \t\n\r"
_WS_B = b" \t\n\r"
# read_line() gives up at this many bytes in one line (LONG_LINE_MAX).
LONG_LINE_MAX = 1024 * 1024
_BOM = b"\xef\xbb\xbf"
# One end of line for systemd's read_line(): each of \r and \n at most once, in either
# order, optionally closed by a NUL; a NUL alone also ends a line.
_EOL = re.compile(rb"\r\n?\x00?|\n\r?\x00?|\x00")

UNIT_TYPES = frozenset(
    {
        "service",
        "socket",
        "target",
        "device",
        "mount",
        "automount",
        "swap",
        "timer",
        "path",
        "slice",
        "scope",
    }
)

_SERVICE_EXEC_KEYS = (
    "ExecCondition",
    "ExecStartPre",
    "ExecStart",
    "ExecStartPost",
    "ExecReload",
    "ExecStop",
    "ExecStopPost",
)
_SOCKET_EXEC_KEYS = ("ExecStartPre", "ExecStartPost", "ExecStopPre", "ExecStopPost")
EXEC_KEYS = frozenset(_SERVICE_EXEC_KEYS + _SOCKET_EXEC_KEYS)

# Keys whose empty assignment drops everything assigned before (checked against
# systemd 252).  List-valued keys not named here, notably the dependencies
# (After=, Requires=, Wants=, ...), ignore an empty assignment.  Condition*=/Assert*=
# are left out on purpose: their empty assignment resets *all* conditions, which a
# per-key reset would misrepresent.
RESET_ON_EMPTY = EXEC_KEYS | frozenset(
    {
        "Environment",
        "EnvironmentFile",
        "PassEnvironment",
        "UnsetEnvironment",
        "Documentation",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "ExecPaths",
        "NoExecPaths",
        "SupplementaryGroups",
        "SuccessExitStatus",
        "RestartPreventExitStatus",
        "RestartForceExitStatus",
    }
)

_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})


def _parse_boolean(value: str) -> bool | None:
    """systemd's parse_boolean(); None when the word is not a boolean."""
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def _utf8_clean(text: str) -> bool:
    """True if ``text`` holds only what systemd's utf8_is_valid() accepts.

    Surrogates stand for undecodable bytes (surrogateescape); systemd also rejects
    the Unicode non-characters (U+FDD0..U+FDEF and U+xxFFFE/U+xxFFFF).
    """
    for ch in text:
        o = ord(ch)
        if 0xD800 <= o <= 0xDFFF or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE:
            return False
    return True


def content_hash(data: bytes | str) -> str:
    """SHA-1 hex digest of a unit file's exact bytes (fleet names units by it)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return hashlib.sha1(data).hexdigest()


# --------------------------------------------------------------------------- errors


class UnitFileError(ValueError):
    """A unit file that cannot be read; the message is ``file:line: reason``."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")


class SpecifierError(ValueError):
    """A ``%`` specifier that is unknown or cannot be resolved."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something :func:`validate` found; ``fatal`` means systemd refuses to load the unit."""

    source: str
    line: int | None
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.message}"


# ------------------------------------------------------------------------ unit names

# Characters systemd allows in unit names; '@' separates prefix and instance.
_NAME_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:-_.\\")
_NAME_CHARS_AT = _NAME_CHARS | {"@"}
UNIT_NAME_MAX = 256


@dataclass(frozen=True, slots=True)
class UnitName:
    """A unit name split into its parts: ``prefix@instance.type``.

    ``instance`` is None for a plain unit and ``""`` for a template.
    """

    name: str
    prefix: str
    instance: str | None
    type: str

    @classmethod
    def parse(cls, name: str) -> UnitName:
        """Split ``name``; raise ValueError unless systemd would accept it as a unit name."""
        dot = name.rfind(".")
        if not name or len(name) >= UNIT_NAME_MAX or dot <= 0:
            raise ValueError(f"invalid unit name {name!r}")
        utype = name[dot + 1 :]
        stem = name[:dot]
        if utype not in UNIT_TYPES or not set(stem) <= _NAME_CHARS_AT:
            raise ValueError(f"invalid unit name {name!r}")
        at = stem.find("@")
        if at == 0:
            raise ValueError(f"invalid unit name {name!r}")
        if at < 0:
            return cls(name, stem, None, utype)
        return cls(name, stem[:at], stem[at + 1 :], utype)

    @property
    def is_template(self) -> bool:
        """True for ``foo@.service``."""
        return self.instance == ""

    @property
    def is_instance(self) -> bool:
        """True for ``foo@bar.service``."""
        return bool(self.instance)

    @property
    def template(self) -> str | None:
        """The template an instance is made from (``foo@.service``), else None."""
        if self.instance is None:
            return None
        return f"{self.prefix}@.{self.type}"

    @property
    def stem(self) -> str:
        """The name without its type suffix (``%N``)."""
        return self.name[: -len(self.type) - 1]

    def instantiate(self, instance: str) -> str:
        """The name of this template (or instance) with ``instance`` put in."""
        if self.instance is None:
            raise ValueError(f"{self.name} is not a template")
        return UnitName.parse(f"{self.prefix}@{instance}.{self.type}").name


def unit_name_unescape(text: str) -> str:
    """Undo systemd-escape: ``-`` becomes ``/``, ``\\xHH`` becomes that byte."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "-":
            out += b"/"
            i += 1
        elif ch == "\\":
            hexpart = text[i + 2 : i + 4]
            if text[i + 1 : i + 2] != "x" or len(hexpart) != 2 or not _is_hex(hexpart):
                raise SpecifierError(f"invalid escape in unit name part {text!r}")
            out.append(int(hexpart, 16))
            i += 4
        else:
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
    return out.decode("utf-8", "surrogateescape")


def unit_name_path_unescape(text: str) -> str:
    """Turn an escaped unit name part back into an absolute path (``%f``)."""
    if not text:
        raise SpecifierError("cannot turn an empty name into a path")
    if text == "-":
        return "/"
    path = unit_name_unescape(text)
    # systemd insists the result is a normalised path; a name like "a--b" is refused.
    if path.startswith("/") or path.endswith("/"):
        raise SpecifierError(f"{text!r} does not unescape to a path")
    path = "/" + path
    if not _path_is_normalized(path):
        raise SpecifierError(f"{text!r} does not unescape to a normalized path")
    return path


def unit_name_escape(text: str) -> str:
    """Escape a string for use in a unit name, as ``systemd-escape`` does."""
    out = []
    data = text.encode("utf-8", "surrogateescape")
    for i, b in enumerate(data):
        ch = chr(b)
        if ch == "/":
            out.append("-")
        elif (i == 0 and ch == ".") or ch in "-\\" or b >= 0x80 or ch not in _NAME_CHARS:
            # A leading dot would make a hidden file; '-' and '\' carry meaning.
            out.append(f"\\x{b:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unit_name_path_escape(path: str) -> str:
    """Escape a path for use in a unit name, as ``systemd-escape --path`` does."""
    simple = _path_simplify(path)
    if simple in ("", "/"):
        return "-"
    if not _path_is_normalized(simple if simple.startswith("/") else "/" + simple):
        raise ValueError(f"path {path!r} is not normalized")
    return unit_name_escape(simple.strip("/"))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _path_simplify(path: str) -> str:
    """systemd's path_simplify(): drop duplicate slashes and ``.`` components."""
    absolute = path.startswith("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    joined = "/".join(parts)
    return "/" + joined if absolute else joined


def _path_is_normalized(path: str) -> bool:
    if not path or len(path.encode("utf-8", "surrogateescape")) > 4096:
        return False
    parts = path.split("/")
    if any(p in (".", "..") for p in parts):
        return False
    return "//" not in path


def _filename_is_valid(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 255
    )


def _string_is_safe(text: str) -> bool:
    """systemd's string_is_safe(): no ASCII control characters, quotes or backslashes."""
    return not any(ord(c) < 0x20 or c in "\"'\\\x7f" for c in text)


# ------------------------------------------------------------------------ specifiers

_ARCHITECTURES = {
    "x86_64": "x86-64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "aarch64_be": "arm64-be",
    "armv7l": "arm",
    "armv6l": "arm",
    "armv8l": "arm",
    "ppc64le": "ppc64-le",
    "ppc64": "ppc64",
    "ppc": "ppc",
    "ppcle": "ppc-le",
    "s390x": "s390x",
    "s390": "s390",
    "riscv64": "riscv64",
    "riscv32": "riscv32",
    "loongarch64": "loongarch64",
    "mips": "mips",
    "mipsel": "mips-le",
    "mips64": "mips64",
    "mips64el": "mips64-le",
    "sparc64": "sparc64",
    "sparc": "sparc",
    "alpha": "alpha",
    "ia64": "ia64",
    "parisc": "parisc",
    "parisc64": "parisc64",
    "m68k": "m68k",
}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _host_hostname() -> str | None:
    text = _read_text("/etc/hostname")
    if text is not None:
        # Like systemd's read_etc_hostname(): the first line that is not a comment.
        for line in text.splitlines():
            line = line.strip(_WS)
            if line and not line.startswith("#"):
                return line
    return os.uname().nodename or None


def _host_id128(path: str) -> str | None:
    text = _read_text(path)
    if text is None:
        return None
    ident = text.strip().replace("-", "").lower()
    return ident if len(ident) == 32 and _is_hex(ident) else None


def _parse_env_file(text: str) -> dict[str, str]:
    """A small reader for os-release(5) and machine-info(5) style files."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if not eq or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r'\\([\\"$`])', r"\1", value)
        values[key.strip()] = value
    return values


def _host_os_release() -> dict[str, str]:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = _read_text(path)
        if text is not None:
            return _parse_env_file(text)
    return {}


def _host_pretty_hostname() -> str | None:
    text = _read_text("/etc/machine-info")
    if text is None:
        return None
    return _parse_env_file(text).get("PRETTY_HOSTNAME") or None


def _host_root_shell() -> str:
    try:
        return pwd.getpwuid(0).pw_shell or "/bin/sh"
    except KeyError:
        return "/bin/sh"


@dataclass(frozen=True)
class SpecifierContext:
    """Host facts behind the host-dependent specifiers.

    Left out, each field is read from the running host (``/etc/hostname``,
    ``/etc/machine-id``, ``/proc/sys/kernel/random/boot_id``, ``/etc/os-release``,
    ``uname``).  The user fields describe the system service manager (root), which
    is where fleet starts units.  A field that is None could not be determined, and
    its specifier raises :class:`SpecifierError`.
    """

    hostname: str | None = field(default_factory=_host_hostname)
    machine_id: str | None = field(default_factory=lambda: _host_id128("/etc/machine-id"))
    boot_id: str | None = field(
        default_factory=lambda: _host_id128("/proc/sys/kernel/random/boot_id")
    )
    pretty_hostname: str | None = field(default_factory=_host_pretty_hostname)
    kernel_release: str | None = field(default_factory=lambda: os.uname().release)
    architecture: str | None = field(
        default_factory=lambda: _ARCHITECTURES.get(os.uname().machine, os.uname().machine)
    )
    os_release: Mapping[str, str] = field(default_factory=_host_os_release)
    user_name: str = "root"
    uid: int = 0
    group_name: str = "root"
    gid: int = 0
    home: str = "/root"
    shell: str = field(default_factory=_host_root_shell)
    runtime_dir: str = "/run"
    state_dir: str = "/var/lib"
    cache_dir: str = "/var/cache"
    logs_dir: str = "/var/log"
    config_dir: str = "/etc"
    tmp_dir: str = "/tmp"
    var_tmp_dir: str = "/var/tmp"
    credentials_dir: str = "/run/credentials"


def _need(value: str | None, what: str, spec: str) -> str:
    if value is None:
        raise SpecifierError(f"specifier '%{spec}' needs the {what}, which is not known")
    return value


def _last_component(prefix: str) -> str:
    dash = prefix.rfind("-")
    return prefix[dash + 1 :] if dash >= 0 else prefix


# Specifiers that depend only on the unit's name (and, for %y/%Y, its path).
_NAME_SPECIFIERS = frozenset("nNpPiIjJfyY")
# Specifiers systemd resolves from the running manager's cgroup tree; they have no
# meaning for a unit that is only stored.
_RUNTIME_SPECIFIERS = frozenset("crR")


def _resolve(
    spec: str,
    unit: UnitName | None,
    ctx: SpecifierContext | None,
    path: str | None,
    lenient: bool = False,
) -> str:
    if spec in _NAME_SPECIFIERS:
        if spec in "yY":
            if path is None:
                raise SpecifierError(f"specifier '%{spec}' needs the unit file's path")
            return path if spec == "y" else os.path.dirname(path)
        if unit is None:
            raise SpecifierError(f"specifier '%{spec}' needs the unit name")
        if spec == "n":
            return unit.name
        if spec == "N":
            return unit.stem
        if spec == "p":
            return unit.prefix
        if spec == "P":
            return unit_name_unescape(unit.prefix)
        if spec == "i":
            return unit.instance or ""
        if spec == "I":
            return unit_name_unescape(unit.instance or "")
        if spec == "j":
            return _last_component(unit.prefix)
        if spec == "J":
            return unit_name_unescape(_last_component(unit.prefix))
        # %f: the instance (or, without one, the prefix) as a path.
        return unit_name_path_unescape(unit.instance or unit.prefix)
    if spec in _RUNTIME_SPECIFIERS:
        if lenient:
            # systemd 252 still resolves these deprecated ones; validation must not
            # call a unit broken over them.
            return ""
        raise SpecifierError(f"specifier '%{spec}' needs a running service manager")
    getter = _CONTEXT_SPECIFIERS.get(spec)
    if getter is None:
        raise SpecifierError(f"unknown specifier '%{spec}'")
    if ctx is None:
        raise SpecifierError(f"specifier '%{spec}' needs host information (no context given)")
    if spec == "d":
        if unit is None:
            raise SpecifierError("specifier '%d' needs the unit name")
        return f"{ctx.credentials_dir}/{unit.name}"
    return getter(ctx, spec)


def _os_field(key: str) -> Callable[[SpecifierContext, str], str]:
    # A field missing from os-release expands to nothing, as in systemd.
    return lambda c, s: c.os_release.get(key, "")


_CONTEXT_SPECIFIERS: dict[str, Callable[[SpecifierContext, str], str]] = {
    "a": lambda c, s: _need(c.architecture, "architecture", s),
    "A": _os_field("IMAGE_VERSION"),
    "b": lambda c, s: _need(c.boot_id, "boot ID", s),
    "B": _os_field("BUILD_ID"),
    "C": lambda c, s: c.cache_dir,
    "d": lambda c, s: c.credentials_dir,  # resolved with the unit name in _resolve()
    "E": lambda c, s: c.config_dir,
    "g": lambda c, s: c.group_name,
    "G": lambda c, s: str(c.gid),
    "h": lambda c, s: c.home,
    "H": lambda c, s: _need(c.hostname, "hostname", s),
    "l": lambda c, s: _need(c.hostname, "hostname", s).split(".", 1)[0],
    "L": lambda c, s: c.logs_dir,
    "m": lambda c, s: _need(c.machine_id, "machine ID", s),
    "M": _os_field("IMAGE_ID"),
    "o": _os_field("ID"),
    "q": lambda c, s: c.pretty_hostname or _need(c.hostname, "hostname", s),
    "s": lambda c, s: c.shell,
    "S": lambda c, s: c.state_dir,
    "t": lambda c, s: c.runtime_dir,
    "T": lambda c, s: c.tmp_dir,
    "u": lambda c, s: c.user_name,
    "U": lambda c, s: str(c.uid),
    "v": lambda c, s: _need(c.kernel_release, "kernel release", s),
    "V": lambda c, s: c.var_tmp_dir,
    "w": _os_field("VERSION_ID"),
    "W": _os_field("VARIANT_ID"),
}


def expand_specifiers(
    text: str,
    name: str | UnitName | None = None,
    context: SpecifierContext | None = None,
    *,
    path: str | None = None,
    allowed: Iterable[str] | None = None,
) -> str:
    """Replace ``%x`` specifiers in ``text`` as systemd does for unit ``name``.

    Without a ``context`` only the name-derived specifiers (``%n %N %p %P %i %I
    %j %J %f``, and ``%y %Y`` given ``path``) work; the rest raise
    :class:`SpecifierError`, as does an unknown one.  ``allowed`` restricts the set
    (``%%`` always works).  A lone trailing ``%`` is kept, as systemd keeps it.
    """
    if "%" not in text:
        return text
    unit = UnitName.parse(name) if isinstance(name, str) else name
    allowed_set = frozenset(allowed) if allowed is not None else None
    return _expand(text, unit, context, path, allowed_set)


def _expand(
    text: str,
    unit: UnitName | None,
    context: SpecifierContext | None,
    path: str | None,
    allowed: frozenset[str] | None = None,
    lenient: bool = False,
) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("%", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        if j + 1 >= n:
            out.append("%")
            break
        spec = text[j + 1]
        i = j + 2
        if spec == "%":
            out.append("%")
            continue
        if allowed is not None and spec not in allowed:
            known = spec in _NAME_SPECIFIERS or spec in _CONTEXT_SPECIFIERS
            reason = "is not allowed here" if known else "is unknown"
            raise SpecifierError(f"specifier '%{spec}' {reason}")
        out.append(_resolve(spec, unit, context, path, lenient))
    return "".join(out)


# ------------------------------------------------------------------- word splitting


class _WordError(Exception):
    """Raised by the word splitter; systemd's -EINVAL from extract_first_word()."""


def _cunescape_one(s: str, i: int) -> tuple[bytes, int] | None:
    """Decode the C escape whose letter is at ``s[i]``; (bytes, chars used) or None."""
    c = s[i]
    simple = {
        "a": b"\a",
        "b": b"\b",
        "f": b"\f",
        "n": b"\n",
        "r": b"\r",
        "t": b"\t",
        "v": b"\v",
        "\\": b"\\",
        '"': b'"',
        "'": b"'",
        "s": b" ",
    }
    if c in simple:
        return simple[c], 1
    if c == "x":
        digits = s[i + 1 : i + 3]
        if len(digits) != 2 or not _is_hex(digits) or int(digits, 16) == 0:
            return None
        # \xHH is a raw byte, not a code point: "\xc3\xa9" spells "é".
        return bytes([int(digits, 16)]), 3
    if c in "uU":
        width = 4 if c == "u" else 8
        digits = s[i + 1 : i + 1 + width]
        if len(digits) != width or not _is_hex(digits):
            return None
        code = int(digits, 16)
        if code == 0:
            return None
        # Only \U checks the code point; systemd lets \u produce even a surrogate.
        if c == "U" and (code >= 0x110000 or not _utf8_clean(chr(code))):
            return None
        return chr(code).encode("utf-8", "surrogatepass"), 1 + width
    if c in "01234567":
        digits = s[i : i + 3]
        if len(digits) != 3 or any(d not in "01234567" for d in digits):
            return None
        value = int(digits, 8)
        if value == 0 or value > 255:
            return None
        return bytes([value]), 3
    return None


def _extract_word(
    s: str, pos: int, *, unquote: bool = True, cunescape: bool = True, relax: bool = False
) -> tuple[str | None, int]:
    """One word of ``s`` from ``pos``, as systemd's extract_first_word().

    Returns (word, position after the word and its trailing whitespace), or
    (None, len(s)) when only whitespace is left.  ``relax`` keeps unknown escapes
    verbatim (EXTRACT_CUNESCAPE_RELAX).  Raises _WordError on a bad escape or
    unbalanced quotes.
    """
    n = len(s)
    while pos < n and s[pos] in _WS:
        pos += 1
    if pos >= n:
        return None, n
    out = bytearray()
    quote = ""
    while pos < n:
        c = s[pos]
        if c == "\\":
            if pos + 1 >= n:
                # Trailing backslash: kept when relaxed, but never inside quotes.
                if relax and not quote:
                    out += b"\\"
                    pos = n
                    break
                raise _WordError
            if cunescape:
                decoded = _cunescape_one(s, pos + 1)
                if decoded is None:
                    if not relax:
                        raise _WordError
                    out += ("\\" + s[pos + 1]).encode("utf-8", "surrogateescape")
                    pos += 2
                else:
                    out += decoded[0]
                    pos += 1 + decoded[1]
            else:
                out += s[pos + 1].encode("utf-8", "surrogateescape")
                pos += 2
        elif quote:
            if c == quote:
                quote = ""
            else:
                out += c.encode("utf-8", "surrogateescape")
            pos += 1
        elif unquote and c in "'\"":
            quote = c
            pos += 1
        elif c in _WS:
            while pos < n and s[pos] in _WS:
                pos += 1
            break
        else:
            out += c.encode("utf-8", "surrogateescape")
            pos += 1
    if quote:
        raise _WordError
    return out.decode("utf-8", "surrogateescape"), pos


def _extract_word_and_warn(s: str, pos: int) -> tuple[str | None, int, bool]:
    """extract_first_word_and_warn(): retry a bad escape relaxed; (word, pos, relaxed)."""
    try:
        word, end = _extract_word(s, pos)
        return word, end, False
    except _WordError:
        pass
    try:
        word, end = _extract_word(s, pos, relax=True)
    except _WordError:
        raise _WordError("unbalanced quoting") from None
    return word, end, True


# ------------------------------------------------------------------------ Exec lines


@dataclass(frozen=True, slots=True)
class ExecCommand:
    """One command of an ``Exec*=`` line.

    ``path`` is the executable (absolute, or a bare name looked up in ``$PATH``);
    ``argv`` includes argv[0].  The flags mirror the line's prefixes: ``-``
    ignore_failure, ``@`` argv0_override, ``:`` no_env_expand, ``+``
    full_privileges, ``!`` no_setuid, ``!!`` ambient_magic.
    """

    path: str
    argv: tuple[str, ...]
    ignore_failure: bool = False
    argv0_override: bool = False
    no_env_expand: bool = False
    full_privileges: bool = False
    no_setuid: bool = False
    ambient_magic: bool = False

    @property
    def prefix(self) -> str:
        """The prefix characters that produce these flags, in a canonical order."""
        return (
            ("-" if self.ignore_failure else "")
            + ("@" if self.argv0_override else "")
            + (":" if self.no_env_expand else "")
            + ("+" if self.full_privileges else "")
            + ("!" if self.no_setuid else "")
            + ("!!" if self.ambient_magic else "")
        )


@dataclass(frozen=True, slots=True)
class _ExecIssue:
    reason: str
    fatal: bool


def _split_prefixes(word: str) -> tuple[dict[str, bool], str]:
    """Peel the Exec prefixes off ``word`` in the combinations systemd 252 accepts."""
    flags = dict.fromkeys(
        (
            "ignore_failure",
            "argv0_override",
            "no_env_expand",
            "full_privileges",
            "no_setuid",
            "ambient_magic",
        ),
        False,
    )
    i = 0
    while i < len(word):
        c = word[i]
        privileged = flags["full_privileges"] or flags["no_setuid"] or flags["ambient_magic"]
        if c == "-" and not flags["ignore_failure"]:
            flags["ignore_failure"] = True
        elif c == "@" and not flags["argv0_override"]:
            flags["argv0_override"] = True
        elif c == ":" and not flags["no_env_expand"]:
            flags["no_env_expand"] = True
        elif c == "+" and not privileged:
            flags["full_privileges"] = True
        elif c == "!" and not privileged:
            flags["no_setuid"] = True
        elif c == "!" and not (flags["full_privileges"] or flags["ambient_magic"]):
            # A second '!' turns "!" into "!!".
            flags["no_setuid"] = False
            flags["ambient_magic"] = True
        else:
            break
        i += 1
    return flags, word[i:]


def _parse_exec(
    value: str, expand: Callable[[str], str] | None
) -> tuple[list[ExecCommand], _ExecIssue | None]:
    """systemd's config_parse_exec() for a non-empty value.

    Returns the commands it would keep and the problem that stopped it, if any.
    A problem is fatal (the unit fails to load) unless the command has the ``-``
    prefix; a first word that cannot be split is only ever ignored.
    """
    expand = expand or (lambda text: text)
    commands: list[ExecCommand] = []
    pos, n = 0, len(value)
    while True:
        try:
            first, pos, _ = _extract_word_and_warn(value, pos)
        except _WordError as exc:
            return commands, _ExecIssue(str(exc), fatal=False)
        if first is None:
            return commands, None
        if first == ";":
            # A lone ';' (even quoted) as a command's first word just separates.
            continue
        flags, rest = _split_prefixes(first)
        # With the '-' prefix systemd skips a bad command instead of refusing the unit.
        fatal = not flags["ignore_failure"]
        try:
            path = expand(rest)
        except SpecifierError as exc:
            return commands, _ExecIssue(f"failed to resolve specifiers in {rest!r}: {exc}", fatal)
        if not path:
            return commands, _ExecIssue(f"empty executable path in {value!r}", fatal)
        if not _string_is_safe(path):
            return commands, _ExecIssue(
                f"executable path contains special characters: {path!r}", fatal
            )
        if path.endswith("/"):
            return commands, _ExecIssue(f"executable path is a directory: {path!r}", fatal)
        if not path.startswith("/") and not _filename_is_valid(path):
            return commands, _ExecIssue(f"relative executable path: {path!r}", fatal)
        argv: list[str] = [] if flags["argv0_override"] else [path]
        separated = False
        while pos < n:
            # An unquoted lone ';' ends this command and starts the next one.
            if value[pos] == ";" and (pos + 1 == n or value[pos + 1] in _WS):
                pos += 1
                while pos < n and value[pos] in _WS:
                    pos += 1
                separated = True
                break
            # A lone "\;" is a literal ';' argument; checked here because the word
            # splitter would turn "\\;" and "\;" into the same thing.
            if value.startswith("\\;", pos) and (pos + 2 == n or value[pos + 2] in _WS):
                pos += 2
                while pos < n and value[pos] in _WS:
                    pos += 1
                argv.append(";")
                continue
            try:
                word, pos, _ = _extract_word_and_warn(value, pos)
            except _WordError as exc:
                return commands, _ExecIssue(str(exc), fatal)
            if word is None:
                break
            try:
                argv.append(expand(word))
            except SpecifierError as exc:
                return commands, _ExecIssue(
                    f"failed to resolve specifiers in {word!r}: {exc}", fatal
                )
        if not argv:
            return commands, _ExecIssue(
                f"empty executable name or zeroeth argument in {value!r}", fatal
            )
        commands.append(ExecCommand(_path_simplify(path), tuple(argv), **flags))
        if not separated:
            return commands, None


def parse_exec(value: str, expand: Callable[[str], str] | None = None) -> list[ExecCommand]:
    """Parse one ``Exec*=`` value into its commands.

    ``expand`` resolves specifiers in each word after unquoting (see
    :meth:`Unit.expander`); without it words are taken literally.  Anything systemd
    would refuse or skip raises ValueError; an empty value gives ``[]``.
    """
    if not value:
        return []
    commands, problem = _parse_exec(value, expand)
    if problem is not None:
        raise ValueError(problem.reason)
    return commands


# ----------------------------------------------------------------------- Environment

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _parse_environment(
    value: str, expand: Callable[[str], str] | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """systemd's config_parse_environ(): the assignments it keeps, and what it skipped."""
    expand = expand or (lambda text: text)
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    pos = 0
    while True:
        try:
            # Not the warn-and-retry splitter: an unknown escape ends the line here.
            word, pos = _extract_word(value, pos)
        except _WordError:
            skipped.append(f"invalid syntax in {value!r}")
            return pairs, skipped
        if word is None:
            return pairs, skipped
        try:
            word = expand(word)
        except SpecifierError as exc:
            skipped.append(f"failed to resolve specifiers in {word!r}: {exc}")
            continue
        name, eq, val = word.partition("=")
        if not eq or not _ENV_NAME.match(name) or not _utf8_clean(val):
            skipped.append(f"invalid environment assignment: {word!r}")
            continue
        pairs.append((name, val))


def parse_environment(value: str, expand: Callable[[str], str] | None = None) -> dict[str, str]:
    """Parse one ``Environment=`` value (``A=1 "B=two words" 'C=x'``) into a dict.

    Raises ValueError where systemd would skip part of the line.
    """
    pairs, skipped = _parse_environment(value, expand)
    if skipped:
        raise ValueError(skipped[0])
    return dict(pairs)


# --------------------------------------------------------------------- unit parsing


@dataclass(frozen=True, slots=True)
class Option:
    """One ``Key=Value`` assignment with where it came from."""

    section: str
    key: str
    value: str
    source: str
    line: int


def _physical_lines(data: bytes) -> list[bytes]:
    lines = []
    pos = 0
    for m in _EOL.finditer(data):
        lines.append(data[pos : m.start()])
        pos = m.end()
    if pos < len(data):
        lines.append(data[pos:])
    return lines


def _trailing_escape(text: bytes) -> bool:
    # An odd run of trailing backslashes leaves the last one unescaped.
    return (len(text) - len(text.rstrip(b"\\"))) % 2 == 1


def _logical_lines(data: bytes, source: str) -> Iterator[tuple[int, bytes]]:
    """(line number, text) of each logical line, continuations joined, comments gone."""
    number = 0
    continuation: bytes | None = None
    bom_seen = False
    for raw in _physical_lines(data):
        number += 1
        if len(raw) >= LONG_LINE_MAX:
            raise UnitFileError(source, number, "line too long")
        text = raw
        if not bom_seen and text.startswith(_BOM):
            # systemd drops the BOM only after its comment check, and so takes a
            # BOM-prefixed first-line comment for an assignment outside any section
            # which it ignores; dropping it first has the same effect without the
            # spurious error.
            text = text[len(_BOM) :]
            bom_seen = True
        # Comments are recognised before anything else, so a comment line inside a
        # continuation is skipped rather than ending it.
        first = text.lstrip(_WS_B)[:1]
        if first and first in b"#;":
            continue
        if continuation is not None:
            text = continuation + text
            if len(text) > LONG_LINE_MAX:
                raise UnitFileError(source, number, "continuation line too long")
        if _trailing_escape(text):
            # The backslash becomes a space and the next line is appended unstripped.
            continuation = text[:-1] + b" "
            continue
        continuation = None
        yield number, text
    if continuation is not None:
        # systemd parses a continuation left open at the end of the file as one
        # line past the last.
        yield number + 1, continuation


def _parse_options(data: bytes, source: str) -> tuple[list[Option], list[str]]:
    options: list[Option] = []
    sections: list[str] = []
    section: str | None = None
    for number, raw in _logical_lines(data, source):
        stripped = raw.strip(_WS_B)
        if not stripped:
            continue
        try:
            line = stripped.decode("utf-8")
        except UnicodeDecodeError:
            line = ""
        if not line or not _utf8_clean(line):
            raise UnitFileError(source, number, "line is not valid UTF-8")
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 2:
                raise UnitFileError(source, number, f"invalid section header {line!r}")
            name = line[1:-1]
            if not name:
                raise UnitFileError(source, number, "empty section name")
            if not _string_is_safe(name):
                raise UnitFileError(source, number, f"bad characters in section header {line!r}")
            section = name
            if name not in sections:
                sections.append(name)
            continue
        if section is None:
            raise UnitFileError(source, number, "assignment outside of a section")
        key, eq, value = line.partition("=")
        if not eq:
            raise UnitFileError(source, number, f"missing '=' in {line!r}")
        key = key.strip(_WS)
        if not key:
            raise UnitFileError(source, number, "missing key name before '='")
        options.append(Option(section, key, value.strip(_WS), source, number))
    return options, sections


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)


def _check_name(name: str | None) -> None:
    if name is not None:
        UnitName.parse(name)


def parse_unit(
    data: bytes | str,
    name: str | None = None,
    *,
    source: str | None = None,
    path: str | None = None,
) -> Unit:
    """Parse unit file text.

    ``name`` is the unit's name (for specifiers and the unit type), ``path`` its
    file (for ``%y``), ``source`` the label used in error messages (default: the
    path, else the name).  Raises :class:`UnitFileError` for a malformed file.
    """
    _check_name(name)
    raw = _as_bytes(data)
    label = source or path or name or "<unit>"
    options, sections = _parse_options(raw, label)
    return Unit(
        name=name,
        source=label,
        path=path,
        raw=raw,
        options=tuple(options),
        sections=tuple(sections),
    )


def parse_unit_file(path: str | os.PathLike[str], name: str | None = None) -> Unit:
    """Read and parse one unit file; ``name`` defaults to the file name if it is a unit name."""
    p = Path(path)
    if name is None:
        try:
            name = UnitName.parse(p.name).name
        except ValueError:
            name = None
    return parse_unit(p.read_bytes(), name, path=str(p))


# ----------------------------------------------------------------------------- Unit


@dataclass(frozen=True)
class FleetOptions:
    """The ``[X-Fleet]`` scheduling options of a unit, specifiers expanded."""

    machine_id: str | None = None
    machine_of: tuple[str, ...] = ()
    # key -> acceptable values (any of them); every key must match.
    machine_metadata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    is_global: bool = False

    def metadata_matches(self, metadata: Mapping[str, str]) -> bool:
        """True if a machine with ``metadata`` satisfies every MachineMetadata key."""
        return all(metadata.get(k) in values for k, values in self.machine_metadata.items())

    def conflicts_with(self, unit_name: str) -> bool:
        """True if ``unit_name`` matches one of the Conflicts globs."""
        return any(fnmatch.fnmatchcase(unit_name, pattern) for pattern in self.conflicts)


# [X-Fleet] keys, with the older spellings fleet still accepted.
_FLEET_KEYS = {
    "MachineID": "machine_id",
    "X-ConditionMachineID": "machine_id",
    "MachineOf": "machine_of",
    "X-ConditionMachineOf": "machine_of",
    "MachineMetadata": "machine_metadata",
    "X-ConditionMachineMetadata": "machine_metadata",
    "Conflicts": "conflicts",
    "X-Conflicts": "conflicts",
    "Replaces": "replaces",
    "Global": "global",
}


@dataclass(frozen=True)
class Unit:
    """A parsed unit file, possibly with drop-ins merged in.

    ``options`` keeps every assignment in file order (fragment first, then the
    drop-ins in the order they apply); ``sections`` lists section names in order
    of first appearance; ``raw`` is the fragment's exact bytes.
    """

    name: str | None
    source: str
    path: str | None
    raw: bytes
    options: tuple[Option, ...]
    sections: tuple[str, ...]
    dropins: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        """SHA-1 hex of the fragment's exact bytes."""
        return content_hash(self.raw)

    @property
    def unit_name(self) -> UnitName | None:
        """The parsed unit name, if the unit has one."""
        return UnitName.parse(self.name) if self.name is not None else None

    @property
    def type(self) -> str | None:
        """The unit type from the name (``service``, ``socket``, ...), if named."""
        unit = self.unit_name
        return unit.type if unit is not None else None

    def effective(self, section: str, key: str) -> list[Option]:
        """The assignments of ``key`` that count, after empty-value resets."""
        resets = key in RESET_ON_EMPTY
        result: list[Option] = []
        for opt in self.options:
            if opt.key == key and opt.section == section:
                if resets and opt.value == "":
                    result.clear()
                else:
                    result.append(opt)
        return result

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        """The last value of ``key`` (systemd's rule for single-valued keys)."""
        opts = self.effective(section, key)
        return opts[-1].value if opts else default

    def get_all(self, section: str, key: str) -> list[str]:
        """Every value of ``key`` in order, after resets; empty values add nothing."""
        return [opt.value for opt in self.effective(section, key) if opt.value]

    def expander(self, context: SpecifierContext | None = None) -> Callable[[str], str]:
        """A function expanding specifiers for this unit (see :func:`expand_specifiers`)."""
        unit = self.unit_name

        def expand(text: str) -> str:
            return expand_specifiers(text, unit, context, path=self.path)

        return expand

    def _exec_section(self) -> str:
        return "Socket" if self.type == "socket" else "Service"

    def exec_commands(
        self,
        key: str,
        context: SpecifierContext | None = None,
        *,
        section: str | None = None,
        expand: bool = True,
    ) -> list[ExecCommand]:
        """The commands of ``key`` (``ExecStart``, ...), resets applied.

        Specifiers are expanded with ``context`` (see :func:`expand_specifiers`)
        unless ``expand`` is false.  A line systemd would refuse or skip raises
        :class:`UnitFileError` naming that line.
        """
        expander = self.expander(context) if expand else None
        commands: list[ExecCommand] = []
        for opt in self.effective(section or self._exec_section(), key):
            try:
                commands.extend(parse_exec(opt.value, expander))
            except ValueError as exc:
                raise UnitFileError(opt.source, opt.line, f"{key}=: {exc}") from exc
        return commands

    def environment(
        self,
        context: SpecifierContext | None = None,
        *,
        section: str | None = None,
    ) -> dict[str, str]:
        """The ``Environment=`` variables, later assignments replacing earlier ones."""
        expander = self.expander(context)
        env: dict[str, str] = {}
        for opt in self.effective(section or self._exec_section(), "Environment"):
            try:
                env.update(parse_environment(opt.value, expander))
            except ValueError as exc:
                raise UnitFileError(opt.source, opt.line, f"Environment=: {exc}") from exc
        return env

    def fleet_options(self) -> FleetOptions:
        """The ``[X-Fleet]`` options, with name specifiers (``%n``, ``%i``, ...) expanded.

        Unknown keys are ignored, as fleet does (:meth:`fleet_warnings` reports them);
        unresolvable specifiers, metadata that is not ``key=value`` and a ``Global=``
        that is not a boolean raise :class:`UnitFileError`.
        """
        unit = self.unit_name
        machine_id: str | None = None
        lists: dict[str, list[str]] = {"machine_of": [], "conflicts": [], "replaces": []}
        metadata: dict[str, list[str]] = {}
        is_global = False
        for opt in self.options:
            if opt.section != "X-Fleet":
                continue
            kind = _FLEET_KEYS.get(opt.key)
            if kind is None:
                # fleet only warns about these (see fleet_warnings()) and schedules anyway.
                continue
            try:
                words = _fleet_words(opt.value, unit, self.path)
            except (SpecifierError, _WordError) as exc:
                raise UnitFileError(opt.source, opt.line, f"{opt.key}=: {exc}") from exc
            if not words:
                continue
            if kind == "machine_id":
                machine_id = words[-1]
            elif kind == "global":
                flag = _parse_boolean(words[0]) if len(words) == 1 else None
                if flag is None:
                    raise UnitFileError(
                        opt.source, opt.line, f"Global=: not a boolean: {opt.value!r}"
                    )
                is_global = flag
            elif kind == "machine_metadata":
                for word in words:
                    mkey, eq, mval = word.partition("=")
                    if not eq or not mkey or not mval or "=" in mval:
                        raise UnitFileError(
                            opt.source,
                            opt.line,
                            f"{opt.key}=: expected key=value, got {word!r}",
                        )
                    values = metadata.setdefault(mkey, [])
                    if mval not in values:
                        values.append(mval)
            else:
                lists[kind].extend(words)
        return FleetOptions(
            machine_id=machine_id,
            machine_of=tuple(lists["machine_of"]),
            machine_metadata={k: tuple(v) for k, v in metadata.items()},
            conflicts=tuple(lists["conflicts"]),
            replaces=tuple(lists["replaces"]),
            is_global=is_global,
        )

    def fleet_warnings(self) -> list[str]:
        """``file:line: ...`` warnings for the ``[X-Fleet]`` keys fleet ignores, in file order.

        Each names the unknown key and, when one is close enough, the valid key it was
        probably meant to be.
        """
        return [
            unknown_fleet_key_warning(opt)
            for opt in self.options
            if opt.section == "X-Fleet" and opt.key not in _FLEET_KEYS
        ]

    def serialize(self) -> str:
        """Canonical text: sections in order of first appearance, ``Key=Value`` lines.

        Comments, blank lines and continuations are gone, repeated sections are
        merged (order within a key is kept, so resets still mean the same).
        """
        blocks = []
        for section in self.sections:
            lines = [f"[{section}]"]
            lines.extend(f"{opt.key}={opt.value}" for opt in self.options if opt.section == section)
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)


def nearest_fleet_key(key: str) -> str | None:
    """The valid ``[X-Fleet]`` key closest to ``key``, or None if none is close.

    A key differing only in case maps to that key; otherwise the most similar
    current spelling (never a deprecated ``X-...`` one), ignoring case, is suggested.
    """
    lowered = key.lower()
    for valid in _FLEET_KEYS:
        if valid.lower() == lowered:
            return valid
    best: str | None = None
    best_score = 0.6  # difflib.get_close_matches' default cutoff
    for valid in _FLEET_KEYS:
        if valid.startswith("X-"):
            continue
        score = difflib.SequenceMatcher(None, lowered, valid.lower()).ratio()
        if score > best_score:  # ties go to the key listed first
            best, best_score = valid, score
    return best


def unknown_fleet_key_warning(opt: Option) -> str:
    """The warning for an ``[X-Fleet]`` assignment with an unknown key."""
    message = f"{opt.source}:{opt.line}: unknown [X-Fleet] option {opt.key!r}, ignoring it"
    suggestion = nearest_fleet_key(opt.key)
    if suggestion is not None:
        message += f" (did you mean {suggestion!r}?)"
    return message


def _fleet_words(value: str, unit: UnitName | None, path: str | None) -> list[str]:
    words = []
    pos = 0
    while True:
        try:
            word, pos = _extract_word(value, pos, cunescape=False)
        except _WordError:
            raise _WordError("unbalanced quoting") from None
        if word is None:
            return words
        words.append(expand_specifiers(word, unit, None, path=path))


# -------------------------------------------------------------------------- drop-ins


def dropin_dirs(name: str) -> list[str]:
    """Drop-in directory names for unit ``name``, most specific first.

    For ``foo-bar@x.service``: ``foo-bar@x.service.d``, ``foo-bar@.service.d``,
    ``foo-.service.d``, ``foo-@x.service.d``, ``foo-@.service.d`` and last
    ``service.d``.  systemd looks at all but the last in every search path before
    it looks at the type-wide one (the last) in any.
    """
    dirs: list[str] = []
    _collect_dropin_dirs(UnitName.parse(name), dirs)
    dirs.append(UnitName.parse(name).type + ".d")
    return dirs


def _collect_dropin_dirs(unit: UnitName, dirs: list[str]) -> None:
    if unit.name + ".d" not in dirs:
        dirs.append(unit.name + ".d")
    if unit.is_instance:
        _collect_dropin_dirs(UnitName.parse(unit.template or ""), dirs)
    # "foo-bar-baz" also reads "foo-bar-" and "foo-" (more specific ones first).
    prefix = unit.prefix
    chopped = False
    while True:
        dash = prefix.rfind("-")
        if dash <= 0:
            return
        if dash + 1 < len(prefix) or chopped:
            prefix = prefix[: dash + 1]
            break
        # A trailing dash is chopped off once and the search goes on.
        prefix = prefix[:dash]
        chopped = True
    instance = f"@{unit.instance}" if unit.is_instance else ""
    try:
        parent = UnitName.parse(f"{prefix}{instance}.{unit.type}")
    except ValueError:
        return
    _collect_dropin_dirs(parent, dirs)


def merge_dropins(unit: Unit, directories: Sequence[tuple[str, Mapping[str, bytes | str]]]) -> Unit:
    """Apply drop-ins to ``unit``.

    ``directories`` lists ``(directory, {file name: content})`` pairs in precedence
    order.  Only ``*.conf`` files that are not hidden count; of several files with
    one name the first listed wins (so an empty one masks the rest); the winners
    apply in lexicographic order of file name, whatever their directory.
    """
    chosen: dict[str, tuple[str, bytes | str]] = {}
    for directory, files in directories:
        for fname, content in files.items():
            if fname.startswith(".") or not fname.endswith(".conf") or fname in chosen:
                continue
            chosen[fname] = (directory, content)
    options = list(unit.options)
    sections = list(unit.sections)
    sources = list(unit.dropins)
    for fname in sorted(chosen, key=lambda s: s.encode("utf-8", "surrogateescape")):
        directory, content = chosen[fname]
        source = f"{directory}/{fname}"
        opts, secs = _parse_options(_as_bytes(content), source)
        options.extend(opts)
        sections.extend(s for s in secs if s not in sections)
        sources.append(source)
    return Unit(
        name=unit.name,
        source=unit.source,
        path=unit.path,
        raw=unit.raw,
        options=tuple(options),
        sections=tuple(sections),
        dropins=tuple(sources),
    )


def _read_dropin_dir(directory: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return files
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(".conf"):
            continue
        if entry.is_dir():
            continue
        try:
            # A symlink to /dev/null reads as empty, which masks like systemd does.
            files[entry.name] = entry.read_bytes()
        except OSError:
            continue
    return files


def load_unit(name: str, search_paths: Sequence[str | os.PathLike[str]]) -> Unit:
    """Load unit ``name`` with its drop-ins from ``search_paths`` (highest priority first).

    The fragment is the first ``<dir>/<name>``; an instance without one falls back
    to its template.  Raises FileNotFoundError when neither exists.
    """
    unit_name = UnitName.parse(name)
    paths = [Path(p) for p in search_paths]
    candidates = [name] + ([unit_name.template] if unit_name.is_instance else [])
    fragment: Path | None = None
    for candidate in candidates:
        for base in paths:
            p = base / candidate
            if p.exists() and not p.is_dir():
                fragment = p
                break
        if fragment is not None:
            break
    if fragment is None:
        raise FileNotFoundError(f"unit {name} not found in {', '.join(map(str, paths))}")
    unit = parse_unit(fragment.read_bytes(), name, path=str(fragment))
    dirs = dropin_dirs(name)
    specific, generic = dirs[:-1], dirs[-1]
    listing = [(str(base / d), _read_dropin_dir(base / d)) for base in paths for d in specific]
    listing += [(str(base / generic), _read_dropin_dir(base / generic)) for base in paths]
    return merge_dropins(unit, [(d, files) for d, files in listing if files])


# ------------------------------------------------------------------------ validation

_SERVICE_TYPES = frozenset({"simple", "exec", "forking", "oneshot", "dbus", "notify", "idle"})
_RESTART_VALUES = frozenset(
    {"no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always"}
)
_EMERGENCY_ACTIONS = frozenset(
    {
        "none",
        "reboot",
        "reboot-force",
        "reboot-immediate",
        "poweroff",
        "poweroff-force",
        "poweroff-immediate",
        "exit",
        "exit-force",
        "kexec",
        "kexec-force",
        "halt",
        "halt-force",
        "halt-immediate",
    }
)
_EXEC_CONTEXT_SECTIONS = ("Service", "Socket", "Mount", "Swap")

# Neutral host values for validation, so that a unit using %H or %m is judged by
# its structure rather than by the machine doing the checking.
_PLACEHOLDER_CONTEXT = SpecifierContext(
    hostname="localhost",
    machine_id="0" * 32,
    boot_id="0" * 32,
    pretty_hostname="localhost",
    kernel_release="0",
    architecture="x86-64",
    os_release={},
    shell="/bin/sh",
)


def _last_valid(
    unit: Unit, section: str, key: str, valid: Callable[[str], bool], problems: list[Problem]
) -> Option | None:
    """The last assignment systemd would accept; rejected ones are noted and skipped."""
    last = None
    for opt in unit.effective(section, key):
        if valid(opt.value):
            last = opt
        else:
            problems.append(
                Problem(
                    opt.source, opt.line, f"invalid {key}= value {opt.value!r}, ignoring", False
                )
            )
    return last


def _check_exec(
    unit: Unit, utype: str, expand: Callable[[str], str], problems: list[Problem]
) -> dict[str, list[tuple[ExecCommand, Option]]]:
    """Every Exec*= line as config_parse_exec() sees it, resets included."""
    lists: dict[str, list[tuple[ExecCommand, Option]]] = {}
    keys, section = (
        (_SOCKET_EXEC_KEYS, "Socket") if utype == "socket" else (_SERVICE_EXEC_KEYS, "Service")
    )
    for opt in unit.options:
        if opt.section != section or opt.key not in keys:
            continue
        commands = lists.setdefault(opt.key, [])
        if not opt.value:
            commands.clear()
            continue
        parsed, issue = _parse_exec(opt.value, expand)
        commands.extend((cmd, opt) for cmd in parsed)
        if issue is not None:
            message = f"{opt.key}=: {issue.reason}" + ("" if issue.fatal else ", ignoring")
            problems.append(Problem(opt.source, opt.line, message, issue.fatal))
    return lists


def _check_paths(unit: Unit, expand: Callable[[str], str], problems: list[Problem]) -> None:
    for opt in unit.options:
        if opt.section not in _EXEC_CONTEXT_SECTIONS or not opt.value:
            continue
        if opt.key == "WorkingDirectory":
            value = opt.value
            # A '-' prefix makes a bad WorkingDirectory= a warning instead.
            fatal = not value.startswith("-")
            value = value if fatal else value[1:]
            if value == "~":
                continue
        elif opt.key in ("RootDirectory", "RootImage"):
            value, fatal = opt.value, True
        else:
            continue
        try:
            path = expand(value)
        except SpecifierError as exc:
            problems.append(Problem(opt.source, opt.line, f"{opt.key}=: {exc}", fatal))
            continue
        if not path.startswith("/"):
            reason = "path is not absolute"
        elif not _path_is_normalized(_path_simplify(path)):
            reason = "path is not normalized"
        else:
            continue
        message = f"{opt.key}=: {reason}: {path!r}" + ("" if fatal else ", ignoring")
        problems.append(Problem(opt.source, opt.line, message, fatal))


def _check_environment(unit: Unit, expand: Callable[[str], str], problems: list[Problem]) -> None:
    for opt in unit.options:
        if opt.section in _EXEC_CONTEXT_SECTIONS and opt.key == "Environment" and opt.value:
            for reason in _parse_environment(opt.value, expand)[1]:
                problems.append(Problem(opt.source, opt.line, f"Environment=: {reason}", False))


def _check_service(
    unit: Unit, execs: Mapping[str, list[tuple[ExecCommand, Option]]], problems: list[Problem]
) -> None:
    """systemd 252's service_verify(); like systemd, stop at the first refusal."""
    start = execs.get("ExecStart", [])
    stop = execs.get("ExecStop", [])
    type_opt = _last_valid(unit, "Service", "Type", _SERVICE_TYPES.__contains__, problems)
    restart_opt = _last_valid(unit, "Service", "Restart", _RESTART_VALUES.__contains__, problems)
    remain_opt = _last_valid(
        unit, "Service", "RemainAfterExit", lambda v: _parse_boolean(v) is not None, problems
    )
    exit_opt = _last_valid(unit, "Service", "ExitType", {"main", "cgroup"}.__contains__, problems)
    action_opt = _last_valid(
        unit, "Unit", "SuccessAction", _EMERGENCY_ACTIONS.__contains__, problems
    )
    bus_name = unit.get("Service", "BusName")
    force_status = unit.effective("Service", "RestartForceExitStatus")

    if type_opt is not None:
        stype = type_opt.value
    elif bus_name:
        stype = "dbus"
    else:
        # With neither Type= nor BusName=, systemd picks simple, or oneshot when
        # there is no ExecStart= at all.
        stype = "simple" if start else "oneshot"
    success_action = action_opt is not None and action_opt.value != "none"
    remain = remain_opt is not None and bool(_parse_boolean(remain_opt.value))
    restart = restart_opt.value if restart_opt is not None else "no"
    src = unit.source

    def refuse(line_opt: Option | None, message: str) -> None:
        if line_opt is None:
            problems.append(Problem(src, None, message))
        else:
            problems.append(Problem(line_opt.source, line_opt.line, message))

    if not start and not stop and not success_action:
        refuse(None, "service has no ExecStart=, ExecStop=, or SuccessAction=")
    elif stype != "oneshot" and not start:
        refuse(type_opt, "service has no ExecStart=, which only Type=oneshot allows")
    elif not remain and not start and not success_action:
        refuse(None, "service has no ExecStart=, no SuccessAction= and no RemainAfterExit=yes")
    elif stype != "oneshot" and len(start) > 1:
        refuse(start[1][1], "more than one ExecStart= command, which only Type=oneshot allows")
    elif stype == "oneshot" and restart in ("always", "on-success"):
        refuse(restart_opt, f"Restart={restart} is not allowed with Type=oneshot")
    elif stype == "oneshot" and force_status:
        refuse(force_status[-1], "RestartForceExitStatus= is not allowed with Type=oneshot")
    elif stype == "oneshot" and exit_opt is not None and exit_opt.value == "cgroup":
        refuse(exit_opt, "ExitType=cgroup is not allowed with Type=oneshot")
    elif stype == "dbus" and not bus_name:
        refuse(type_opt, "Type=dbus needs BusName=")


def validate(unit: Unit, context: SpecifierContext | None = None) -> list[Problem]:
    """What systemd 252 would say when loading ``unit``, in file order.

    Problems with ``fatal`` set make systemd refuse the unit (LoadState=bad-setting);
    the others are settings it would skip with a warning.  Specifiers resolve with
    ``context``, or with neutral placeholder host values.
    """
    problems: list[Problem] = []
    if not unit.raw and not unit.dropins:
        return [Problem(unit.source, None, "unit file is empty, systemd treats it as masked")]
    ctx = context or _PLACEHOLDER_CONTEXT
    utype = unit.type or ("socket" if "Socket" in unit.sections else "service")
    name = unit.unit_name or UnitName.parse(f"unit.{utype}")
    path = unit.path or f"/etc/systemd/system/{name.name}"

    def expand(text: str) -> str:
        return _expand(text, name, ctx, path, lenient=True)

    execs = _check_exec(unit, utype, expand, problems)
    _check_paths(unit, expand, problems)
    _check_environment(unit, expand, problems)
    # systemd stops at the first setting it cannot take, so the service-wide checks
    # only happen for a unit whose settings all parsed.
    if utype == "service" and not any(p.fatal for p in problems):
        _check_service(unit, execs, problems)
    # File order: the fragment, then drop-ins as applied; unit-wide problems last.
    rank = {src: i for i, src in enumerate((unit.source, *unit.dropins))}
    problems.sort(key=lambda p: (p.line is None, rank.get(p.source, 0), p.line or 0))
    return problems
