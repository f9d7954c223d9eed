"""Request parsing that behaves like Go's net/http and strconv, which etcd relies on.

Clients depend on the details: body parameters win over the query string, "t" and "1"
are true, "+5" is not a number, a bad %-escape is etcd error 210 with Go's message.
"""

from __future__ import annotations

import re
from urllib.parse import quote

_HEX = b"0123456789abcdefABCDEF"
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DIGITS = re.compile(r"[0-9]+")
_UINT64_MAX = 2**64 - 1

Form = dict[str, list[str]]


class FormError(ValueError):
    """A malformed query string, form body or path; the message is Go's."""


def _go_quote(raw: bytes) -> str:
    """Go's strconv.Quote, enough for the few bytes of a bad escape."""
    out = []
    for byte in raw:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def unescape(raw: bytes, plus_is_space: bool) -> str:
    """Decode %XX escapes (and '+' in query mode) like Go's url.QueryUnescape/PathUnescape.

    Bytes that are not UTF-8 are kept as lone surrogates ("surrogateescape"), so keys and
    values stay byte-exact like etcd's; JSON output shows them as U+FFFD escapes, as Go does.
    """
    if b"%" not in raw and not (plus_is_space and b"+" in raw):
        return raw.decode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x25:  # %
            if i + 2 >= n or raw[i + 1] not in _HEX or raw[i + 2] not in _HEX:
                raise FormError(f"invalid URL escape {_go_quote(raw[i : i + 3])}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(0x20 if byte == 0x2B and plus_is_space else byte)
        i += 1
    return out.decode("utf-8", "surrogateescape")


def parse_query(raw: bytes, form: Form | None = None) -> tuple[Form, str | None]:
    """Parse ``a=1&b=2`` into ``form`` (appending); returns it and Go's first error.

    Like Go's url.ParseQuery, a bad pair is skipped and parsing goes on.
    """
    if form is None:
        form = {}
    error: str | None = None
    for pair in raw.split(b"&"):
        if b";" in pair:
            error = error or "invalid semicolon separator in query"
            continue
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k = unescape(key, True)
            v = unescape(value, True)
        except FormError as exc:
            error = error or str(exc)
            continue
        form.setdefault(k, []).append(v)
    return form, error


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}")


def parse_uint(text: str) -> int:
    """Go's strconv.ParseUint(text, 10, 64): digits only, no sign, at most 2**64-1."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"invalid unsigned integer {text!r}")
    value = int(text)
    if value > _UINT64_MAX:
        raise ValueError(f"{text!r} out of range")
    return value


def clean_url_path(path: str) -> str:
    """Go's ServeMux cleanPath: collapse //, . and .., keeping a trailing slash."""
    if path.startswith("/") and "//" not in path and "/." not in path:
        return path  # clean already (the usual case)
    if not path:
        return "/"
    if path[0] != "/":
        path = "/" + path
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    cleaned = "/" + "/".join(parts)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def escape_path(path: str) -> str:
    """Go's URL path escaping (url.URL.EscapedPath for a plain path)."""
    return quote(path, safe="/$&+,:;=@", errors="surrogateescape")


def html_escape(text: str) -> str:
    """Go's html escaping as used in redirect bodies."""
    return (
        text.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
    )
