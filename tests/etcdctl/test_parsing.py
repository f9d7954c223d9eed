"""`grozd etcdctl`'s argument handling and Go-compatible formatting, without a server."""

from __future__ import annotations

import pytest

from grozd.cli import etcdctl as ctl
from tests.etcdctl.servers import run_grozd

SET_FLAGS = [ctl.TTL, ctl.Flag(("swap-with-value",), "string", "", ""), ctl.HELP_FLAG]


@pytest.mark.parametrize(("args", "want"), [
    (["/foo/bar", "Hello world", "--ttl", "60"], ["--ttl", "60", "/foo/bar", "Hello world"]),
    (["--", "/k", "-v", "--ttl", "5"], ["--", "/k", "-v", "--ttl", "5"]),
    (["/k", "--ttl", "5", "-v"], ["--ttl", "5", "/k", "-v"]),
    (["/k", "--bogus"], ["/k", "--bogus"]),
    (["/k", "v", "--", "--ttl"], ["--", "/k", "v", "--ttl"]),
    (["/k", "--ttl=5", "v"], ["--ttl=5", "/k", "v"]),
])
def test_command_flags_move_ahead_of_arguments(args: list[str], want: list[str]) -> None:
    assert ctl.reorder_args(SET_FLAGS, args) == want


def test_flags_after_arguments_are_parsed() -> None:
    opts, args = ctl.go_flag_parse(SET_FLAGS, ctl.reorder_args(
        SET_FLAGS, ["/foo/bar", "Hello world", "--ttl", "60"]))
    assert (opts["ttl"], args) == (60, ["/foo/bar", "Hello world"])


@pytest.mark.parametrize(("args", "message"), [
    (["--ttl", "abc"], 'invalid value "abc" for flag -ttl: parse error'),
    (["--ttl", "99999999999999999999"],
     'invalid value "99999999999999999999" for flag -ttl: value out of range'),
    (["--ttl"], "flag needs an argument: -ttl"),
    (["--nope"], "flag provided but not defined: -nope"),
    (["---x"], "bad flag syntax: ---x"),
])
def test_flag_errors_are_worded_like_go(args: list[str], message: str) -> None:
    with pytest.raises(ctl.UsageError, match=message):
        ctl.go_flag_parse(SET_FLAGS, args)


@pytest.mark.parametrize(("text", "seconds"), [("2s", 2.0), ("1m30s", 90.0), ("0", 0.0),
                                               ("1.5h", 5400.0), ("300ms", 0.3)])
def test_durations_parse_like_go(text: str, seconds: float) -> None:
    assert ctl.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["3", "", "s", "1x", "--1s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ctl.UsageError):
        ctl.parse_go_duration(text)


@pytest.mark.parametrize(("ttl", "sent"), [(60, 60), (0, None), (-5, None),
                                           (9223372036854775807, None),
                                           (18446744075, 1)])
def test_ttl_wraps_like_the_go_client(ttl: int, sent: int | None) -> None:
    assert ctl.go_ttl(ttl) == sent


@pytest.mark.parametrize(("raw", "parsed", "want"), [
    (["/foo/bar", "--", "sh", "-c", "env"], ["/foo/bar", "sh", "-c", "env"],
     ("/foo/bar", ["sh", "-c", "env"])),
    (["sh", "-c", "env", "/foo/bar"], ["sh", "-c", "env", "/foo/bar"],
     ("/foo/bar", ["sh", "-c", "env"])),
    (["--recursive", "/foo", "--", "sh", "-c", "env"], ["/foo", "--", "sh", "-c", "env"],
     ("/foo", ["sh", "-c", "env"])),
])
def test_exec_watch_finds_key_and_command(raw: list[str], parsed: list[str],
                                          want: tuple[str, list[str]]) -> None:
    assert ctl.split_exec_args(raw, parsed) == want


@pytest.mark.parametrize(("key", "path"), [("foo", "/v2/keys/foo"), ("/a//b/../c", "/v2/keys/a/c"),
                                           ("/dir/", "/v2/keys/dir/"), ("/", "/v2/keys/")])
def test_keys_paths_are_cleaned_like_go(key: str, path: str) -> None:
    assert ctl.keys_path(key) == path


def test_go_json_and_quoting() -> None:
    assert ctl.go_json_string('a<b>&"\n\x01') == '"a\\u003cb\\u003e\\u0026\\"\\n\\u0001"'
    assert ctl.go_quote('say "hi"\n') == '"say \\"hi\\"\\n"'
    assert ctl.go_escape_path("/sp ace/ü+x&y") == "/sp%20ace/%C3%BC+x&y"
    assert ctl.go_time("2026-11-29T04:08:53.299720500Z") == "2026-11-29T04:08:53.2997205Z"


def test_endpoint_without_scheme_gets_http_or_a_go_error() -> None:
    assert ctl.parse_endpoint("localhost/") == "http://localhost/"
    with pytest.raises(ValueError, match="first path segment in URL cannot contain colon"):
        ctl.parse_endpoint("127.0.0.1:2379")


def test_help_and_version_need_no_server() -> None:
    r = run_grozd(["--version"])
    assert (r.stdout, r.code) == ("etcdctl version: 3.4.23\nAPI version: 2\n", 0)
    r = run_grozd([])
    assert r.code == 0 and "exec-watch" in r.stdout and "cluster-health" in r.stdout
    r = run_grozd(["backup"])
    assert (r.stderr, r.code) == ("No help topic for 'backup'\n", 3)
