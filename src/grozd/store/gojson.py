"""Byte-exact pieces of Go's output that etcd clients see: JSON strings, times, paths.

etcd encodes with Go's encoding/json, which escapes ``<``, ``>`` and ``&`` (and U+2028/9)
where Python's json module does not, and writes times as RFC 3339 with trimmed
nanoseconds. Answers built here match etcd's byte for byte, so caches, signatures and
tests that compare bodies keep working.
"""

from __future__ import annotations

import json
import re
import time

_NEEDS_ESCAPE = re.compile('[\\x00-\\x1f"\\\\<>&\u2028\u2029\ud800-\udfff]')

_ESCAPES: dict[str, str] = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
for _code in range(0x20):
    _ESCAPES.setdefault(chr(_code), f"\\u{_code:04x}")
for _char in "<>&\u2028\u2029":
    _ESCAPES[_char] = f"\\u{ord(_char):04x}"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    # A lone surrogate is what invalid UTF-8 becomes; Go writes U+FFFD for those bytes.
    return _ESCAPES.get(char, "\\ufffd")


def go_string(text: str) -> str:
    """``text`` as a JSON string literal exactly as Go's encoding/json writes it."""
    if _NEEDS_ESCAPE.search(text) is None:
        return f'"{text}"'
    return f'"{_NEEDS_ESCAPE.sub(_escape, text)}"'


def rfc3339nano(unix_ns: int) -> str:
    """A UTC time as Go's ``time.RFC3339Nano`` prints it (trailing zeros trimmed)."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        stamp += "." + f"{nanos:09d}".rstrip("0")
    return stamp + "Z"


def ttl_seconds(expire_ns: int, now_ns: int) -> int:
    """Seconds left, rounded up like etcd: ceil for time left, Go's truncation when past."""
    left = expire_ns - now_ns
    # Go's integer division truncates toward zero and its remainder takes the dividend's
    # sign, so an overdue key shows 0 (omitted) or a negative count, never rounded down.
    quotient = abs(left) // 1_000_000_000
    remainder = abs(left) % 1_000_000_000
    if left < 0:
        return -quotient
    return quotient + (1 if remainder else 0)


def clean_path(path: str) -> str:
    """Go's ``path.Clean(path.Join("/", path))``: the canonical absolute form of a key."""
    if (path.startswith("/") and "//" not in path and "/." not in path
            and (path == "/" or not path.endswith("/"))):
        return path  # clean already (the usual case)
    out: list[str] = []
    for part in path.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return "/" + "/".join(out)


_GO_ONLY = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_PY_ESCAPE = re.compile(r"\\(.)")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _go_escape(match: re.Match[str]) -> str:
    char = match.group(1)
    # Python writes \b and \f; Go writes every control character but \n \r \t as \u00XX.
    if char == "b":
        return "\\u0008"
    if char == "f":
        return "\\u000c"
    return match.group()


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def go_dumps(obj: object) -> str:
    """Compact JSON of plain data (dicts, lists, str, int, bool) as Go would write it.

    Python's C encoder does the work; the few escapes where Go differs are fixed after.
    ``<``, ``>``, ``&`` and U+2028/9 only ever occur inside strings, so replacing them is
    safe; backslash escapes are re-read left to right so ``\\\\b`` stays as it is.
    """
    text = _ENCODER.encode(obj)
    if text.isascii() and not (
        "<" in text or ">" in text or "&" in text or "\\b" in text or "\\f" in text
    ):
        return text  # the common case, found with a few fast scans
    for char, escaped in _GO_ONLY.items():
        if char in text:
            text = text.replace(char, escaped)
    if "\\b" in text or "\\f" in text:
        text = _PY_ESCAPE.sub(_go_escape, text)
    if _SURROGATE.search(text) is not None:
        # Invalid UTF-8 carried as lone surrogates: Go writes one U+FFFD escape per byte.
        text = _SURROGATE.sub("\\\\ufffd", text)
    return text
