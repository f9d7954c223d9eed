"""python-etcd (the classic v2 client) against `grozd etcd`: the same calls against a real
etcd must give the same results (indices taken relative to the server's starting index)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcdctl.servers import Server, etcd_index, start_grozd, start_real
from tests.realetcd import etcd_or_skip

etcd = pytest.importorskip("etcd")


def port_of(server: Server) -> int:
    return int(server.client_url.rsplit(":", 1)[1])


def shape(result: Any, base: int) -> Any:
    """An EtcdResult as comparable data."""
    if isinstance(result, etcd.EtcdResult):
        def rel(key: str) -> str:
            return re.sub(r"\d{20}$", lambda m: f"<i{int(m.group()) - base:+d}>", key)

        key = rel(result.key)
        return {
            "action": result.action, "key": key, "value": result.value,
            "dir": result.dir, "ttl": result.ttl is not None,
            "created": result.createdIndex - base if result.createdIndex else 0,
            "modified": result.modifiedIndex - base if result.modifiedIndex else 0,
            "children": sorted(rel(c.key) for c in result.leaves) if result.dir else None,
            "prev": getattr(result, "_prev_node", None) is not None,
        }
    return result


def exercise(server: Server) -> list[Any]:
    """Basic operations, each recorded as data or as the error class raised."""
    client = etcd.Client(host="127.0.0.1", port=port_of(server), read_timeout=10)
    base = etcd_index(server.client_url)
    seen: list[Any] = []

    def record(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except etcd.EtcdException as exc:
            seen.append(type(exc).__name__)
            return None
        seen.append(shape(result, base))
        return result

    record(client.write, "/py/a", "1")
    record(client.read, "/py/a")
    record(client.write, "/py/a", "2", prevExist=True)
    record(client.write, "/py/new", "x", prevExist=True)
    record(client.write, "/py/a", "3", prevExist=False)
    record(client.write, "/py/ttl", "t", ttl=100)
    record(client.test_and_set, "/py/a", "4", "2")
    record(client.test_and_set, "/py/a", "5", "nope")
    record(client.write, "/py/dir", None, dir=True)
    record(client.write, "/py/dir/x", "1")
    record(client.write, "/py/queue", "j1", append=True)
    record(client.write, "/py/queue", "j2", append=True)
    record(client.read, "/py", recursive=True, sorted=True)
    record(client.read, "/py/queue", sorted=True)
    record(client.read, "/py/missing")
    record(client.delete, "/py/dir")
    record(client.delete, "/py/dir", dir=True)
    record(client.delete, "/py/dir", recursive=True)
    record(client.delete, "/py/a", prevValue="4")
    record(client.update, record(client.read, "/py/ttl"))
    # A watch that returns an old event, and one that waits for the next write.
    record(client.watch, "/py/a", index=base + 1, timeout=5)
    timer = threading.Timer(0.5, lambda: client.write("/py/w", "later"))
    timer.start()
    try:
        record(client.watch, "/py/w", timeout=10)
    finally:
        timer.join()
    members = client.members
    seen.append(sorted(m["name"] for m in members.values()))
    seen.append(client.leader["name"])
    seen.append(sorted(client.store_stats))
    return seen


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Any]]]:
    etcd_or_skip()
    results: dict[str, list[Any]] = {}
    for kind, start in (("etcd", start_real), ("grozd", start_grozd)):
        with start(Path(tmp_path_factory.mktemp(f"py-{kind}"))) as server:
            results[kind] = exercise(server)
    yield results


def test_python_etcd_basic_operations_work_on_grozd(observed: dict[str, list[Any]]) -> None:
    got = observed["grozd"]
    assert got[1]["value"] == "1" and got[3] == "EtcdKeyNotFound"
    assert got[4] == "EtcdAlreadyExist" and got[7] == "EtcdCompareFailed"
    assert len(got[12]["children"]) == 5 and got[10]["key"].startswith("/py/queue/")


def test_python_etcd_sees_the_same_as_against_etcd(observed: dict[str, list[Any]]) -> None:
    assert observed["grozd"] == observed["etcd"]


def test_python_etcd_watch_timeout_on_grozd(tmp_path: Path) -> None:
    with start_grozd(tmp_path) as server:
        client = etcd.Client(host="127.0.0.1", port=port_of(server))
        t0 = time.monotonic()
        with pytest.raises(etcd.EtcdWatchTimedOut):
            client.watch("/py/never", timeout=0.5)
        assert time.monotonic() - t0 < 5
