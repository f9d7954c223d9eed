"""The keyspace state machine: every action, every error, TTLs, hidden and in-order keys."""

from __future__ import annotations

import json

import pytest

from grozd.store import EtcdError, Event, Store, encode_command

T0 = 1_700_000_000.0  # a fixed "now" for commands


class Driver:
    """Feeds commands to a store with increasing log indices."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store or Store()
        self.log = self.store.applied_index

    def __call__(self, op: str, key: str = "/", now: float = T0, **params):
        self.log += 1
        return self.store.apply(self.log, encode_command(op, key, now=now, **params))


@pytest.fixture
def do() -> Driver:
    return Driver()


def body(result) -> dict:
    return json.loads(result.to_json())


# -- set, get -------------------------------------------------------------------------------


def test_set_creates_then_replaces(do):
    first = do("set", "/a", value="1")
    assert isinstance(first, Event) and first.is_created
    assert body(first) == {
        "action": "set",
        "node": {"key": "/a", "value": "1", "modifiedIndex": 1, "createdIndex": 1},
    }
    second = do("set", "/a", value="2")
    assert not second.is_created
    # A set replaces the node: new createdIndex, old node as prevNode.
    assert second.node == {"key": "/a", "value": "2", "modifiedIndex": 2, "createdIndex": 2}
    assert second.prev_node == first.node
    assert second.etcd_index == do.store.index == 2


def test_get_file_and_directory_listing(do):
    do("set", "/d/b", value="2")
    do("set", "/d/a", value="1")
    do("set", "/d/sub/x", value="3")
    plain = do.store.get("/d")
    assert plain.action == "get" and plain.etcd_index == 3
    assert [n["key"] for n in plain.node["nodes"]] == ["/d/b", "/d/a", "/d/sub"]
    assert "nodes" not in plain.node["nodes"][2]  # one level unless recursive
    tree = do.store.get("/d", recursive=True, sorted=True)
    assert [n["key"] for n in tree.node["nodes"]] == ["/d/a", "/d/b", "/d/sub"]
    assert tree.node["nodes"][2]["nodes"][0]["key"] == "/d/sub/x"
    assert do.store.get("/d/a").node["value"] == "1"


def test_root_get_has_no_key_or_indices(do):
    assert body(do.store.get("/")) == {"action": "get", "node": {"dir": True}}
    do("set", "/x", value="1")
    assert body(do.store.get("", recursive=True))["node"]["nodes"][0]["key"] == "/x"


def test_intermediate_directories_are_created_with_the_write_index(do):
    do("set", "/one", value="x")
    do("set", "/a/b/c", value="1")
    tree = do.store.get("/a", recursive=True)
    assert tree.node["createdIndex"] == 2
    assert tree.node["nodes"][0]["createdIndex"] == 2


def test_keys_are_cleaned_like_go_paths(do):
    do("set", "//a/./b/../c/", value="1")
    assert do.store.get("/a/c").node["key"] == "/a/c"


def test_set_dir_and_set_over_dir(do):
    made = do("set", "/d", dir=True)
    assert made.node == {"key": "/d", "dir": True, "modifiedIndex": 1, "createdIndex": 1}
    again = do("set", "/d", dir=True)
    assert again == EtcdError(102, "/d", 1)
    assert do("set", "/d", value="x") == EtcdError(102, "/d", 1)
    # A file can be replaced by a directory.
    do("set", "/f", value="1")
    assert do("set", "/f", dir=True).node["dir"] is True


def test_get_errors_name_the_first_missing_component(do):
    do("set", "/f", value="1")
    with pytest.raises(EtcdError) as missing:
        do.store.get("/no/such/key")
    assert (missing.value.code, missing.value.cause, missing.value.index) == (100, "/no", 1)
    with pytest.raises(EtcdError) as not_dir:
        do.store.get("/f/x")
    assert (not_dir.value.code, not_dir.value.cause) == (104, "/f")
    assert do("set", "/f/x", value="1") == EtcdError(104, "/f", 1)


# -- create, update ---------------------------------------------------------------------------


def test_create_and_node_exist(do):
    created = do("create", "/k", value="1")
    assert created.action == "create" and created.is_created
    assert do("create", "/k", value="2") == EtcdError(105, "/k", 1)
    assert do("create", "/d", dir=True).node["dir"] is True


def test_in_order_keys_are_named_after_the_index(do):
    do("set", "/other", value="x")
    first = do("create", "/q", value="a", unique=True)
    second = do("create", "/q", value="b", unique=True)
    assert first.node["key"] == "/q/00000000000000000002"
    assert second.node["key"] == "/q/00000000000000000003"
    root_level = do("create", "/", value="c", unique=True)
    assert root_level.node["key"] == "/00000000000000000004"
    assert do("create", "/other", value="x", unique=True) == EtcdError(104, "/other", 4)


def test_update(do):
    assert do("update", "/k", value="1") == EtcdError(100, "/k", 0)
    do("set", "/k", value="1", ttl=100)
    updated = do("update", "/k", value="2")
    assert updated.action == "update" and not updated.is_created
    # An update without ttl makes the key permanent, as in etcd.
    assert updated.node == {"key": "/k", "value": "2", "modifiedIndex": 2, "createdIndex": 1}
    assert updated.prev_node["ttl"] == 100


def test_update_of_a_directory_reports_an_index_it_does_not_keep(do):
    do("set", "/d", dir=True)
    updated = do("update", "/d", ttl=50)
    assert updated.node["modifiedIndex"] == 2 and updated.node["ttl"] == 50
    assert do.store.get("/d").node["modifiedIndex"] == 1  # etcd's quirk, kept
    assert do("update", "/d", value="x") == EtcdError(102, "/d", 2)


# -- compare and swap / delete -----------------------------------------------------------------


def test_compare_and_swap(do):
    do("set", "/k", value="one")
    ok = do("compareAndSwap", "/k", value="two", prev_value="one")
    assert ok.action == "compareAndSwap"
    assert ok.node == {"key": "/k", "value": "two", "modifiedIndex": 2, "createdIndex": 1}
    assert do("compareAndSwap", "/k", value="x", prev_value="one") == EtcdError(
        101, "[one != two]", 2
    )
    assert do("compareAndSwap", "/k", value="x", prev_index=1) == EtcdError(101, "[1 != 2]", 2)
    assert do("compareAndSwap", "/k", value="x", prev_index=1, prev_value="no") == EtcdError(
        101, "[no != two] [1 != 2]", 2
    )
    assert do("compareAndSwap", "/k", value="3", prev_index=2).node["value"] == "3"
    assert do("compareAndSwap", "/missing", value="x", prev_value="y").code == 100
    do("set", "/d", dir=True)
    assert do("compareAndSwap", "/d", value="x", prev_value="y") == EtcdError(102, "/d", 4)


def test_compare_and_delete(do):
    do("set", "/k", value="one")
    assert do("compareAndDelete", "/k", prev_value="two") == EtcdError(101, "[two != one]", 1)
    gone = do("compareAndDelete", "/k", prev_index=1)
    assert gone.action == "compareAndDelete"
    assert gone.node == {"key": "/k", "modifiedIndex": 2, "createdIndex": 1}
    assert gone.prev_node["value"] == "one"
    assert do("compareAndDelete", "/k", prev_value="one").code == 100
    do("set", "/d/x", value="1")
    assert do("compareAndDelete", "/d", prev_value="x") == EtcdError(102, "/d", 3)
    # The root: etcd's internal prefix makes the cause empty.
    assert do("compareAndDelete", "/", prev_value="x") == EtcdError(102, "", 3)


# -- delete -----------------------------------------------------------------------------------


def test_delete_file_dir_and_recursive(do):
    do("set", "/f", value="1")
    gone = do("delete", "/f")
    assert gone.node == {"key": "/f", "modifiedIndex": 2, "createdIndex": 1}
    do("set", "/d/a/b", value="1")
    assert do("delete", "/d") == EtcdError(102, "/d", 3)
    assert do("delete", "/d", dir=True) == EtcdError(108, "/d", 3)
    tree = do("delete", "/d", recursive=True)
    assert tree.node == {"key": "/d", "dir": True, "modifiedIndex": 4, "createdIndex": 3}
    assert do("delete", "/d").code == 100
    do("set", "/e", dir=True)
    assert do("delete", "/e", dir=True).action == "delete"
    do("set", "/g", value="1")
    assert do("delete", "/g", dir=True).action == "delete"  # dir=true on a file is fine


def test_root_is_read_only(do):
    for op, params in [
        ("set", {"value": "x"}),
        ("create", {"value": "x"}),
        ("update", {"value": "x"}),
        ("compareAndSwap", {"value": "x", "prev_value": "y"}),
        ("delete", {"recursive": True}),
    ]:
        assert do(op, "/", **params) == EtcdError(107, "/", 0), op


# -- TTLs -------------------------------------------------------------------------------------


def test_ttl_expiration_and_rounding(do):
    made = do("set", "/k", value="1", ttl=10, now=T0)
    assert made.node["ttl"] == 10
    assert made.node["expiration"] == "2023-11-14T22:13:30Z"
    assert do.store.get("/k", now=T0 + 0.5).node["ttl"] == 10  # rounded up
    assert do.store.get("/k", now=T0 + 9.2).node["ttl"] == 1
    assert "ttl" not in do.store.get("/k", now=T0 + 10).node  # 0 is omitted
    assert do.store.get("/k", now=T0 + 12.5).node["ttl"] == -2  # Go's truncation
    do("set", "/n", value="1", ttl=5, now=T0 + 0.25)
    assert do.store.get("/n").node["expiration"] == "2023-11-14T22:13:25.25Z"


def test_ttl_zero_expires_at_once(do):
    made = do("set", "/k", value="1", ttl=0)
    assert "ttl" not in made.node and made.node["expiration"]
    assert do.store.next_expiry() == T0
    assert [e.action for e in do("expire", now=T0)] == ["expire"]


def test_removing_and_changing_a_ttl(do):
    do("set", "/k", value="1", ttl=10)
    assert do.store.has_ttl_keys()
    permanent = do("set", "/k", value="2")
    assert "expiration" not in permanent.node
    assert not do.store.has_ttl_keys() and do.store.next_expiry() is None
    do("update", "/k", value="3", ttl=20)
    assert do.store.next_expiry() == T0 + 20
    do("compareAndSwap", "/k", value="4", prev_value="3", ttl=5)
    assert do.store.next_expiry() == T0 + 5
    do("update", "/k", value="5")
    assert do.store.next_expiry() is None


def test_refresh_keeps_the_value_and_tells_no_watcher(do):
    do("set", "/k", value="v", ttl=10)
    watcher = do.store.watch("/k")
    refreshed = do("update", "/k", ttl=100, refresh=True)
    assert refreshed.node["value"] == "v" and refreshed.node["ttl"] == 100
    assert watcher.pending == 0 and not watcher.closed
    by_set = do("set", "/k", ttl=200, refresh=True)
    assert by_set.action == "set" and by_set.node["value"] == "v"
    assert by_set.node["createdIndex"] == 3  # a set replaces the node, as etcd does
    by_cas = do("compareAndSwap", "/k", ttl=300, refresh=True, prev_value="v")
    assert by_cas.node["value"] == "v" and watcher.pending == 0
    assert do("set", "/missing", ttl=5, refresh=True).code == 100
    # Refreshes are in the history (indices stay contiguous) but never delivered.
    assert do.store.watch("/k", wait_index=2).pending == 0


def test_expire_deletes_due_keys_in_order(do):
    do("set", "/late", value="1", ttl=30)
    do("set", "/b", value="1", ttl=10)
    do("set", "/a", value="1", ttl=10)
    do("set", "/forever", value="1")
    assert do("expire", now=T0 + 9.999) == []
    expired = do("expire", now=T0 + 10)
    # Same expiry time: ordered by key, which every member agrees on.
    assert [e.node["key"] for e in expired] == ["/a", "/b"]
    assert [e.index for e in expired] == [5, 6]
    assert expired[0].node == {"key": "/a", "modifiedIndex": 5, "createdIndex": 3}
    assert expired[0].prev_node["value"] == "1" and "ttl" not in expired[0].prev_node
    assert do.store.next_expiry() == T0 + 30
    assert do.store.counters["expireCount"] == 2


def test_expiring_a_directory_takes_its_subtree(do):
    do("set", "/d", dir=True, ttl=5)
    do("set", "/d/child", value="1", ttl=50)
    watcher = do.store.watch("/d/child")
    expired = do("expire", now=T0 + 6)
    assert [e.node for e in expired] == [
        {"key": "/d", "dir": True, "modifiedIndex": 3, "createdIndex": 1}
    ]
    assert watcher.take().action == "expire"
    assert do.store.next_expiry() is None  # the child's TTL went with it
    with pytest.raises(EtcdError):
        do.store.get("/d/child")


def test_ttl_heap_survives_many_refreshes(do):
    do("set", "/k", value="1", ttl=10)
    for i in range(500):
        do("update", "/k", ttl=10 + i, refresh=True)
    assert len(do.store._ttl_heap) < 100
    assert do.store.next_expiry() == T0 + 509


# -- hidden keys ------------------------------------------------------------------------------


def test_hidden_keys_are_left_out_of_listings(do):
    do("set", "/d/_hidden", value="h")
    do("set", "/d/seen", value="s")
    do("set", "/d/_hdir/x", value="x")
    assert [n["key"] for n in do.store.get("/d", recursive=True).node["nodes"]] == ["/d/seen"]
    assert do.store.get("/d/_hidden").node["value"] == "h"
    assert do.store.get("/d/_hdir", recursive=True).node["nodes"][0]["key"] == "/d/_hdir/x"


# -- errors as values ---------------------------------------------------------------------------


def test_bad_command_bytes_are_a_value_not_a_crash(do):
    result = do.store.apply(1, b"\x93not a command")
    assert isinstance(result, EtcdError) and result.code == 300
    assert do.store.applied_index == 1


def test_log_indices_must_increase(do):
    do("set", "/a", value="1")
    with pytest.raises(ValueError):
        do.store.apply(1, encode_command("set", "/b", value="1", now=T0))


def test_stats_count_successes_and_failures(do):
    do("set", "/a", value="1")
    do("create", "/a", value="1")
    do.store.get("/a")
    with pytest.raises(EtcdError):
        do.store.get("/nope")
    stats = do.store.stats()
    assert stats["setsSuccess"] == 1 and stats["createFail"] == 1
    assert stats["getsSuccess"] == 1 and stats["getsFail"] == 1
    assert list(stats)[-1] == "watchers"
