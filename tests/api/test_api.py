"""Endpoints over a backend: members, stats, health, metrics, errors from below, the clock."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from grozd.api import (
    ApiConfig,
    Backend,
    LocalBackend,
    NoLeader,
    ProposalTimeout,
    expire_once,
    expiry_loop,
)
from grozd.store import Store, encode_command

from .grozdserver import GrozdServer


def call(url: str, method: str = "GET", body: bytes | None = None,
         ctype: str = "application/x-www-form-urlencoded") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyBackend(LocalBackend):
    """A LocalBackend whose proposals and reads fail on demand."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.fail: BaseException | None = None
        self.delay = 0.0
        self.reads = 0
        self.leader = self.member_id
        self.leader_stats: dict[str, Any] | None = {"leader": "x", "followers": {}}

    async def propose(self, command: bytes, timeout: float | None = None) -> object:
        if self.delay:
            async with asyncio.timeout(timeout):
                await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return await super().propose(command, timeout)

    async def read_index(self) -> None:
        self.reads += 1
        if self.fail is not None:
            raise self.fail

    @property
    def leader_id(self) -> int:
        return self.leader

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        stats["leader"] = self.leader_stats
        return stats


@pytest.fixture
def flaky():
    with GrozdServer(ApiConfig(request_timeout=0.3), backend_factory=FlakyBackend) as srv:
        yield srv


def test_local_backend_satisfies_the_protocol():
    assert isinstance(LocalBackend(Store()), Backend)


def test_raft_headers_and_cluster_id(server):
    status, headers, _ = call(f"{server.url}/v2/keys/a", "PUT", b"value=1")
    assert status == 201
    assert headers["X-Raft-Index"] == "1" and headers["X-Raft-Term"] == "1"
    assert headers["X-Etcd-Cluster-Id"] == f"{server.backend.cluster_id:x}"
    assert headers["X-Etcd-Index"] == "1"


def test_backend_failures_are_answered_like_etcd(flaky):
    flaky.backend.fail = NoLeader()
    status, headers, body = call(f"{flaky.url}/v2/keys/a", "PUT", b"value=1")
    assert status == 500 and headers["X-Etcd-Index"] == "0"
    assert json.loads(body) == {"errorCode": 301, "message": "During Leader Election",
                                "cause": "etcdserver: no leader", "index": 0}
    flaky.backend.fail = ProposalTimeout()
    status, _, body = call(f"{flaky.url}/v2/keys/a", "PUT", b"value=1")
    assert status == 500 and json.loads(body)["errorCode"] == 300
    assert json.loads(body)["cause"] == "etcdserver: request timed out"
    flaky.backend.fail = RuntimeError("disk on fire")
    status, _, body = call(f"{flaky.url}/v2/keys/a?quorum=true")
    assert status == 500 and json.loads(body)["cause"] == "disk on fire"
    flaky.backend.fail = None
    flaky.backend.delay = 1.0
    status, _, body = call(f"{flaky.url}/v2/keys/a", "PUT", b"value=1")
    assert status == 500 and json.loads(body)["cause"] == "etcdserver: request timed out"


def test_quorum_reads_wait_for_the_read_index(flaky):
    call(f"{flaky.url}/v2/keys/a", "PUT", b"value=1")
    assert call(f"{flaky.url}/v2/keys/a")[0] == 200 and flaky.backend.reads == 0
    assert call(f"{flaky.url}/v2/keys/a?quorum=true")[0] == 200 and flaky.backend.reads == 1


def test_kept_answers_never_let_a_quorum_read_skip_its_read_index(flaky):
    call(f"{flaky.url}/v2/keys/a", "PUT", b"value=1")
    first = call(f"{flaky.url}/v2/keys/a?quorum=true")
    for _ in range(3):  # repeated plain and quorum reads of an unchanged key
        assert call(f"{flaky.url}/v2/keys/a")[2] == first[2]
        assert call(f"{flaky.url}/v2/keys/a?quorum=true")[2] == first[2]
    assert flaky.backend.reads == 4
    flaky.backend.fail = NoLeader()  # a member that cannot confirm a read point refuses
    status, _, body = call(f"{flaky.url}/v2/keys/a?quorum=true")
    assert status == 500 and json.loads(body)["errorCode"] == 301
    assert call(f"{flaky.url}/v2/keys/a")[0] == 200  # plain reads stay local


def test_leaderless_member(flaky):
    flaky.backend.leader = 0
    flaky.backend.leader_stats = None
    assert call(f"{flaky.url}/health")[0] == 503
    status, _, body = call(f"{flaky.url}/v2/members/leader")
    assert status == 503 and json.loads(body) == {"message": "During election"}
    status, _, body = call(f"{flaky.url}/v2/stats/leader")
    assert status == 403 and json.loads(body) == {"message": "not current leader"}


def test_members_add_update_remove(server):
    url = f"{server.url}/v2/members"
    status, _, body = call(url, "POST", b'{"peerURLs":["http://127.0.0.1:2390"]}',
                           "application/json")
    assert status == 201
    added = json.loads(body)
    assert added["peerURLs"] == ["http://127.0.0.1:2390"] and added["clientURLs"] == []
    assert len(json.loads(call(url)[2])["members"]) == 2
    status, _, _ = call(url, "POST", b'{"peerURLs":["http://127.0.0.1:2390"]}',
                        "application/json")
    assert status == 409
    status, _, _ = call(f"{url}/{added['id']}", "PUT",
                        b'{"peerURLs":["http://127.0.0.1:2391"]}', "application/json")
    assert status == 204
    listed = {m["id"]: m for m in json.loads(call(url)[2])["members"]}
    assert listed[added["id"]]["peerURLs"] == ["http://127.0.0.1:2391"]
    assert call(f"{url}/{added['id']}", "DELETE")[0] == 204
    status, _, body = call(f"{url}/{added['id']}", "DELETE")
    assert status == 410 and b"Member permanently removed" in body
    status, _, body = call(url, "POST", b'{"peerURLs":["http://127.0.0.1"]}',
                           "application/json")
    assert status == 400 and b"host:port" in body
    status, _, body = call(url, "POST", b'{"peerURLs":["http://h:1/path"]}',
                           "application/json")
    assert status == 400 and b"must not contain a path" in body


def test_machines_and_version(server):
    assert call(f"{server.url}/v2/machines")[2] == b"http://127.0.0.1:2379"
    assert json.loads(call(f"{server.url}/version")[2]) == {
        "etcdserver": "3.4.23", "etcdcluster": "3.4.0"}


def test_metrics(server):
    call(f"{server.url}/v2/keys/a", "PUT", b"value=1")
    call(f"{server.url}/v2/keys/missing")
    status, headers, body = call(f"{server.url}/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'etcd_http_received_total{method="PUT"} 1' in text
    assert 'etcd_http_failed_total{code="404",method="GET"} 1' in text
    assert 'etcd_http_successful_duration_seconds_count{method="PUT"} 1' in text
    assert "etcd_server_has_leader 1" in text and "etcd_server_is_leader 1" in text
    assert 'etcd_debugging_store_writes_total{action="set"} 1' in text
    assert "grozd_http_connections" in text and "grozd_store_index 1" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2, line


def test_the_clock_stamps_writes():
    clock = FakeClock(1_800_000_000.0)
    with GrozdServer(ApiConfig(clock=clock)) as srv:
        _, _, body = call(f"{srv.url}/v2/keys/k", "PUT", b"value=1&ttl=10")
        node = json.loads(body)["node"]
        assert node["expiration"] == "2027-01-15T08:00:10Z" and node["ttl"] == 10
        clock.now += 4.5
        assert json.loads(call(f"{srv.url}/v2/keys/k")[2])["node"]["ttl"] == 6


def test_expiry_proposes_only_when_due():
    async def main() -> None:
        store = Store()
        backend = LocalBackend(store)
        clock = FakeClock(1000.0)
        await backend.propose(encode_command("set", "/k", value="1", ttl=5, now=clock.now))
        assert not await expire_once(store, backend, clock)
        clock.now = 1004.9
        assert not await expire_once(store, backend, clock)
        clock.now = 1005.0
        assert await expire_once(store, backend, clock)
        assert store.next_expiry() is None and backend.proposals == 2

        await backend.propose(encode_command("set", "/j", value="1", ttl=1, now=clock.now))
        leader = [False]
        loop = asyncio.create_task(
            expiry_loop(store, backend, clock, lambda: leader[0], interval=0.01))
        clock.now += 2
        await asyncio.sleep(0.05)
        assert store.next_expiry() is not None  # followers never propose
        leader[0] = True
        await asyncio.sleep(0.05)
        assert store.next_expiry() is None
        loop.cancel()

    asyncio.run(main())


def test_keys_expire_on_their_own(server):
    call(f"{server.url}/v2/keys/brief", "PUT", b"value=1&ttl=1")
    status, _, body = call(f"{server.url}/v2/keys/brief?wait=true&waitIndex=2")
    assert status == 200 and json.loads(body)["action"] == "expire"
    assert call(f"{server.url}/v2/keys/brief")[0] == 404
