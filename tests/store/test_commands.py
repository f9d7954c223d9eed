"""Command encoding, the HTTP-request-to-command mapping, error texts, Go-exact output."""

from __future__ import annotations

import pytest

from grozd.store import (
    MESSAGES,
    CommandError,
    EtcdError,
    decode_command,
    encode_command,
    request_command,
)
from grozd.store.gojson import clean_path, go_dumps, go_string, rfc3339nano, ttl_seconds


def test_round_trip_and_defaults():
    cmd = decode_command(
        encode_command("compareAndSwap", "/k", now=12.5, value="v", ttl=3, prev_index=7)
    )
    assert (cmd.op, cmd.key, cmd.now_ns, cmd.value, cmd.ttl, cmd.prev_index) == (
        "compareAndSwap", "/k", 12_500_000_000, "v", 3, 7,
    )
    assert cmd.prev_value == "" and cmd.refresh is False and cmd.dir is False
    expire = decode_command(encode_command("expire", now=1))
    assert expire.op == "expire" and expire.now_ns == 1_000_000_000
    assert decode_command(encode_command("set", "/k", now=1, ttl=0)).ttl == 0
    assert decode_command(encode_command("set", "/k", now=1)).ttl is None


def test_commands_are_small():
    assert len(encode_command("set", "/a/b", now=1_700_000_000.123, value="1")) < 30


@pytest.mark.parametrize(
    "op, params",
    [
        ("frobnicate", {}),
        ("set", {"prev_value": "x"}),
        ("delete", {"value": "x"}),
        ("set", {"ttl": -1}),
        ("set", {"ttl": 1.5}),
        ("set", {"ttl": 10**12}),
    ],
)
def test_bad_commands_are_refused(op, params):
    with pytest.raises(CommandError):
        encode_command(op, "/k", now=1, **params)


def test_garbage_does_not_decode():
    for data in (b"", b"\xc1", b"\x81\xa1o\xa3bad", b"\x90"):
        with pytest.raises(CommandError):
            decode_command(data)


@pytest.mark.parametrize(
    "method, params, op",
    [
        ("POST", {}, "create"),
        ("PUT", {}, "set"),
        ("PUT", {"prev_exist": True}, "update"),
        ("PUT", {"prev_exist": True, "prev_value": "x"}, "compareAndSwap"),
        ("PUT", {"prev_exist": True, "prev_index": 3}, "compareAndSwap"),
        ("PUT", {"prev_exist": False}, "create"),
        ("PUT", {"prev_exist": False, "prev_value": "x"}, "create"),
        ("PUT", {"prev_value": "x"}, "compareAndSwap"),
        ("PUT", {"prev_index": 4}, "compareAndSwap"),
        ("DELETE", {}, "delete"),
        ("DELETE", {"prev_value": "x"}, "compareAndDelete"),
        ("DELETE", {"prev_index": 9, "recursive": True}, "compareAndDelete"),
    ],
)
def test_request_mapping_follows_etcd(method, params, op):
    cmd = decode_command(request_command(method, "/k", now=1, **params))
    assert cmd.op == op
    if method == "POST":
        assert cmd.unique


def test_request_mapping_refuses_reads():
    with pytest.raises(CommandError):
        request_command("GET", "/k", now=1)


def test_every_error_code_has_etcds_text_and_status():
    assert set(MESSAGES) == {100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 200, 201,
                             202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 300, 301,
                             400, 401}
    statuses = {code: EtcdError(code).status for code in MESSAGES}
    assert statuses[100] == 404 and statuses[101] == 412 and statuses[102] == 403
    assert statuses[105] == 412 and statuses[108] == 403 and statuses[110] == 401
    assert statuses[300] == statuses[301] == 500
    assert statuses[104] == statuses[107] == statuses[401] == statuses[209] == 400
    assert EtcdError(100, "/x", 3).to_json() == (
        b'{"errorCode":100,"message":"Key not found","cause":"/x","index":3}\n'
    )
    assert EtcdError(102, "", 4).to_json() == (
        b'{"errorCode":102,"message":"Not a file","index":4}\n'
    )
    assert MESSAGES[401] == "The event in requested index is outdated and cleared"
    assert MESSAGES[212] == "A TTL must be provided on refresh"


def test_go_json_escaping():
    tricky = 'q"b\\s</x>&\n\r\t\x01\x08\x0c\x7f\u2028\u2029é键'
    expected = (
        '"q\\"b\\\\s\\u003c/x\\u003e\\u0026\\n\\r\\t\\u0001\\u0008\\u000c\x7f'
        '\\u2028\\u2029é键"'
    )
    assert go_string(tricky) == expected
    assert go_dumps({"v": tricky, "n": [1, True]}) == '{"v":' + expected + ',"n":[1,true]}'
    assert go_dumps({"v": "\\b and \\f stay"}) == '{"v":"\\\\b and \\\\f stay"}'


def test_times_and_ttls_like_go():
    assert rfc3339nano(1_796_528_097_647_839_529) == "2026-12-06T03:34:57.647839529Z"
    assert rfc3339nano(1_796_528_097_100_000_000) == "2026-12-06T03:34:57.1Z"
    assert rfc3339nano(1_796_528_097_000_000_000) == "2026-12-06T03:34:57Z"
    second = 1_000_000_000
    assert ttl_seconds(5 * second, 0) == 5
    assert ttl_seconds(5 * second + 1, 0) == 6
    assert ttl_seconds(5 * second, 5 * second) == 0
    assert ttl_seconds(0, second // 2) == 0
    assert ttl_seconds(0, 3 * second // 2) == -1


def test_clean_path():
    assert clean_path("") == "/"
    assert clean_path("a//b/./c/..") == "/a/b"
    assert clean_path("/../x/") == "/x"
    # Clean keys come back as they are; anything that only looks clean is cleaned.
    for clean in ("/", "/a", "/a/b", "/a/.hidden", "/a/b.c", "/a..b"):
        assert clean_path(clean) == clean
    assert clean_path("/a/b/") == "/a/b"
    assert clean_path("/a/b/.") == "/a/b"
    assert clean_path("/a/b/..") == "/a"
    assert clean_path("/a/./b") == "/a/b"


def test_invalid_utf8_stays_byte_exact_and_shows_as_go_does():
    from grozd.store import Store

    key = b"/bad\xff".decode("utf-8", "surrogateescape")
    value = b"\xfe\xe9\x94\xae".decode("utf-8", "surrogateescape")
    store = Store()
    made = store.apply(1, encode_command("set", key, value=value, now=1))
    assert made.to_json() == (
        '{"action":"set","node":{"key":"/bad\\ufffd","value":"\\ufffd键",'
        '"modifiedIndex":1,"createdIndex":1}}\n'
    ).encode()
    # Compare-and-swap compares the bytes, not the replacement characters.
    other = "\ufffd\u952e"
    assert store.apply(2, encode_command("compareAndSwap", key, value="x", prev_value=other,
                                         now=1)).code == 101
    assert store.apply(3, encode_command("compareAndSwap", key, value="x", prev_value=value,
                                         now=1)).action == "compareAndSwap"
    copy = Store()
    copy.restore(store.snapshot())
    assert copy.get(key).node["value"] == "x"
