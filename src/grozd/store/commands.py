"""Commands for the keyspace state machine: what a leader proposes and every member applies.

A command is a small msgpack map. It carries everything `Store.apply` needs, including
the time (``now``, stamped by the proposing leader): the store never reads a clock, so
every member computes the same expirations and TTLs from the same log.

`encode_command` builds one operation explicitly; `request_command` maps an HTTP keys
request (method + etcd's parameters) to the operation etcd's own server would run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

SET = "set"
CREATE = "create"
UPDATE = "update"
COMPARE_AND_SWAP = "compareAndSwap"
DELETE = "delete"
COMPARE_AND_DELETE = "compareAndDelete"
EXPIRE = "expire"

OPS = frozenset({SET, CREATE, UPDATE, COMPARE_AND_SWAP, DELETE, COMPARE_AND_DELETE, EXPIRE})

# The parameters each operation accepts (besides ``key`` and ``now``).
_PARAMS: dict[str, frozenset[str]] = {
    SET: frozenset({"value", "dir", "ttl", "refresh"}),
    CREATE: frozenset({"value", "dir", "ttl", "unique"}),
    UPDATE: frozenset({"value", "ttl", "refresh"}),
    COMPARE_AND_SWAP: frozenset({"value", "ttl", "refresh", "prev_value", "prev_index"}),
    DELETE: frozenset({"dir", "recursive"}),
    COMPARE_AND_DELETE: frozenset({"prev_value", "prev_index"}),
    EXPIRE: frozenset(),
}

# Short wire names keep the replicated log small.
_WIRE = {
    "value": "v",
    "dir": "d",
    "ttl": "t",
    "refresh": "r",
    "prev_value": "pv",
    "prev_index": "pi",
    "recursive": "rc",
    "unique": "u",
}
_FROM_WIRE = {wire: name for name, wire in _WIRE.items()}

# A TTL whose expiry would not fit in a signed 64-bit nanosecond clock is refused (etcd
# would overflow silently); about 292 years.
MAX_TTL = (2**63 - 1) // 1_000_000_000 // 2


# Keys and values are bytes in etcd, not always UTF-8. Invalid bytes ride along as lone
# surrogates (Python's "surrogateescape"), compare byte for byte, and are shown as U+FFFD
# escapes in JSON, exactly as Go shows them.
UNICODE_ERRORS = "surrogateescape"


class CommandError(ValueError):
    """A command that cannot be encoded or decoded (a programming error, not a user one)."""


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded command."""

    op: str
    key: str
    now_ns: int
    value: str = ""
    dir: bool = False
    ttl: int | None = None
    refresh: bool = False
    prev_value: str = ""
    prev_index: int = 0
    recursive: bool = False
    unique: bool = False


def to_ns(seconds: float | int) -> int:
    """Seconds since the epoch (as from ``time.time()``) to integer nanoseconds."""
    if isinstance(seconds, int):
        return seconds * 1_000_000_000
    # Whole and fractional parts separately: their product would lose the nanoseconds.
    whole = math.floor(seconds)
    return whole * 1_000_000_000 + round((seconds - whole) * 1_000_000_000)


def encode_command(op: str, key: str = "/", *, now: float, **params: Any) -> bytes:
    """Build the bytes of one command.

    ``op`` is an etcd action name: set, create, update, compareAndSwap, delete,
    compareAndDelete or expire. ``now`` is the proposer's wall clock in seconds (float, as
    from ``time.time()``). ``params`` by op: value, dir, ttl (whole seconds, None for no
    TTL), refresh, prev_value, prev_index, recursive, unique (create an in-order key
    under ``key``).
    """
    if op not in OPS:
        raise CommandError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    unknown = set(params) - _PARAMS[op]
    if unknown:
        raise CommandError(f"{op} does not take {sorted(unknown)}")
    if not isinstance(key, str):
        raise CommandError(f"key must be a str, got {type(key).__name__}")
    wire: dict[str, Any] = {"o": op, "n": to_ns(now)}
    if op != EXPIRE:
        wire["k"] = key
    for name, value in params.items():
        if value is None or value is False or value == "" or (name == "prev_index" and not value):
            continue  # defaults are left out
        if name == "ttl":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CommandError(f"ttl must be a whole number of seconds >= 0, got {value!r}")
            if value > MAX_TTL:
                raise CommandError(f"ttl {value} is too large (max {MAX_TTL})")
        wire[_WIRE[name]] = value
    return msgpack.packb(wire, use_bin_type=True, unicode_errors=UNICODE_ERRORS)


def decode_command(data: bytes) -> Command:
    """Parse command bytes (raises `CommandError` when they are not a command)."""
    try:
        wire = msgpack.unpackb(data, raw=False, unicode_errors=UNICODE_ERRORS)
        fields = {_FROM_WIRE[k]: v for k, v in wire.items() if k in _FROM_WIRE}
        command = Command(op=wire["o"], key=wire.get("k", "/"), now_ns=int(wire["n"]), **fields)
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
        raise CommandError(f"not a store command: {exc}") from exc
    if command.op not in OPS:
        raise CommandError(f"unknown op {command.op!r}")
    return command


def request_command(
    method: str,
    key: str,
    *,
    now: float,
    value: str = "",
    dir: bool = False,
    ttl: int | None = None,
    refresh: bool = False,
    prev_value: str = "",
    prev_index: int = 0,
    prev_exist: bool | None = None,
    recursive: bool = False,
) -> bytes:
    """The command for a keys-API write (PUT, POST or DELETE), chosen as etcd 3.4 does.

    POST creates an in-order key; PUT with prevExist=true updates (or compares and swaps
    when a prevValue/prevIndex is given), prevExist=false creates, a prevValue/prevIndex
    alone compares and swaps, anything else sets; DELETE with a prevValue/prevIndex
    compares and deletes, otherwise deletes.
    """
    method = method.upper()
    if method == "POST":
        return encode_command(CREATE, key, now=now, value=value, dir=dir, ttl=ttl, unique=True)
    if method == "PUT":
        compare = prev_index > 0 or prev_value != ""
        if prev_exist is True:
            if not compare:
                return encode_command(
                    UPDATE, key, now=now, value=value, ttl=ttl, refresh=refresh
                )
        elif prev_exist is False:
            return encode_command(CREATE, key, now=now, value=value, dir=dir, ttl=ttl)
        if compare:
            return encode_command(
                COMPARE_AND_SWAP,
                key,
                now=now,
                value=value,
                ttl=ttl,
                refresh=refresh,
                prev_value=prev_value,
                prev_index=prev_index,
            )
        return encode_command(SET, key, now=now, value=value, dir=dir, ttl=ttl, refresh=refresh)
    if method == "DELETE":
        if prev_index > 0 or prev_value != "":
            return encode_command(
                COMPARE_AND_DELETE, key, now=now, prev_value=prev_value, prev_index=prev_index
            )
        return encode_command(DELETE, key, now=now, dir=dir, recursive=recursive)
    raise CommandError(f"{method} is not a keys-API write")
