"""The etcdctl invocations compared between the real etcdctl and `grozd etcdctl`, against
real etcd and against grozd, run in order on a fresh single-member server.

Each step's arguments may hold placeholders, filled in per server just before the step:
``{EP}`` the client URL, ``{DEAD}`` a closed loopback port's URL, ``{i+N}`` the server's
starting X-Etcd-Index plus N, ``{mi:/key}`` the key's current modifiedIndex. Unless a step
says otherwise, ``--endpoints {EP}`` goes in front of its arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    """One invocation; ``unordered`` compares its output lines as a set (etcd's unsorted
    listings come in map order); ``env`` adds environment variables."""

    args: tuple[str, ...]
    stdin: str = ""
    endpoints: bool = True
    unordered: bool = False
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def name(self) -> str:
        return " ".join(self.args)


def s(*args: str, **kw: object) -> Step:
    return Step(tuple(args), **kw)  # type: ignore[arg-type]


STEPS: list[Step] = [
    # keys: set / get / mk / update, every output format
    s("get", "/foo"),
    s("set", "/foo", "bar"),
    s("get", "/foo"),
    s("-o", "extended", "get", "/foo"),
    s("-o", "json", "get", "/foo"),
    s("--output", "json", "get", "/nope"),
    s("set", "/foo/bar", "x"),
    s("mk", "/foo", "baz"),
    s("mk", "/new", "v"),
    s("-o", "extended", "mk", "/new2", "v", "--ttl", "100"),
    s("-o", "json", "get", "/new2"),
    s("-o", "json", "set", "/new2", "w"),
    s("update", "/nokey", "v"),
    s("update", "/foo", "bar2"),
    s("-o", "extended", "update", "/foo", "bar3"),
    s("-o", "json", "update", "/foo", "bar4", "--ttl", "100"),
    s("set", "/foo", "bar5", "--swap-with-value", "wrong"),
    s("set", "/foo", "bar5", "--swap-with-value", "bar4"),
    s("set", "/foo", "bar6", "--swap-with-index", "1"),
    s("-o", "extended", "set", "/foo", "bar6", "--swap-with-index", "{mi:/foo}"),
    s("set", "/foo", "bar7", "--swap-with-value", "bar6", "--swap-with-index", "1"),
    s("set", "/neg", "v", "--ttl", "-5"),
    s("-o", "extended", "get", "/neg"),
    # directories
    s("mkdir", "/dir"),
    s("mkdir", "/dir"),
    s("mkdir", "/dir/sub", "--ttl", "100"),
    s("setdir", "/dir"),
    s("setdir", "/dir2", "--ttl", "100"),
    s("updatedir", "/dir2", "--ttl", "200"),
    s("updatedir", "/nodir"),
    s("updatedir", "/foo"),
    s("-o", "extended", "ls", "/dir2"),
    s("-o", "json", "ls", "/dir2"),
    s("get", "/dir"),
    s("-o", "json", "get", "/dir"),
    s("set", "/dir", "x"),
    s("update", "/dir", "x"),
    # in-order keys
    s("mk", "--in-order", "/queue", "job1"),
    s("-o", "extended", "mk", "--in-order", "/queue", "job2"),
    s("mk", "/queue", "job3", "--in-order", "--ttl", "100"),
    s("mk", "--in-order", "/foo", "x"),
    s("ls", "--sort", "/queue"),
    s("-o", "json", "ls", "--sort", "/queue"),
    # listings
    s("set", "/t/a", "1"),
    s("set", "/t/b/c", "2"),
    s("set", "/t/b/d", "3"),
    s("ls", "--sort", "-r", "-p", "/t"),
    s("ls", "--sort", "--recursive", "/t"),
    s("ls", "/t", "--sort", "-p"),
    s("ls", "/t/a"),
    s("ls", "-r", "/t", unordered=True),
    s("ls", unordered=True),
    s("ls", "-p", "/", unordered=True),
    s("ls", "--quorum", "--sort", "/t"),
    s("-o", "extended", "ls", "--sort", "/t"),
    s("-o", "json", "ls", "--sort", "-r", "/t"),
    s("ls", "/missing"),
    s("get", "--quorum", "/t/a"),
    s("get", "-q", "--sort", "/t/a"),
    # removal
    s("rm", "/foo", "--with-value", "nope"),
    s("rm", "/foo", "--with-index", "1"),
    s("-o", "extended", "rm", "/foo", "--with-index", "{mi:/foo}"),
    s("rm", "/dir"),
    s("rmdir", "/dir"),
    s("rm", "--dir", "/dir/sub"),
    s("rm", "--dir", "/dir"),
    s("rmdir", "/t"),
    s("rm", "/t"),
    s("rmdir", "/new"),
    s("-o", "json", "rm", "/new2"),
    s("rm", "-r", "/t"),
    s("rm", "/t"),
    s("rm", "/queue", "--recursive"),
    # watch (one event, from a past index, so it returns at once; a bool flag before the
    # key would end the flags there, as urfave/cli's reordering leaves it)
    s("watch", "/foo", "--after-index", "{i+1}"),
    s("watch", "--after-index", "{i+1}", "--recursive", "/"),
    s("-o", "extended", "watch", "/new", "--after-index", "{i+1}"),
    s("-o", "json", "watch", "/t", "-r", "--after-index", "{i+1}"),
    # values from stdin, and values that look like flags
    s("set", "/stdin", stdin="piped value\n"),
    s("get", "/stdin"),
    s("mk", "/stdin2", stdin="x"),
    s("set", "/novalue"),
    s("set", "--", "/dash", "-v"),
    s("set", "/dash", "-x"),
    s("set", "/dash", "--ttl", "100", "-v"),
    s("get", "/dash"),
    # odd keys and values: escaping in URLs, JSON and --debug
    s("set", "/sp ace/ü+x&y", 'v<&>"\t'),
    s("-o", "json", "get", "/sp ace/ü+x&y"),
    s("ls", "--sort", "/sp ace"),
    s("--debug", "get", "/sp ace/ü+x&y"),
    s("get", "/sp ace/../dash"),
    s("get", "dash"),
    s("set", "/", "x"),
    s("rm", "/"),
    s("set", "/_hidden", "h"),
    s("mkdir", "/_hdir"),
    s("get", "/_hidden"),
    s("ls", "--sort", "-p", "/"),
    s("set", "/a//b/./c", "x"),
    s("ls", "--sort", "-r", "/a"),
    s("set", "/empty", ""),
    s("-o", "json", "get", "/empty"),
    s("mkdir", "/empty/sub"),
    s("rmdir", "/empty"),
    s("mk", "--in-order", "/empty", "x"),
    s("mk", "--in-order", "/fresh/q", "x"),
    s("set", "/empty", "y", "--swap-with-index", "0", "--swap-with-value", ""),
    s("setdir", "/fresh", "--ttl", "100"),
    s("-o", "extended", "ls", "/fresh"),
    s("rm", "-r", "/fresh"),
    s("setdir", "/dash"),
    s("mkdir", "/dash/sub"),
    s("set", "/slash/", "v"),
    s("get", "/slash"),
    s("mkdir", "/nd/a"),
    s("set", "/nd/a/b", "1"),
    s("rm", "--dir", "/nd/a"),
    s("rm", "--dir", "--recursive", "/nd"),
    s("rm", "-r", "/slash"),
    s("-o", "json", "watch", "--after-index", "{i+1}", "/nd/a/b"),
    s("-o", "extended", "watch", "--after-index", "{i+1}", "-r", "/nd"),
    s("set", "/big", "v", "--ttl", "4294967296"),
    s("set", "/big", "v", "--ttl", "9223372036854775807"),
    s("mkdir", "/dash/x", "--ttl", "100"),
    # missing arguments, bad flags, unknown commands, help
    s("get"), s("set"), s("mk"), s("mkdir"), s("setdir"), s("update"), s("updatedir"),
    s("rm"), s("rmdir"), s("watch"), s("exec-watch", "/k"),
    s("set", "/k", "v", "--ttl", "abc"),
    s("set", "/k", "v", "--ttl"),
    s("set", "/k", "v", "--ttl", "99999999999999999999"),
    s("get", "--sort=maybe", "/dash"),
    s("get", "--sort=true", "/dash"),
    s("get", "--bogus", "/dash"),
    s("get", "/dash", "--bogus"),
    s("get", "---x", "/dash"),
    s("--bogus", "get", "/dash", endpoints=False),
    s("-o", endpoints=False),
    s("--timeout", "3", "get", "/dash", endpoints=False),
    s("nosuchcmd"),
    s("help", "nosuch"),
    s("help", "get", endpoints=False),
    s("h", "set", endpoints=False),
    s("get", "-h"),
    s("member", "nosuch"),
    s("member", endpoints=False),
    s("member", "add", "--help"),
    s("--version", endpoints=False),
    s("-v", endpoints=False),
    s("-o", "xml", "get", "/dash"),
    s("-o", "xml", "set", "/xml", "y"),
    # members and health
    s("member", "list"),
    s("member", "list", "extra"),
    s("member", "add"),
    s("member", "add", "m2", "foo"),
    s("member", "add", "m2", "http://127.0.0.1:1/path"),
    s("member", "add", "m2", "http://127.0.0.1"),
    s("member", "remove"),
    s("member", "remove", "abc"),
    s("member", "remove", "node1"),
    s("member", "update"),
    s("member", "update", "abc", "http://127.0.0.1:1"),
    s("member", "update", "zzz", "http://127.0.0.1:1"),
    s("cluster-health"),
    s("cluster-health", "extra"),
    # --debug, --no-sync, endpoints from flags and the environment
    s("--debug", "get", "/dash"),
    s("--debug", "--no-sync", "set", "/d1", "v", "--ttl", "5", "--swap-with-value", "x"),
    s("--debug", "mkdir", "/dd", "--ttl", "100"),
    s("--debug", "rm", "/dd", "--dir"),
    s("--debug", "mk", "--in-order", "/dq", "x"),
    s("--debug", "update", "/dash", "v", "--ttl", "100"),
    s("--debug", "member", "list"),
    s("--debug", "cluster-health"),
    s("--no-sync", "get", "/dash"),
    s("get", "/dash", endpoints=False, env=(("ETCDCTL_ENDPOINTS", "{EP}"),)),
    s("get", "/dash", endpoints=False, env=(("ETCDCTL_ENDPOINT", "{EP}"),)),
    s("--endpoint", "{EP}", "get", "/dash", endpoints=False),
    s("-C", "{EP}", "get", "/dash", endpoints=False),
    s("--endpoints", "{DEAD}", "get", "/dash", endpoints=False,
      env=(("ETCDCTL_ENDPOINTS", "{EP}"),)),
    # unreachable endpoints
    s("--endpoints", "{DEAD}", "get", "/dash", endpoints=False),
    s("--no-sync", "--endpoints", "{DEAD}", "get", "/dash", endpoints=False),
    s("--no-sync", "--endpoints", "{DEAD}", "mk", "/x", "v", endpoints=False),
    s("--no-sync", "--endpoints", "{DEAD}", "set", "/x", "v", endpoints=False),
    s("--endpoints", "{DEAD}", "member", "list", endpoints=False),
    s("--endpoints", "{DEAD}", "cluster-health", endpoints=False),
    s("--endpoints", "127.0.0.1:1", "get", "/dash", endpoints=False),
    s("--total-timeout", "0s", "get", "/dash"),
    s("--no-sync", "--total-timeout", "0s", "get", "/dash"),
]


def _rel(n: int, base: int) -> str:
    return f"<i{n - base:+d}>"


def normalise(text: str, base: int, server_urls: dict[str, str], unordered: bool) -> str:
    """Replace what differs between two healthy servers: indices (relative to the
    starting index), member IDs, URLs, TTLs counting down, expiration times; and the
    top-level help, which grozd shortens to the commands and flags it has."""
    text = re.sub(r"NAME:\n   etcdctl - A simple command line client for etcd\.\n.*",
                  "<app help>\n", text, flags=re.S)
    for url, name in server_urls.items():
        text = text.replace(url, name)
        text = text.replace(url.removeprefix("http://"), name.strip("<>") + "-hostport")
    rel = lambda m: m.group(1) + _rel(int(m.group(2)), base) + m.group(3)  # noqa: E731
    patterns = [
        r"(Created-Index: |Modified-Index: |\bIndex: |ETCD_WATCH_MODIFIED_INDEX=)(\d+)()",
        r'("createdIndex":|"modifiedIndex":)([1-9]\d*)()',
        r"(\) \[)(\d+)(\]$)",
        r"(\[\S+ != )(\d+)(\])",
        r"(/)(\d{20})(\b)",
        r"(prevIndex=|waitIndex=)([1-9]\d*)()",
    ]
    for pattern in patterns:
        text = re.sub(pattern, rel, text, flags=re.M)
    text = re.sub(r"\b[0-9a-f]{13,16}\b", "<id>", text)
    text = re.sub(r"(TTL: |\"ttl\":|ttl=)[1-9]\d*", r"\1<ttl>", text)
    text = re.sub(r'"expiration":"[^"]+"', '"expiration":"<time>"', text)
    if unordered:
        text = "\n".join(sorted(text.splitlines()))
    return text
