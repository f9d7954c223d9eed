"""Same commands in the same order give the same state, answers and snapshot bytes."""

from __future__ import annotations

import random

import pytest

from grozd.store import Store, encode_command

T0 = 1_700_000_000.0
KEYS = ["/a", "/a/b", "/a/c", "/b", "/b/_h", "/c/d/e", "/q", "/"]


def random_commands(seed: int, count: int) -> list[bytes]:
    """A seeded mix of every operation, with TTLs and expiries, on a few colliding keys."""
    rng = random.Random(seed)
    now = T0
    out = []
    for _ in range(count):
        now += rng.choice([0, 0.001, 0.3, 1.7])
        key = rng.choice(KEYS)
        op = rng.choice(["set", "set", "create", "update", "compareAndSwap", "delete",
                         "compareAndDelete", "expire", "dir"])
        ttl = rng.choice([None, None, 0, 1, 3])
        value = rng.choice(["x", "y", ""])
        if op == "set":
            out.append(encode_command("set", key, now=now, value=value, ttl=ttl,
                                      refresh=rng.random() < 0.1))
        elif op == "dir":
            out.append(encode_command("set", key, now=now, dir=True, ttl=ttl))
        elif op == "create":
            out.append(encode_command("create", key, now=now, value=value, ttl=ttl,
                                      unique=rng.random() < 0.3, dir=rng.random() < 0.2))
        elif op == "update":
            out.append(encode_command("update", key, now=now, value=value, ttl=ttl,
                                      refresh=rng.random() < 0.2))
        elif op == "compareAndSwap":
            out.append(encode_command("compareAndSwap", key, now=now, value=value, ttl=ttl,
                                      prev_value=rng.choice(["x", "y", ""]),
                                      prev_index=rng.choice([0, rng.randint(1, 50)])))
        elif op == "delete":
            out.append(encode_command("delete", key, now=now, dir=rng.random() < 0.5,
                                      recursive=rng.random() < 0.3))
        elif op == "compareAndDelete":
            out.append(encode_command("compareAndDelete", key, now=now,
                                      prev_value=rng.choice(["x", "y"]),
                                      prev_index=rng.choice([0, rng.randint(1, 50)])))
        else:
            out.append(encode_command("expire", now=now))
    return out


def apply_all(store: Store, commands: list[bytes], first_index: int = 1) -> list[bytes]:
    answers = []
    for i, command in enumerate(commands):
        result = store.apply(first_index + i * 2, command)  # log gaps, like conf entries
        if isinstance(result, list):
            answers.append(b"".join(e.to_json() for e in result))
        else:
            answers.append(result.to_json())
    return answers


@pytest.mark.parametrize("seed", range(12))
def test_two_stores_agree(seed):
    commands = random_commands(seed, 400)
    one, two = Store(), Store()
    answers_one = apply_all(one, commands)
    answers_two = apply_all(two, commands)
    assert answers_one == answers_two
    assert one.snapshot() == two.snapshot()
    assert one.index == two.index and one.index > 20


@pytest.mark.parametrize("seed", range(8))
def test_a_restored_store_continues_identically(seed):
    commands = random_commands(seed, 600)
    straight, restarted = Store(), Store()
    apply_all(straight, commands[:300])
    apply_all(restarted, commands[:300])
    snapshot = restarted.snapshot()
    fresh = Store()
    fresh.restore(snapshot)
    assert fresh.snapshot() == snapshot
    tail_straight = apply_all(straight, commands[300:], first_index=601)
    tail_fresh = apply_all(fresh, commands[300:], first_index=601)
    assert tail_straight == tail_fresh
    assert straight.snapshot() == fresh.snapshot()
    assert straight.next_expiry() == fresh.next_expiry()


def test_snapshot_keeps_the_history_for_watches():
    store = Store()
    apply_all(store, [encode_command("set", f"/k{i}", value="v", now=T0) for i in range(5)])
    copy = Store()
    copy.restore(store.snapshot())
    assert copy.watch("/k2", wait_index=1).take().node["key"] == "/k2"
    assert copy.get("/", recursive=True, sorted=True).to_json() == store.get(
        "/", recursive=True, sorted=True
    ).to_json()


def test_restore_refuses_unknown_versions():
    import msgpack

    with pytest.raises(ValueError):
        Store().restore(msgpack.packb({"v": 99}))
