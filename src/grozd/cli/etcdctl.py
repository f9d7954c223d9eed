"""`grozd etcdctl`: etcd's v2 command-line client (etcdctl 3.4 with ETCDCTL_API=2).

Same commands, flags, output lines and exit codes as the original, including how it parses
arguments: global flags go before the command; a command's own flags may come before or
after its arguments (they are moved to the front, as urfave/cli does), and ``--`` ends them.
Requests go through `grozd.client`'s HTTP layer with the Go client's rules: endpoints
synchronised from ``/v2/members`` first (unless ``--no-sync``), each tried in turn, a
per-request header timeout (``--timeout``) and a deadline for the whole command
(``--total-timeout``).
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import random
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import quote_plus, urlsplit

from grozd.client.http import ConnectFailed, HTTPResponse, Origin, Pool, RequestFailed

VERSION = "3.4.23"
DEFAULT_ENDPOINTS = "http://127.0.0.1:2379,http://127.0.0.1:4001"
KEYS_PREFIX = "/v2/keys"
FORM = "application/x-www-form-urlencoded"

# etcdctl's exit codes (3 is also urfave/cli's "No help topic").
EXIT_OK, EXIT_BAD_ARGS, EXIT_BAD_CONNECTION, EXIT_NO_TOPIC = 0, 1, 2, 3
EXIT_SERVER_ERROR, EXIT_CLUSTER_NOT_HEALTHY = 4, 5


class Exit(Exception):
    """Leave with this exit code (what the original does with os.Exit)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def out(text: str = "") -> None:
    """A line on stdout, flushed at once (watch output goes to pipes)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def err(text: str = "") -> None:
    """A line on stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# -- Go formatting ---------------------------------------------------------------------------

_GO_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                    "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                    "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json_string(s: str) -> str:
    """A string as Go's encoding/json writes it (HTML characters escaped)."""
    parts = []
    for ch in s:
        esc = _GO_JSON_ESCAPES.get(ch)
        if esc is not None:
            parts.append(esc)
        elif ord(ch) < 0x20:
            parts.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            parts.append("\ufffd")  # an undecodable byte: Go writes U+FFFD
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


def go_quote(s: str) -> str:
    """Go's %q of a string (strconv.Quote)."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
             "\v": "\\v", "\\": "\\\\", '"': '\\"'}
    parts = []
    for ch in s:
        code = ord(ch)
        if ch in named:
            parts.append(named[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            parts.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            parts.append(f"\\x{code:02x}")
        elif not ch.isprintable() and code > 0x7F:
            parts.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


_PATH_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                       b"-_.~$&+,/:;=@")


def go_escape_path(path: str) -> str:
    """A URL path escaped the way Go's url.URL.String() does."""
    raw = path.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _PATH_SAFE else f"%{b:02X}" for b in raw)


def go_query(params: Sequence[tuple[str, str]]) -> str:
    """url.Values.Encode(): sorted by key, QueryEscape'd."""
    def esc(s: str) -> str:
        return quote_plus(s.encode("utf-8", "surrogateescape"), safe="")
    return "&".join(f"{esc(k)}={esc(v)}" for k, v in sorted(params, key=lambda kv: kv[0]))


def canonical_path(p: str) -> str:
    """pathutil.CanonicalURLPath: cleaned, with a trailing slash kept."""
    if not p:
        return "/"
    if not p.startswith("/"):
        p = "/" + p
    cleaned = posixpath.normpath(re.sub("/+", "/", p))
    if p.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def keys_path(key: str) -> str:
    """The request path of a key, as the Go client builds it."""
    if key and not key.startswith("/"):
        key = "/" + key
    return canonical_path(KEYS_PREFIX + key)


def go_time(text: str) -> str:
    """An RFC 3339 time as Go writes it back after parsing (fraction without trailing 0s)."""
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        return text
    frac = (m.group(2) or "")[:9].rstrip("0")
    return m.group(1) + (f".{frac}" if frac else "") + m.group(3)


# -- errors as the Go client reports them ------------------------------------------------------

class GoError(Exception):
    """An error whose str() is exactly what the Go client's error prints."""

    connection = False


class ConnError(GoError):
    """A per-endpoint failure to reach a member (Go's isConnectionError is true)."""

    connection = True


class DeadlineExceeded(GoError):
    """The command's --total-timeout passed."""

    connection = True

    def __init__(self) -> None:
        super().__init__("context deadline exceeded")


class ClusterError(GoError):
    """No endpoint answered usefully; one entry per attempt."""

    def __init__(self, errors: list[GoError]) -> None:
        self.errors = errors
        text = "client: etcd cluster is unavailable or misconfigured"
        text += "".join(f"; error #{i}: {e}\n" for i, e in enumerate(errors))
        super().__init__(text)
        self.connection = all(e.connection for e in errors)

    def detail(self) -> str:
        return "".join(f"error #{i}: {e}\n" for i, e in enumerate(self.errors))


class KeysError(GoError):
    """An etcd keys-API error: ``100: Key not found (/foo) [12]``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.code = int(data.get("errorCode") or 0)
        self.message = str(data.get("message") or "")
        self.cause = str(data.get("cause") or "")
        self.index = int(data.get("index") or 0)
        super().__init__(f"{self.code}: {self.message} ({self.cause}) [{self.index}]")


_ERRNO_TEXT = {"ECONNREFUSED": "connection refused", "EHOSTUNREACH": "no route to host",
               "ENETUNREACH": "network is unreachable", "ETIMEDOUT": "connection timed out",
               "ECONNRESET": "connection reset by peer", "EPIPE": "broken pipe"}


def _os_text(exc: BaseException | None) -> str:
    import errno as errno_mod

    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno_mod.errorcode.get(exc.errno, "")
        if name in _ERRNO_TEXT:
            return _ERRNO_TEXT[name]
        if exc.strerror:
            return exc.strerror.lower()
    return str(exc)


def handle_error(code: int, exc: GoError | Exception) -> NoReturn:
    """etcdctl's handleError: ``Error:  <err>`` (and a cluster error's detail), then exit."""
    err(f"Error:  {exc}")
    if isinstance(exc, ClusterError):
        err(exc.detail())
    raise Exit(code)


# -- the Go v2 client's request dispatch -------------------------------------------------------

def _status_text(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


@dataclass
class Endpoint:
    url: str
    origin: Origin
    base: str  # the URL's own path (usually empty)


def parse_endpoint(ep: str) -> str:
    """getEndpoints: Go's url.Parse, http:// when no scheme. Raises ValueError(Go text)."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", ep)
    if scheme is None:
        first = ep.split("/", 1)[0]
        if ":" in first:
            raise ValueError(f'parse {go_quote(ep)}: first path segment in URL cannot contain'
                             f' colon')
        return "http://" + ep if ep else "http:"
    return ep


class GoClient:
    """Endpoint handling of etcd's Go v2 client, over grozd.client's connection pools."""

    def __init__(self, endpoints: list[str], header_timeout: float, debug: bool) -> None:
        self.header_timeout = header_timeout
        self.debug = debug
        self.pools: dict[Origin, Pool] = {}
        self.endpoints: list[Endpoint] = []
        self.pinned = 0
        self.set_endpoints(endpoints)

    def set_endpoints(self, urls: list[str]) -> None:
        eps = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme != "http":
                raise GoError(f"grozd etcdctl: endpoint {url!r}: only http:// is supported")
            eps.append(Endpoint(url, Origin.parse(url), parts.path.rstrip("/")))
        random.shuffle(eps)
        self.endpoints = eps
        self.pinned = 0

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def _pool(self, origin: Origin) -> Pool:
        if origin not in self.pools:
            self.pools[origin] = Pool(origin)
        return self.pools[origin]

    async def do(self, method: str, path: str, params: Sequence[tuple[str, str]] = (),
                 body: bytes | None = None, ctype: str = FORM, *,
                 deadline: float | None, one_shot: bool = False) -> HTTPResponse:
        """One request, to the pinned endpoint first, then to the others."""
        errors: list[GoError] = []
        n = len(self.endpoints)
        for i in range(self.pinned, self.pinned + n):
            k = i % n
            ep = self.endpoints[k]
            target = go_escape_path(ep.base + path) + (f"?{go_query(params)}" if params else "")
            if self.debug:
                line = f"cURL Command: curl -X {method} {ep.url.rstrip('/')}{target}"
                if body is not None:
                    line += " -d " + go_quote(body.decode("utf-8", "surrogateescape"))
                err(line)
            try:
                resp = await self._attempt(ep, method, target, body, ctype, deadline)
            except DeadlineExceeded:
                raise
            except GoError as exc:
                error: GoError | None = exc
            else:
                error = None
                if resp.status // 100 == 5:
                    if resp.status in (500, 503):
                        error = GoError(f"client: etcd member {ep.url} has no leader")
                    else:
                        error = GoError(f"client: etcd member {ep.url} returns server error"
                                        f" [{_status_text(resp.status)}]")
                    errors.append(error)
                    error = errors[0]
            if error is not None:
                if error not in errors:
                    errors.append(error)
                if one_shot:
                    self.pinned = (k + 1) % n
                    raise error
                continue
            self.pinned = k
            return resp
        raise ClusterError(errors)

    async def _attempt(self, ep: Endpoint, method: str, target: str, body: bytes | None,
                       ctype: str, deadline: float | None) -> HTTPResponse:
        loop = asyncio.get_running_loop()
        head_deadline = deadline
        if self.header_timeout > 0:
            own = loop.time() + self.header_timeout
            head_deadline = own if deadline is None else min(own, deadline)

        def timed_out() -> GoError:
            if deadline is not None and loop.time() >= deadline - 0.001:
                return DeadlineExceeded()
            return GoError(f"client: endpoint {ep.url} exceeded header timeout")

        pool = self._pool(ep.origin)
        conn = pool.take_idle()
        if conn is None:
            try:
                conn = await pool.connect(head_deadline)
            except ConnectFailed as exc:
                cause = exc.__cause__
                if isinstance(cause, TimeoutError):
                    raise timed_out() from None
                raise ConnError(f"dial tcp {ep.origin.netloc}: connect: {_os_text(cause)}"
                                ) from None
        try:
            resp = await conn.request(method, target, ep.origin.netloc, body,
                                      ctype if body is not None else None,
                                      head_deadline, deadline)
        except RequestFailed as exc:
            cause = exc.__cause__
            if isinstance(cause, TimeoutError):
                raise (timed_out() if exc.head is None else DeadlineExceeded()) from None
            if isinstance(cause, EOFError):
                raise ConnError("unexpected EOF" if exc.head else "EOF") from None
            raise ConnError(f"read tcp {ep.origin.netloc}: read: {_os_text(cause)}") from None
        finally:
            pool.release(conn)
        return resp

    async def members(self, deadline: float | None) -> list[dict[str, Any]]:
        """MembersAPI.List."""
        resp = await self.do("GET", "/v2/members", deadline=deadline)
        if resp.status != 200:
            raise GoError(f"unexpected status code {resp.status}")
        data = _json(resp.body)
        return [m for m in (data.get("members") or []) if isinstance(m, dict)]

    async def sync(self, deadline: float | None) -> None:
        """Replace the endpoints by every member's client URLs."""
        members = await self.members(deadline)
        eps = [u for m in members for u in (m.get("clientURLs") or [])]
        if sorted(eps) == sorted(self.urls):
            return
        if not eps:
            raise NoEndpoints()
        try:
            self.set_endpoints(eps)
        except ValueError as exc:
            raise GoError(str(exc)) from None


class NoEndpoints(GoError):
    def __init__(self) -> None:
        super().__init__("client: no endpoints available")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GoError(f"invalid character in JSON: {exc}") from None


# -- keys-API responses ------------------------------------------------------------------------

@dataclass
class KeysResponse:
    """A keys-API answer as the Go client holds it."""

    action: str
    node: dict[str, Any] | None
    prev_node: dict[str, Any] | None
    index: int

    def value(self) -> str:
        return str((self.node or {}).get("value") or "")

    def is_dir(self) -> bool:
        return bool((self.node or {}).get("dir"))

    def key(self) -> str:
        return str((self.node or {}).get("key") or "")


class EmptyBody(GoError):
    def __init__(self) -> None:
        super().__init__("client: response body is empty")


def keys_response(resp: HTTPResponse) -> KeysResponse:
    """unmarshalHTTPResponse: the response, or the KeysError it carries."""
    if resp.status in (200, 201):
        if not resp.body:
            raise EmptyBody()
        data = _json(resp.body)
        raw = resp.headers.get("x-etcd-index", "")
        if not raw.isdigit():
            raise GoError(f'strconv.ParseUint: parsing {go_quote(raw)}: invalid syntax')
        return KeysResponse(str(data.get("action") or ""), data.get("node"),
                            data.get("prevNode"), int(raw))
    data = _json(resp.body)
    if not isinstance(data, dict):
        raise GoError(f"unexpected response: {resp.body[:100]!r}")
    raise KeysError(data)


def node_json(node: dict[str, Any] | None) -> str:
    """A node re-encoded like the Go client's Node struct."""
    if node is None:
        return "null"
    parts = [f'"key":{go_json_string(str(node.get("key") or ""))}']
    if node.get("dir"):
        parts.append('"dir":true')
    parts.append(f'"value":{go_json_string(str(node.get("value") or ""))}')
    nodes = node.get("nodes")
    parts.append('"nodes":' + ("[" + ",".join(node_json(n) for n in nodes) + "]"
                               if nodes is not None else "null"))
    parts.append(f'"createdIndex":{int(node.get("createdIndex") or 0)}')
    parts.append(f'"modifiedIndex":{int(node.get("modifiedIndex") or 0)}')
    if node.get("expiration"):
        parts.append(f'"expiration":{go_json_string(go_time(str(node["expiration"])))}')
    if node.get("ttl"):
        parts.append(f'"ttl":{int(node["ttl"])}')
    return "{" + ",".join(parts) + "}"


def print_response_key(resp: KeysResponse, fmt: str) -> None:
    """printResponseKey: one response in the --output format."""
    node = resp.node or {}
    if fmt == "simple":
        if resp.action != "delete":
            out(resp.value())
        else:
            out(f"PrevNode.Value: {(resp.prev_node or {}).get('value') or ''}")
    elif fmt == "extended":
        out(f"Key: {resp.key()}")
        out(f"Created-Index: {int(node.get('createdIndex') or 0)}")
        out(f"Modified-Index: {int(node.get('modifiedIndex') or 0)}")
        if resp.prev_node is not None:
            out(f"PrevNode.Value: {resp.prev_node.get('value') or ''}")
        out(f"TTL: {int(node.get('ttl') or 0)}")
        out(f"Index: {resp.index}")
        if resp.action != "delete":
            out("")
            out(resp.value())
    elif fmt == "json":
        out(f'{{"action":{go_json_string(resp.action)},"node":{node_json(resp.node)},'
            f'"prevNode":{node_json(resp.prev_node)}}}')
    else:
        err(f"Unsupported output format: {fmt}")


# -- argument parsing (Go's flag package, urfave/cli's layout) ---------------------------------

class UsageError(Exception):
    """A flag error, worded like Go's flag package."""


class HelpRequested(Exception):
    """-h / --help was given."""


@dataclass
class Flag:
    names: tuple[str, ...]
    kind: str  # bool | int | string | duration
    usage: str
    default: Any = None
    placeholder: str = "value"

    @property
    def dest(self) -> str:
        return self.names[0]

    def help_name(self) -> str:
        shown = []
        for name in self.names:
            dash = "-" if len(name) == 1 else "--"
            shown.append(dash + name + ("" if self.kind == "bool" else " " + self.placeholder))
        return ", ".join(shown)

    def help_usage(self) -> str:
        if self.kind == "int":
            return f"{self.usage} (default: {self.default})"
        if self.kind == "duration":
            return f"{self.usage} (default: {format_duration(self.default)})"
        if self.kind == "string" and self.default:
            return f'{self.usage} (default: "{self.default}")'
        return self.usage


HELP_FLAG = Flag(("help", "h"), "bool", "show help")


def parse_go_int(text: str) -> int:
    """strconv.ParseInt(text, 0, 64)."""
    t = text.replace("_", "") if re.match(r"[+-]?0[xXbBoO]", text) else text
    try:
        if re.fullmatch(r"[+-]?0[0-7]+", t):
            value = int(t, 8)
        else:
            value = int(t, 0)
    except ValueError:
        raise UsageError("parse error") from None
    if not -(2**63) <= value < 2**63:
        raise UsageError("value out of range")
    return value


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """time.ParseDuration, in seconds."""
    t = text
    sign = -1.0 if t.startswith("-") else 1.0
    t = t[1:] if t[:1] in ("+", "-") else t
    if t == "0":
        return 0.0
    parts = re.findall(r"(\d*\.?\d*)(ns|us|µs|μs|ms|s|m|h)", t)
    if not t or "".join(a + b for a, b in parts) != t or any(a in ("", ".") for a, _ in parts):
        raise UsageError("parse error")
    return sign * sum(float(a) * _UNITS[u] for a, u in parts)


def format_duration(seconds: float) -> str:
    """time.Duration.String() for the whole-second defaults shown in help."""
    if seconds == int(seconds) and seconds < 60:
        return f"{int(seconds)}s"
    return f"{seconds}s"


def parse_go_bool(text: str) -> bool:
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise UsageError("parse error")


def go_flag_parse(flags: list[Flag], args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Go's FlagSet.Parse: flags up to the first non-flag or ``--``; the rest are args."""
    by_name = {n: f for f in flags for n in f.names}
    values: dict[str, Any] = {f.dest: f.default for f in flags}
    i = 0
    while i < len(args):
        arg = args[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            i += 1
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        i += 1
        has_value = "=" in name
        name, _, value = name.partition("=")
        flag = by_name.get(name)
        if flag is None:
            if name in ("help", "h"):
                raise HelpRequested()
            raise UsageError(f"flag provided but not defined: -{name}")
        if flag.kind == "bool":
            if has_value:
                try:
                    values[flag.dest] = parse_go_bool(value)
                except UsageError:
                    raise UsageError(f'invalid boolean value "{value}" for -{name}: parse error'
                                     ) from None
            else:
                values[flag.dest] = True
            continue
        if not has_value:
            if i >= len(args):
                raise UsageError(f"flag needs an argument: -{name}")
            value = args[i]
            i += 1
        try:
            if flag.kind == "int":
                values[flag.dest] = parse_go_int(value)
            elif flag.kind == "duration":
                values[flag.dest] = parse_go_duration(value)
            else:
                values[flag.dest] = value
        except UsageError as exc:
            raise UsageError(f"invalid value {go_quote(value)} for flag -{name}: {exc}") from None
    if values.get("help"):
        raise HelpRequested()
    return values, args[i:]


def reorder_args(flags: list[Flag], args: list[str]) -> list[str]:
    """urfave/cli's reorderArgs: a command's flags move ahead of its arguments."""
    names = {n for f in flags for n in f.names}

    def is_flag(arg: str) -> bool:
        if arg == "-" or not arg.startswith("-"):
            return False
        bare = arg[2:] if arg.startswith("--") else arg[1:]
        return bare.split("=", 1)[0] in names

    moved: list[str] = []
    rest: list[str] = []
    may_be_value = False
    for i, arg in enumerate(args):
        if may_be_value and not is_flag(arg):
            may_be_value = False
            moved.append(arg)
        elif arg == "--":
            rest = ["--", *rest, *args[i + 1:]]
            break
        elif is_flag(arg):
            moved.append(arg)
            may_be_value = "=" not in arg
        else:
            rest.append(arg)
    return moved + rest


# -- commands ---------------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a command sees: global options, its own options and its arguments."""

    g: dict[str, Any]
    opts: dict[str, Any]
    args: list[str]
    command: Command

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.g["total-timeout"]


Action = Callable[[Ctx], Awaitable[None]]


@dataclass
class Command:
    name: str
    usage: str
    args_usage: str
    action: Action | None
    flags: list[Flag] = field(default_factory=list)
    description: str = ""
    subcommands: list[Command] = field(default_factory=list)
    parent: str = ""

    @property
    def full_name(self) -> str:
        return f"etcdctl {self.parent + ' ' if self.parent else ''}{self.name}"

    def help(self) -> str:
        if self.subcommands:
            width = max(len(c.name) for c in self.subcommands)
            cmds = "".join(f"   {c.name.ljust(width)}  {c.usage}\n" for c in self.subcommands)
            return (f"NAME:\n   {self.full_name} - {self.usage}\n\nUSAGE:\n   {self.full_name}"
                    f" command [command options] [arguments...]\n\nCOMMANDS:\n{cmds}\n"
                    f"OPTIONS:\n{_flag_table([HELP_FLAG])}   \n")
        text = f"NAME:\n   {self.full_name} - {self.usage}\n\nUSAGE:\n   {self.full_name}"
        text += (" [command options]" if self.flags else "") + f" {self.args_usage}\n"
        if self.description:
            text += f"\nDESCRIPTION:\n   {self.description}\n"
        if self.flags:
            text += f"\nOPTIONS:\n{_flag_table(self.flags)}   \n"
        return text


def _flag_table(flags: list[Flag]) -> str:
    width = max(len(f.help_name()) for f in flags)
    return "".join(f"   {f.help_name().ljust(width)}  {f.help_usage()}\n" for f in flags)


TTL = Flag(("ttl",), "int", "key time-to-live in seconds", 0)


def _required(ctx: Ctx, what: str = "key required") -> str:
    if not ctx.args:
        handle_error(EXIT_BAD_ARGS, GoError(what))
    return ctx.args[0]


def _value_or_stdin(ctx: Ctx) -> str:
    """argOrStdin: the second argument, or all of standard input."""
    if len(ctx.args) > 1:
        return ctx.args[1]
    try:
        data = sys.stdin.read() if sys.stdin is not None else ""
    except (OSError, ValueError):
        data = ""
    if not data:
        handle_error(EXIT_BAD_ARGS, GoError("value required"))
    return data


async def keys_client(ctx: Ctx) -> GoClient:
    """mustNewKeyAPI: a client, synchronised with the cluster unless --no-sync."""
    return await new_client(ctx, sync=True)


async def new_client(ctx: Ctx, sync: bool) -> GoClient:
    g = ctx.g
    try:
        eps = get_endpoints(g)
        client = GoClient(eps, g["timeout"], g["debug"])
    except (ValueError, GoError) as exc:
        err(str(exc))
        raise Exit(EXIT_BAD_ARGS) from None
    debug = g["debug"]
    if sync and not g["no-sync"]:
        if debug:
            err(f"start to sync cluster using endpoints({','.join(client.urls)})")
        try:
            await client.sync(ctx.deadline())
        except NoEndpoints as exc:
            err("etcd cluster has no published client endpoints.")
            err(f"Try '--no-sync' if you want to access non-published client endpoints"
                f"({','.join(client.urls)}).")
            handle_error(EXIT_SERVER_ERROR, exc)
        except GoError as exc:
            if exc.connection:
                handle_error(EXIT_BAD_CONNECTION, exc)
        if debug:
            err(f"got endpoints({','.join(client.urls)}) after sync")
    if debug:
        err(f"Cluster-Endpoints: {', '.join(client.urls)}")
    return client


def get_endpoints(g: dict[str, Any]) -> list[str]:
    """--endpoints, ETCDCTL_ENDPOINTS, --endpoint, ETCDCTL_ENDPOINT, --peers, ETCDCTL_PEERS."""
    raw = (g["endpoints"] or os.environ.get("ETCDCTL_ENDPOINTS", "") or g["endpoint"]
           or os.environ.get("ETCDCTL_ENDPOINT", "") or g["peers"]
           or os.environ.get("ETCDCTL_PEERS", "") or DEFAULT_ENDPOINTS)
    return [parse_endpoint(ep) for ep in raw.split(",")]


def go_ttl(ttl: int) -> int | None:
    """The ttl the Go client sends for --ttl: time.Duration(ttl) * time.Second wraps around
    in 64 bits, and only a positive result is sent (whole seconds); None: no ttl."""
    ns = (ttl * 10**9 + 2**63) % 2**64 - 2**63
    return int(ns / 1e9) if ns > 0 else None


async def set_key(ctx: Ctx, client: GoClient, key: str, value: str, *, ttl: int = 0,
                  prev_value: str = "", prev_index: int = 0, prev_exist: str = "",
                  dir: bool = False) -> KeysResponse:
    """KeysAPI.Set, with the Go client's split of options into query and form."""
    params: list[tuple[str, str]] = []
    form: list[tuple[str, str]] = []
    if dir:
        params.append(("dir", "true"))
    else:
        if prev_value:
            params.append(("prevValue", prev_value))
        form.append(("value", value))
    if prev_index:
        params.append(("prevIndex", str(prev_index)))
    if prev_exist:
        params.append(("prevExist", prev_exist))
    seconds = go_ttl(ttl)
    if seconds is not None:
        form.append(("ttl", str(seconds)))
    resp = await client.do("PUT", keys_path(key), params, go_query(form).encode(),
                           deadline=ctx.deadline(), one_shot=prev_exist == "false")
    return keys_response(resp)


async def _run_keys(ctx: Ctx, op: Callable[[GoClient], Awaitable[KeysResponse]]
                    ) -> KeysResponse:
    client = await keys_client(ctx)
    try:
        return await op(client)
    except GoError as exc:
        handle_error(EXIT_SERVER_ERROR, exc)
        raise  # unreachable
    finally:
        client.close()


async def cmd_set(ctx: Ctx) -> None:
    key = _required(ctx)
    value = _value_or_stdin(ctx)
    o = ctx.opts
    resp = await _run_keys(ctx, lambda c: set_key(
        ctx, c, key, value, ttl=o["ttl"], prev_value=o["swap-with-value"],
        prev_index=o["swap-with-index"]))
    print_response_key(resp, ctx.g["output"])


async def cmd_mk(ctx: Ctx) -> None:
    key = _required(ctx)
    value = _value_or_stdin(ctx)
    ttl = ctx.opts["ttl"]

    async def op(c: GoClient) -> KeysResponse:
        if not ctx.opts["in-order"]:
            return await set_key(ctx, c, key, value, ttl=ttl, prev_exist="false")
        seconds = go_ttl(ttl)
        form = [("value", value)] + ([("ttl", str(seconds))] if seconds is not None else [])
        return keys_response(await c.do("POST", keys_path(key), (), go_query(form).encode(),
                                        deadline=ctx.deadline()))

    print_response_key(await _run_keys(ctx, op), ctx.g["output"])


async def cmd_update(ctx: Ctx) -> None:
    key = _required(ctx)
    value = _value_or_stdin(ctx)
    resp = await _run_keys(ctx, lambda c: set_key(ctx, c, key, value, ttl=ctx.opts["ttl"],
                                                  prev_exist="true"))
    print_response_key(resp, ctx.g["output"])


def _dir_command(prev_exist: str) -> Action:
    async def action(ctx: Ctx) -> None:
        key = _required(ctx)
        await _run_keys(ctx, lambda c: set_key(ctx, c, key, "", ttl=ctx.opts["ttl"],
                                               prev_exist=prev_exist, dir=True))
    return action


async def _get(ctx: Ctx, c: GoClient, key: str, recursive: bool) -> KeysResponse:
    params = [("recursive", _b(recursive)), ("sorted", _b(ctx.opts["sort"])),
              ("quorum", _b(ctx.opts["quorum"]))]
    return keys_response(await c.do("GET", keys_path(key), params, deadline=ctx.deadline()))


def _b(value: bool) -> str:
    return "true" if value else "false"


async def cmd_get(ctx: Ctx) -> None:
    key = _required(ctx)
    resp = await _run_keys(ctx, lambda c: _get(ctx, c, key, False))
    if resp.is_dir():
        err(f"{resp.key()}: is a directory")
        raise Exit(EXIT_BAD_ARGS)
    print_response_key(resp, ctx.g["output"])


async def cmd_ls(ctx: Ctx) -> None:
    key = ctx.args[0] if ctx.args else "/"
    resp = await _run_keys(ctx, lambda c: _get(ctx, c, key, ctx.opts["recursive"]))
    if ctx.g["output"] != "simple":
        print_response_key(resp, ctx.g["output"])
        return
    if not resp.is_dir():
        out(resp.key())
    slash = ctx.opts["p"]

    def walk(node: dict[str, Any]) -> None:
        key = str(node.get("key") or "")
        out(f"{key}/" if node.get("dir") and slash else key)
        for child in node.get("nodes") or ():
            walk(child)

    for child in (resp.node or {}).get("nodes") or ():
        walk(child)


async def _delete(ctx: Ctx, key: str, *, recursive: bool = False, dir: bool = False,
                  prev_value: str = "", prev_index: int = 0) -> None:
    params: list[tuple[str, str]] = []
    if prev_value:
        params.append(("prevValue", prev_value))
    if prev_index:
        params.append(("prevIndex", str(prev_index)))
    if dir:
        params.append(("dir", "true"))
    if recursive:
        params.append(("recursive", "true"))

    async def op(c: GoClient) -> KeysResponse:
        return keys_response(await c.do("DELETE", keys_path(key), params,
                                        deadline=ctx.deadline()))

    resp = await _run_keys(ctx, op)
    if not resp.is_dir():
        print_response_key(resp, ctx.g["output"])


async def cmd_rm(ctx: Ctx) -> None:
    key = _required(ctx)
    o = ctx.opts
    await _delete(ctx, key, recursive=o["recursive"], dir=o["dir"],
                  prev_value=o["with-value"], prev_index=o["with-index"])


async def cmd_rmdir(ctx: Ctx) -> None:
    await _delete(ctx, _required(ctx), dir=True)


async def _watch(ctx: Ctx, client: GoClient, key: str, wait_index: int, recursive: bool,
                 on_event: Callable[[KeysResponse], bool]) -> None:
    """The Go Watcher: long polls, each resuming after the last event."""
    while True:
        params = [("wait", "true"), ("waitIndex", str(wait_index)),
                  ("recursive", _b(recursive))]
        try:
            resp = keys_response(await client.do("GET", keys_path(key), params,
                                                 deadline=None))
        except EmptyBody:
            continue
        except GoError as exc:
            handle_error(EXIT_SERVER_ERROR, exc)
        wait_index = int((resp.node or {}).get("modifiedIndex") or 0) + 1
        if not on_event(resp):
            return


async def cmd_watch(ctx: Ctx) -> None:
    key = _required(ctx)
    recursive, forever = ctx.opts["recursive"], ctx.opts["forever"]
    after = ctx.opts["after-index"]
    client = await keys_client(ctx)

    def on_event(resp: KeysResponse) -> bool:
        if resp.is_dir():
            return True
        if recursive:
            out(f"[{resp.action}] {resp.key()}")
        print_response_key(resp, ctx.g["output"])
        return forever

    try:
        await _watch(ctx, client, key, after + 1 if after > 0 else 0, recursive, on_event)
    finally:
        client.close()


def split_exec_args(raw: list[str], parsed: list[str]) -> tuple[str, list[str]] | None:
    """The key and the command of exec-watch.

    ``exec-watch KEY -- CMD ARGS...`` (the form etcd's documentation shows) is read as
    written; otherwise etcdctl's own rule applies: a ``--`` after the first argument
    separates them, else the key is the last argument.
    """
    if "--" in raw:
        at = raw.index("--")
        before = [a for a in parsed if a in raw[:at]]
        after = raw[at + 1:]
        if len(before) == 1 and after and parsed[-len(after):] == after:
            return before[0], after
    if len(parsed) < 2:
        return None
    if "--" in parsed[1:]:
        return parsed[0], parsed[2:]
    return parsed[-1], parsed[:-1]


async def cmd_exec_watch(ctx: Ctx) -> None:
    if len(ctx.args) < 2:
        handle_error(EXIT_BAD_ARGS, GoError("key and command to exec required"))
    split = split_exec_args(ctx.opts["_raw"], ctx.args)
    assert split is not None
    key, cmd = split
    after = ctx.opts["after-index"]
    index = after + 1 if after != 0 else 0
    client = await keys_client(ctx)
    children: list[subprocess.Popen[bytes]] = []

    def on_event(resp: KeysResponse) -> bool:
        if resp.is_dir():
            err(f"Ignored dir {resp.key()} change")
            return True
        node = resp.node or {}
        env = dict(os.environ)
        env["ETCD_WATCH_ACTION"] = resp.action
        env["ETCD_WATCH_MODIFIED_INDEX"] = str(int(node.get("modifiedIndex") or 0))
        env["ETCD_WATCH_KEY"] = str(node.get("key") or "")
        env["ETCD_WATCH_VALUE"] = str(node.get("value") or "")
        sys.stdout.flush()
        try:
            children.append(subprocess.Popen(cmd, env=env, stdout=sys.stdout.fileno()
                                             if _has_fd(sys.stdout) else None,
                                             stderr=sys.stderr.fileno()
                                             if _has_fd(sys.stderr) else None))
        except OSError as exc:
            sys.stderr.write(f"exec: {go_quote(cmd[0])}: {_os_text(exc)}")
            raise Exit(1) from None
        children[:] = [p for p in children if p.poll() is None]
        return True

    try:
        await _watch(ctx, client, key, index + 1 if index > 0 else 0, ctx.opts["recursive"],
                     on_event)
    finally:
        client.close()


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


# -- member and cluster-health ----------------------------------------------------------------

def check_urls(urls: list[str]) -> list[str]:
    """types.NewURLs: scheme, host:port and no path; sorted. Raises ValueError(Go text)."""
    checked = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "unix", "unixs"):
            raise ValueError(f"URL scheme must be http, https, unix, or unixs: {url}")
        if not re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*):[^:]*", parts.netloc):
            raise ValueError(f'URL address does not have the form "host:port": {url}')
        if parts.path:
            raise ValueError(f"URL must not contain a path: {url}")
        checked.append(url)
    if not checked:
        raise ValueError("no valid URLs given")
    return sorted(checked)


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def _members_client(ctx: Ctx) -> GoClient:
    return await new_client(ctx, sync=True)


def _fail(text: str) -> NoReturn:
    err(text)
    raise Exit(EXIT_BAD_ARGS)


async def cmd_member_list(ctx: Ctx) -> None:
    if ctx.args:
        _fail("No arguments accepted")
    client = await _members_client(ctx)
    deadline = ctx.deadline()
    try:
        try:
            members = await client.members(deadline)
        except GoError as exc:
            _fail(str(exc))
        try:
            resp = await client.do("GET", "/v2/members/leader", deadline=deadline)
            if resp.status != 200:
                raise GoError(f"unexpected status code {resp.status}")
            leader = _json(resp.body)
        except GoError as exc:
            _fail(f"Failed to get leader:  {exc}")
    finally:
        client.close()
    for m in members:
        mid = m.get("id", "")
        peers = ",".join(m.get("peerURLs") or [])
        if not m.get("name"):
            out(f"{mid}[unstarted]: peerURLs={peers}")
        else:
            is_leader = "true" if mid == leader.get("id") else "false"
            out(f"{mid}: name={m['name']} peerURLs={peers}"
                f" clientURLs={','.join(m.get('clientURLs') or [])} isLeader={is_leader}")


async def cmd_member_add(ctx: Ctx) -> None:
    if len(ctx.args) != 2:
        _fail("Provide a name and a single member peerURL")
    name, url = ctx.args
    client = await _members_client(ctx)
    deadline = ctx.deadline()
    try:
        try:
            urls = check_urls([url])
        except ValueError as exc:
            _fail(str(exc))
        try:
            resp = await client.do("POST", "/v2/members", (), _json_body({"peerURLs": urls}),
                                   "application/json", deadline=deadline)
            if resp.status not in (201, 409):
                raise GoError(f"unexpected status code {resp.status}")
            data = _json(resp.body)
            if resp.status != 201:
                raise GoError(str(data.get("message", "")))
        except GoError as exc:
            _fail(str(exc))
        new_id = data.get("id", "")
        out(f"Added member named {name} with ID {new_id} to cluster")
        try:
            members = await client.members(deadline)
        except GoError as exc:
            _fail(str(exc))
    finally:
        client.close()
    conf = [f"{name if m.get('id') == new_id else m.get('name', '')}={u}"
            for m in members for u in (m.get("peerURLs") or [])]
    out("")
    out(f"ETCD_NAME={go_quote(name)}")
    out(f"ETCD_INITIAL_CLUSTER={go_quote(','.join(conf))}")
    out('ETCD_INITIAL_CLUSTER_STATE="existing"')


async def cmd_member_remove(ctx: Ctx) -> None:
    if len(ctx.args) != 1:
        _fail("Provide a single member ID")
    mid = ctx.args[0]
    client = await _members_client(ctx)
    deadline = ctx.deadline()
    try:
        try:
            members = await client.members(deadline)
        except GoError as exc:
            _fail(f"Error while verifying ID against known members: {exc}")
        found = False
        for m in members:
            if m.get("id") == mid:
                found = True
            if m.get("name") == mid:
                sys.stderr.write(
                    f"Found a member named {m['name']}; if this is correct, please use its ID,"
                    f" eg:\n\tetcdctl member remove {m.get('id')}\n"
                    "For more details, read the documentation at https://github.com/etcd-io/"
                    "etcd/blob/master/Documentation/runtime-configuration.md#remove-a-member"
                    "\n\n")
        if not found:
            sys.stderr.write(f"Couldn't find a member in the cluster with an ID of {mid}.\n")
            raise Exit(EXIT_BAD_ARGS)
        try:
            resp = await client.do("DELETE", f"/v2/members/{mid}", deadline=deadline)
            if resp.status not in (204, 410):
                raise GoError(f"unexpected status code {resp.status}")
        except GoError as exc:
            sys.stderr.write(f"Received an error trying to remove member {mid}: {exc}")
            raise Exit(EXIT_BAD_ARGS) from None
    finally:
        client.close()
    out(f"Removed member {mid} from cluster")


async def cmd_member_update(ctx: Ctx) -> None:
    if len(ctx.args) != 2:
        _fail("Provide an ID and a list of comma separated peerURL"
              " (0xabcd http://example.com,http://example1.com)")
    mid, urls = ctx.args
    client = await _members_client(ctx)
    try:
        try:
            checked = check_urls(urls.split(","))
        except ValueError as exc:
            _fail(str(exc))
        try:
            resp = await client.do("PUT", f"/v2/members/{mid}", (),
                                   _json_body({"peerURLs": checked}), "application/json",
                                   deadline=ctx.deadline())
            if resp.status not in (204, 404, 409):
                raise GoError(f"unexpected status code {resp.status}")
            if resp.status != 204:
                raise GoError(str(_json(resp.body).get("message", "")))
        except GoError as exc:
            _fail(str(exc))
    finally:
        client.close()
    out(f"Updated member with ID {mid} in cluster")


async def _health(url: str, deadline: float) -> bytes:
    """GET <url>/health; raises GoError worded like Go's http.Client."""
    target = url.rstrip("/") + "/health"
    try:
        origin = Origin.parse(url)
        parts = urlsplit(url)
    except ValueError as exc:
        raise GoError(f"Get {go_quote(target)}: {exc}") from None
    pool = Pool(origin)
    try:
        conn = await pool.connect(deadline)
    except ConnectFailed as exc:
        raise GoError(f"Get {go_quote(target)}: dial tcp {origin.netloc}: connect:"
                      f" {_os_text(exc.__cause__)}") from None
    try:
        resp = await conn.request("GET", go_escape_path(parts.path.rstrip("/") + "/health"),
                                  origin.netloc, None, None, deadline, deadline)
    except RequestFailed as exc:
        raise GoError(f"Get {go_quote(target)}: {exc}") from None
    finally:
        conn.close()
        pool.close()
    return resp.body


async def cmd_cluster_health(ctx: Ctx) -> None:
    forever = ctx.opts["forever"]
    client = await new_client(ctx, sync=False)
    try:
        try:
            members = await client.members(None)
        except GoError as exc:
            out("cluster may be unhealthy: failed to list members")
            handle_error(EXIT_SERVER_ERROR, exc)
    finally:
        client.close()
    while True:
        healthy = False
        for m in members:
            mid = m.get("id", "")
            urls = m.get("clientURLs") or []
            if not urls:
                out(f"member {mid} is unreachable: no available published client urls")
                continue
            checked = False
            for url in urls:
                try:
                    body = await _health(url, ctx.deadline())
                    data = json.loads(body)
                    health = data.get("health") if isinstance(data, dict) else None
                    if not isinstance(health, (str, bool)):
                        health = None
                except GoError as exc:
                    out(f"failed to check the health of member {mid} on {url}: {exc}")
                    continue
                except (ValueError, UnicodeDecodeError) as exc:
                    out(f"failed to check the health of member {mid} on {url}: {exc}")
                    continue
                checked = True
                if health == "true" or health is True:
                    healthy = True
                    out(f"member {mid} is healthy: got healthy result from {url}")
                else:
                    out(f"member {mid} is unhealthy: got unhealthy result from {url}")
                break
            if not checked:
                out(f"member {mid} is unreachable: [{' '.join(urls)}] are all unreachable")
        out("cluster is healthy" if healthy else "cluster is unhealthy")
        if not forever:
            raise Exit(EXIT_OK if healthy else EXIT_CLUSTER_NOT_HEALTHY)
        out("\nnext check after 10 second...\n")
        await asyncio.sleep(10)


# -- the command table and the entry point ------------------------------------------------------

def _commands() -> list[Command]:
    recursive = Flag(("recursive", "r"), "bool", "")
    quorum = Flag(("quorum", "q"), "bool", "require quorum for get request")
    sort = Flag(("sort",), "bool", "returns result in sorted order")
    after = Flag(("after-index",), "int", "watch after the given index", 0)

    def with_usage(flag: Flag, usage: str) -> Flag:
        return Flag(flag.names, flag.kind, usage, flag.default, flag.placeholder)

    member = Command("member", "member add, remove and list subcommands", "", None,
                     subcommands=[
                         Command("list", "enumerate existing cluster members", " ",
                                 cmd_member_list, parent="member"),
                         Command("add", "add a new member to the etcd cluster",
                                 "<name> <peerURL>", cmd_member_add, parent="member"),
                         Command("remove", "remove an existing member from the etcd cluster",
                                 "<memberID>", cmd_member_remove, parent="member"),
                         Command("update", "update an existing member in the etcd cluster",
                                 "<memberID> <peerURLs>", cmd_member_update, parent="member"),
                     ])
    return [
        Command("cluster-health", "check the health of the etcd cluster", " ",
                cmd_cluster_health,
                [Flag(("forever", "f"), "bool",
                      "forever check the health every 10 second until CTRL+C")]),
        Command("mk", "make a new key with a given value", "<key> <value>", cmd_mk,
                [Flag(("in-order",), "bool", "create in-order key under directory <key>"),
                 TTL]),
        Command("mkdir", "make a new directory", "<key>", _dir_command("false"), [TTL]),
        Command("rm", "remove a key or a directory", "<key>", cmd_rm,
                [Flag(("dir",), "bool",
                      "removes the key if it is an empty directory or a key-value pair"),
                 with_usage(recursive,
                            "removes the key and all child keys(if it is a directory)"),
                 Flag(("with-value",), "string", "previous value", ""),
                 Flag(("with-index",), "int", "previous index", 0)]),
        Command("rmdir", "removes the key if it is an empty directory or a key-value pair",
                "<key>", cmd_rmdir),
        Command("get", "retrieve the value of a key", "<key>", cmd_get, [sort, quorum]),
        Command("ls", "retrieve a directory", "[key]", cmd_ls,
                [sort,
                 with_usage(recursive, "returns all key names recursively for the given path"),
                 Flag(("p",), "bool", "append slash (/) to directories"), quorum]),
        Command("set", "set the value of a key", "<key> <value>", cmd_set,
                [TTL, Flag(("swap-with-value",), "string", "previous value", ""),
                 Flag(("swap-with-index",), "int", "previous index", 0)],
                description="Set sets the value of a key.\n\n   When <value> begins with '-',"
                " <value> is interpreted as a flag.\n   Insert '--' for workaround:\n\n"
                "   $ set -- <key> <value>"),
        Command("setdir", "create a new directory or update an existing directory TTL",
                "<key>", _dir_command(""), [TTL]),
        Command("update", "update an existing key with a given value", "<key> <value>",
                cmd_update, [TTL]),
        Command("updatedir", "update an existing directory", "<key> <value>",
                _dir_command("true"), [TTL]),
        Command("watch", "watch a key for changes", "<key>", cmd_watch,
                [Flag(("forever", "f"), "bool", "forever watch a key until CTRL+C"), after,
                 with_usage(recursive, "returns all values for key and child keys")]),
        Command("exec-watch", "watch a key for changes and exec an executable",
                "<key> <command> [args...]", cmd_exec_watch,
                [after, with_usage(recursive, "watch all values for key and child keys")]),
        member,
    ]


COMMANDS = _commands()

GLOBAL_FLAGS = [
    Flag(("debug",), "bool", "output cURL commands which can be used to reproduce the request"),
    Flag(("no-sync",), "bool", "don't synchronize cluster information before sending request"),
    Flag(("output", "o"), "string",
         "output response in the given format (simple, `extended` or `json`)", "simple",
         placeholder="simple"),
    Flag(("peers", "C"), "string", 'DEPRECATED - "--endpoints" should be used instead', ""),
    Flag(("endpoint",), "string", 'DEPRECATED - "--endpoints" should be used instead', ""),
    Flag(("endpoints",), "string", "a comma-delimited list of machine addresses in the cluster"
         ' (default: "http://127.0.0.1:2379,http://127.0.0.1:4001")', ""),
    Flag(("timeout",), "duration", "connection timeout per request", 2.0),
    Flag(("total-timeout",), "duration", "timeout for the command execution (except watch)",
         5.0),
    HELP_FLAG,
    Flag(("version", "v"), "bool", "print the version"),
]


def app_help() -> str:
    """The top-level help (etcdctl's, less the commands and flags grozd does not have)."""
    names = [(c.name, c.usage) for c in COMMANDS]
    names.append(("help, h", "Shows a list of commands or help for one command"))
    width = max(len(n) for n, _ in names)
    cmds = "".join(f"   {n.ljust(width)}  {u}\n" for n, u in names)
    return ("NAME:\n   etcdctl - A simple command line client for etcd.\n\nUSAGE:\n"
            "   etcdctl [global options] command [command options] [arguments...]\n\n"
            f"VERSION:\n   {VERSION}\n\nCOMMANDS:\n{cmds}\nGLOBAL OPTIONS:\n"
            f"{_flag_table(GLOBAL_FLAGS)}")


def _find(commands: list[Command], name: str) -> Command | None:
    return next((c for c in commands if c.name == name), None)


def _no_topic(name: str) -> int:
    err(f"No help topic for '{name}'")
    return EXIT_NO_TOPIC


def run(argv: list[str]) -> int:
    """Parse like urfave/cli, then run the command; returns the exit code."""
    try:
        g, rest = go_flag_parse(GLOBAL_FLAGS, argv)
    except HelpRequested:
        sys.stdout.write(app_help())
        return EXIT_OK
    except UsageError as exc:
        sys.stdout.write(f"Incorrect Usage. {exc}\n\n{app_help()}")
        err(str(exc))
        return EXIT_BAD_ARGS
    if g["version"]:
        out(f"etcdctl version: {VERSION}")
        out("API version: 2")
        return EXIT_OK
    if not rest:
        sys.stdout.write(app_help())
        return EXIT_OK
    name, args = rest[0], rest[1:]
    if name in ("help", "h"):
        if not args:
            sys.stdout.write(app_help())
            return EXIT_OK
        found = _find(COMMANDS, args[0])
        if found is None:
            return _no_topic(args[0])
        sys.stdout.write(found.help())
        return EXIT_OK
    command = _find(COMMANDS, name)
    if command is None:
        return _no_topic(name)
    if command.subcommands:
        try:
            _, sub_args = go_flag_parse([HELP_FLAG], args)
        except (HelpRequested, UsageError):
            sys.stdout.write(command.help())
            return EXIT_OK
        if not sub_args:
            sys.stdout.write(command.help())
            return EXIT_OK
        if sub_args[0] in ("help", "h"):
            sys.stdout.write(command.help())
            return EXIT_OK
        sub = _find(command.subcommands, sub_args[0])
        if sub is None:
            return _no_topic(sub_args[0])
        command, args = sub, sub_args[1:]
    flags = [*command.flags, HELP_FLAG]
    try:
        opts, positional = go_flag_parse(flags, reorder_args(flags, args))
    except HelpRequested:
        sys.stdout.write(command.help())
        return EXIT_OK
    except UsageError as exc:
        sys.stdout.write(f"Incorrect Usage: {exc}\n\n{command.help()}")
        err(str(exc))
        return EXIT_BAD_ARGS
    opts["_raw"] = args
    ctx = Ctx(g, opts, positional, command)
    assert command.action is not None
    streaming = command.name in ("watch", "exec-watch", "cluster-health")
    try:
        asyncio.run(command.action(ctx))
    except Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        # etcdctl's watch commands leave quietly on Ctrl-C; others die of the signal.
        return EXIT_OK if streaming else 128 + signal.SIGINT
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`grozd etcdctl [global options] command [command options] [arguments...]`."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(args)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    raise SystemExit(main())
