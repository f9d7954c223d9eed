"""Keys API against a real etcd: every method, error mapping, CAS, TTLs, ordering."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from grozd.client import (
    Client,
    DirNotEmptyError,
    EtcdError,
    InvalidRequestError,
    KeyNotFoundError,
    Member,
    NodeExistError,
    NotFileError,
    TestFailedError,
)


def test_set_then_get_round_trips(run, prefix):
    async def body(c: Client):
        put = await c.set(f"{prefix}/k", "v1")
        got = await c.get(f"{prefix}/k")
        return put, got

    put, got = run(body)
    assert put.action == "set"
    assert put.node.key == f"{prefix}/k" and put.node.value == "v1"
    assert put.prev_node is None
    assert put.etcd_index == put.node.modified_index == put.node.created_index
    assert put.raft_index and put.raft_term
    assert got.action == "get" and got.value == "v1"
    assert got.node.modified_index == put.node.modified_index


def test_awkward_keys_and_values_are_encoded(run, prefix):
    # Spaces, unicode, and characters that mean something in URLs or forms.
    key = f"{prefix}/a key/ünï 键?x=1&y#frag%41+plus"
    value = "v a+l&ue=ü%20\n;"

    async def body(c: Client):
        await c.set(key, value)
        return await c.get(key), await c.get(prefix, recursive=True)

    got, tree = run(body)
    assert got.node.key == key and got.value == value
    assert [n.key for n in tree.node.leaves()] == [key]


def test_key_normalisation_matches_etcd(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}//x/../y/", "v")
        return await c.get(f"{prefix}/y")

    assert run(body).value == "v"


def test_prev_node_on_overwrite(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/k", "old")
        return await c.set(f"{prefix}/k", "new")

    resp = run(body)
    assert resp.prev_node.value == "old" and resp.node.value == "new"


def test_missing_parent_is_the_cause(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/x", "v")
        await c.get(f"{prefix}/no/such/key")

    with pytest.raises(KeyNotFoundError) as info:
        run(body)
    # etcd names the first path component that is missing.
    assert info.value.cause == f"{prefix}/no"


def test_missing_key_raises_key_not_found_with_details(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/present", "v")
        await c.get(f"{prefix}/missing")

    with pytest.raises(KeyNotFoundError) as info:
        run(body)
    err = info.value
    assert isinstance(err, EtcdError)
    assert err.error_code == 100
    assert err.message == "Key not found"
    assert err.cause == f"{prefix}/missing"
    assert isinstance(err.index, int) and err.index > 0
    assert err.status == 404


def test_create_and_update_preconditions(run, prefix):
    async def body(c: Client):
        created = await c.create(f"{prefix}/k", "a")
        with pytest.raises(NodeExistError) as exists:
            await c.create(f"{prefix}/k", "b")
        updated = await c.update(f"{prefix}/k", "c")
        with pytest.raises(KeyNotFoundError):
            await c.update(f"{prefix}/other", "d")
        return created, exists.value, updated

    created, exists, updated = run(body)
    assert created.action == "create"
    assert exists.error_code == 105 and exists.cause == f"{prefix}/k"
    assert updated.action == "update" and updated.prev_node.value == "a"


def test_mkdir_and_directory_errors(run, prefix):
    async def body(c: Client):
        made = await c.mkdir(f"{prefix}/d")
        with pytest.raises(NodeExistError):
            await c.mkdir(f"{prefix}/d")
        await c.set(f"{prefix}/d/child", "x")
        with pytest.raises(NotFileError) as not_file:
            await c.delete(f"{prefix}/d")
        with pytest.raises(DirNotEmptyError) as not_empty:
            await c.delete(f"{prefix}/d", dir=True)
        return made, not_file.value, not_empty.value

    made, not_file, not_empty = run(body)
    assert made.node.dir and made.node.value is None
    assert not_file.error_code == 102
    assert not_empty.error_code == 108


def test_delete_variants(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/k", "v")
        plain = await c.delete(f"{prefix}/k")
        await c.mkdir(f"{prefix}/empty")
        empty = await c.delete(f"{prefix}/empty", dir=True)
        await c.set(f"{prefix}/tree/a/b", "v")
        tree = await c.delete(f"{prefix}/tree", recursive=True)
        with pytest.raises(KeyNotFoundError):
            await c.get(f"{prefix}/tree/a/b")
        return plain, empty, tree

    plain, empty, tree = run(body)
    assert plain.action == "delete" and plain.prev_node.value == "v"
    assert empty.action == "delete" and empty.node.dir
    assert tree.action == "delete" and tree.node.dir


def test_compare_and_swap(run, prefix):
    async def body(c: Client):
        first = await c.set(f"{prefix}/k", "one")
        by_value = await c.compare_and_swap(f"{prefix}/k", "two", prev_value="one")
        by_index = await c.compare_and_swap(
            f"{prefix}/k", "three", prev_index=by_value.node.modified_index
        )
        with pytest.raises(TestFailedError) as wrong_value:
            await c.compare_and_swap(f"{prefix}/k", "x", prev_value="one")
        with pytest.raises(TestFailedError) as wrong_index:
            await c.compare_and_swap(f"{prefix}/k", "x", prev_index=first.node.modified_index)
        return by_value, by_index, wrong_value.value, wrong_index.value, await c.get(f"{prefix}/k")

    by_value, by_index, wrong_value, wrong_index, final = run(body)
    assert by_value.action == "compareAndSwap" and by_value.prev_node.value == "one"
    assert by_index.node.value == "three"
    assert wrong_value.error_code == 101 and wrong_value.cause == "[one != three]"
    assert wrong_index.error_code == 101
    assert final.value == "three"


def test_compare_and_delete(run, prefix):
    async def body(c: Client):
        put = await c.set(f"{prefix}/k", "v")
        with pytest.raises(TestFailedError):
            await c.compare_and_delete(f"{prefix}/k", prev_value="other")
        with pytest.raises(TestFailedError):
            await c.compare_and_delete(f"{prefix}/k", prev_index=put.node.modified_index + 99)
        deleted = await c.compare_and_delete(f"{prefix}/k", prev_value="v")
        await c.set(f"{prefix}/j", "w")
        j = await c.get(f"{prefix}/j")
        by_index = await c.compare_and_delete(f"{prefix}/j", prev_index=j.node.modified_index)
        return deleted, by_index

    deleted, by_index = run(body)
    assert deleted.action == "compareAndDelete"
    assert by_index.action == "compareAndDelete"


def test_set_with_conditions_directly(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/k", "a")
        with pytest.raises(NodeExistError):
            await c.set(f"{prefix}/k", "b", prev_exist=False)
        ok = await c.set(f"{prefix}/k", "b", prev_exist=True, prev_value="a")
        return ok

    assert run(body).node.value == "b"


def test_client_side_argument_checks():
    c = Client(["http://127.0.0.1:1"])

    async def body():
        with pytest.raises(ValueError):
            await c.compare_and_swap("/k", "v")
        with pytest.raises(ValueError):
            await c.compare_and_delete("/k")
        with pytest.raises(ValueError):
            await c.set("/k")
        with pytest.raises(ValueError):
            await c.set("/k", "v", refresh=True, ttl=5)
        with pytest.raises(ValueError):
            await c.set("/k", "v", dir=True)

    asyncio.run(body())


def test_ttl_key_carries_expiration_and_refresh_extends_it(run, prefix):
    async def body(c: Client):
        put = await c.set(f"{prefix}/k", "v", ttl=30)
        refreshed = await c.set(f"{prefix}/k", ttl=300, refresh=True, prev_exist=True)
        made_permanent = await c.update(f"{prefix}/k", "v2")
        return put, refreshed, made_permanent

    put, refreshed, permanent = run(body)
    assert put.node.ttl is not None and 28 <= put.node.ttl <= 30
    assert isinstance(put.node.expiration, datetime) and put.node.expiration.tzinfo is not None
    assert refreshed.node.value == "v" and refreshed.node.ttl > 200
    assert refreshed.node.expiration > put.node.expiration
    assert permanent.node.ttl is None and permanent.node.expiration is None


def test_ttl_key_expires(run, prefix):
    async def body(c: Client):
        put = await c.set(f"{prefix}/k", "v", ttl=1)
        # etcd's leader expires keys on a 500 ms tick, so the event comes within ~1.5 s.
        event = await c.watch(f"{prefix}/k", index=put.node.modified_index + 1, timeout=5)
        with pytest.raises(KeyNotFoundError):
            await c.get(f"{prefix}/k")
        return event

    event = run(body)
    assert event.action == "expire"
    assert event.prev_node.value == "v"


def test_refresh_without_ttl_is_an_invalid_request(run, prefix):
    async def body(c: Client):
        await c.set(f"{prefix}/k", "v", ttl=30)
        await c.set(f"{prefix}/k", refresh=True, prev_exist=True)

    with pytest.raises(InvalidRequestError) as info:
        run(body)
    assert 200 <= info.value.error_code < 300


def test_append_keeps_insertion_order(run, prefix):
    async def body(c: Client):
        created = [await c.append(f"{prefix}/queue", f"job-{i}") for i in range(5)]
        listed = await c.get(f"{prefix}/queue", sorted=True)
        ttl_job = await c.append(f"{prefix}/queue", "short-lived", ttl=60)
        return created, listed, ttl_job

    created, listed, ttl_job = run(body)
    assert all(r.action == "create" for r in created)
    keys = [r.node.key for r in created]
    # In-order keys are named after the (zero-padded) index, so they sort in creation order.
    assert keys == sorted(keys)
    assert [n.value for n in listed.node.nodes] == [f"job-{i}" for i in range(5)]
    assert [n.key for n in listed.node.nodes] == keys
    assert ttl_job.node.ttl is not None


def test_recursive_sorted_get(run, prefix):
    async def body(c: Client):
        for key in ("b/2", "a", "c/x/deep", "b/1"):
            await c.set(f"{prefix}/{key}", key)
        flat = await c.get(prefix, sorted=True)
        deep = await c.get(prefix, recursive=True, sorted=True)
        quorum = await c.get(f"{prefix}/a", quorum=True)
        return flat, deep, quorum

    flat, deep, quorum = run(body)
    assert [n.name for n in flat.node.nodes] == ["a", "b", "c"]
    # Without recursive etcd lists children but not grandchildren.
    assert flat.node.nodes[1].dir and flat.node.nodes[1].nodes == ()
    assert [n.key[len(prefix) :] for n in deep.node.leaves()] == ["/a", "/b/1", "/b/2", "/c/x/deep"]
    assert deep.node.nodes[2].nodes[0].nodes[0].value == "c/x/deep"
    assert quorum.value == "a"


def test_members_version_health_stats(run, etcd_url):
    async def body(c: Client):
        return (
            await c.members(),
            await c.version(),
            await c.health(),
            await c.leader_stats(),
            await c.self_stats(),
            await c.store_stats(),
        )

    members, version, health, leader, self_stats, store = run(body)
    assert len(members) == 1 and isinstance(members[0], Member)
    assert members[0].client_urls == (etcd_url,)
    assert members[0].peer_urls and members[0].id
    assert version["etcdserver"].startswith("3.")
    assert health is True
    assert leader["leader"] == members[0].id
    assert self_stats["id"] == members[0].id and self_stats["state"] == "StateLeader"
    assert "setsSuccess" in store


def test_connections_are_kept_alive(run, prefix):
    async def body(c: Client):
        for i in range(10):
            await c.set(f"{prefix}/k", str(i))
        (pool,) = c._pools.values()
        conn = pool.take_idle()
        assert conn is not None
        pool.release(conn)
        return conn.uses

    assert run(body) == 10
