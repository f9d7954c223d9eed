"""Pieces of the client that need no server: paths, error mapping, result parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from grozd.client import (
    Client,
    EtcdError,
    EventIndexClearedError,
    InvalidRequestError,
    KeyNotFoundError,
    Node,
    Response,
    TestFailedError,
    error_class,
    key_path,
)
from grozd.client.errors import error_from_response


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("foo", "/v2/keys/foo"),
        ("/foo/bar", "/v2/keys/foo/bar"),
        ("/", "/v2/keys/"),
        ("", "/v2/keys/"),
        ("//a///b/", "/v2/keys/a/b"),
        ("/a/./b/../c", "/v2/keys/a/c"),
        ("/a b/c", "/v2/keys/a%20b/c"),
        ("/ü", "/v2/keys/%C3%BC"),
        ("/q?x#y%z+", "/v2/keys/q%3Fx%23y%25z%2B"),
    ],
)
def test_key_path(key, path):
    assert key_path(key) == path


def test_error_classes_by_code():
    assert error_class(100) is KeyNotFoundError
    assert error_class(101) is TestFailedError
    assert error_class(401) is EventIndexClearedError
    assert error_class(209) is InvalidRequestError
    assert error_class(999) is EtcdError


def test_error_from_etcd_json():
    err = error_from_response(
        400, b'{"errorCode":401,"message":"outdated","cause":"[1/2]","index":2000}'
    )
    assert type(err) is EventIndexClearedError
    assert (err.error_code, err.message, err.cause, err.index, err.status) == (
        401,
        "outdated",
        "[1/2]",
        2000,
        400,
    )
    assert "errorCode 401" in str(err)


def test_error_from_non_etcd_bodies():
    plain = error_from_response(404, b"404 page not found\n")
    assert type(plain) is EtcdError and plain.error_code is None
    assert plain.message == "404 page not found" and plain.status == 404
    message = error_from_response(403, b'{"message":"not current leader"}')
    assert message.message == "not current leader"
    unknown = error_from_response(400, b'{"errorCode":777,"message":"new"}')
    assert type(unknown) is EtcdError and unknown.error_code == 777


def test_node_and_response_from_json():
    data = {
        "action": "set",
        "node": {
            "key": "/d",
            "dir": True,
            "nodes": [
                {
                    "key": "/d/k",
                    "value": "v",
                    "expiration": "2026-01-02T03:04:05.123456789Z",
                    "ttl": 7,
                    "modifiedIndex": 9,
                    "createdIndex": 8,
                }
            ],
            "modifiedIndex": 5,
            "createdIndex": 5,
        },
        "prevNode": {"key": "/d", "dir": True, "modifiedIndex": 4, "createdIndex": 4},
    }
    resp = Response.from_json(
        data, {"x-etcd-index": "10", "x-raft-index": "20", "x-raft-term": "3"}
    )
    assert (resp.etcd_index, resp.raft_index, resp.raft_term) == (10, 20, 3)
    assert resp.node.dir and resp.prev_node.modified_index == 4
    (child,) = resp.node.nodes
    assert child == Node(
        key="/d/k",
        value="v",
        created_index=8,
        modified_index=9,
        expiration=datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        ttl=7,
    )
    assert child.name == "k"
    assert [n.key for n in resp.node.walk()] == ["/d", "/d/k"]


def test_endpoints_parsing():
    c = Client("http://127.0.0.1:2379,127.0.0.1:4001, http://127.0.0.1:2379")
    assert c.endpoints == ["http://127.0.0.1:2379", "http://127.0.0.1:4001"]
    with pytest.raises(ValueError):
        Client(["https://127.0.0.1:2379"])
    with pytest.raises(ValueError):
        Client([])
