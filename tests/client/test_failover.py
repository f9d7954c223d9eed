"""Failover, retry safety and redirects, with fake endpoints in front of the real etcd."""

from __future__ import annotations

import asyncio
import json

import pytest

from grozd.client import (
    Client,
    EtcdError,
    EtcdInterrupted,
    EtcdUnavailable,
    KeyNotFoundError,
    RaftInternalError,
)

from .fakeservers import (
    FakeServer,
    Proxy,
    closed_port_url,
    hang_handler,
    redirect_handler,
    reset_handler,
    status_handler,
)

RAFT_ERROR = json.dumps(
    {"errorCode": 300, "message": "Raft Internal Error", "cause": "no leader", "index": 0}
).encode()


def test_closed_first_endpoint_fails_over_for_reads_and_writes(etcd_url, prefix):
    async def body():
        async with Client([closed_port_url(), etcd_url]) as c:
            # Nothing was sent to a refused endpoint, so even a write may move on.
            put = await c.set(f"{prefix}/k", "v")
            got = await c.get(f"{prefix}/k")
            return put, got, c._pinned

    put, got, pinned = asyncio.run(body())
    assert put.node.value == got.value == "v"
    assert pinned == 1


def test_reset_endpoint_fails_over_reads_and_stays_pinned(etcd_url, prefix):
    async def body():
        async with FakeServer(reset_handler) as bad, Client([bad.url, etcd_url]) as c:
            await c.get("/")
            await c.get("/")
            await c.members()
            return bad.connections

    # Only the first request tried the bad endpoint; later ones go to the pinned one.
    assert asyncio.run(body()) == 1


def test_reset_after_sending_a_write_is_not_retried(etcd_url, prefix):
    async def body():
        async with FakeServer(reset_handler) as bad, Client([bad.url, etcd_url]) as c:
            with pytest.raises(EtcdInterrupted) as info:
                await c.set(f"{prefix}/k", "v")
            assert len(bad.requests) == 1 and bad.requests[0].method == "PUT"
            # The write never reached etcd and was not resent there.
            with pytest.raises(KeyNotFoundError):
                await c.get(f"{prefix}/k")
            return info.value

    err = asyncio.run(body())
    assert isinstance(err, EtcdUnavailable) and isinstance(err, ConnectionError)
    assert "may or may not" in str(err)


def test_hanging_endpoint_times_out_and_reads_fail_over(etcd_url, prefix):
    async def body():
        async with FakeServer(hang_handler) as bad, Client([bad.url, etcd_url], timeout=0.3) as c:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await c.get("/")
            elapsed = loop.time() - start
            c._pinned = 0
            with pytest.raises(EtcdInterrupted):
                await c.delete(f"{prefix}/anything")
            return elapsed

    assert 0.25 < asyncio.run(body()) < 2.0


def test_no_endpoint_answers():
    async def body():
        async with Client([closed_port_url(), closed_port_url()], timeout=0.5) as c:
            with pytest.raises(EtcdUnavailable) as read:
                await c.get("/k")
            # Refused before sending: a plain EtcdUnavailable, not "interrupted".
            with pytest.raises(EtcdUnavailable) as write:
                await c.set("/k", "v")
            return read.value, write.value

    read, write = asyncio.run(body())
    assert isinstance(read, ConnectionError)
    assert len(read.errors) == 2
    assert type(write) is EtcdUnavailable


def test_redirects_are_followed_with_method_and_body(etcd_url, prefix):
    async def body():
        async with FakeServer(redirect_handler(etcd_url)) as hop, Client([hop.url]) as c:
            put = await c.set(f"{prefix}/k", "through a 307", ttl=60)
            got = await c.get(f"{prefix}/k")
            return put, got, [r.method for r in hop.requests]

    put, got, methods = asyncio.run(body())
    assert put.node.value == got.value == "through a 307" and put.node.ttl is not None
    assert methods == ["PUT", "GET"]


def test_endless_redirects_stop(etcd_url):
    async def body():
        async with FakeServer(redirect_handler("")) as loop_server:
            # A relative Location pointing back at itself.
            async with Client([loop_server.url], max_redirects=3) as c:
                with pytest.raises(EtcdError, match="redirects"):
                    await c.get("/k")
            return len(loop_server.requests)

    assert asyncio.run(body()) == 4


def test_server_errors_fail_over_for_reads(etcd_url, prefix):
    async def body():
        async with FakeServer(status_handler(500, RAFT_ERROR)) as sick:
            async with Client([sick.url, etcd_url]) as c:
                healthy = await c.health()
            async with Client([sick.url]) as alone:
                with pytest.raises(RaftInternalError) as info:
                    await alone.get("/k")
                with pytest.raises(RaftInternalError):
                    # Writes are not moved on a 5xx: they may have been applied.
                    await alone.set("/k", "v")
            return healthy, info.value

    healthy, err = asyncio.run(body())
    assert healthy is True
    assert err.error_code == 300 and err.cause == "no leader" and err.status == 500


def test_health_false_when_unhealthy():
    async def body():
        unhealthy = status_handler(503, b'{"health":"false"}')
        async with FakeServer(unhealthy) as sick, Client([sick.url]) as c:
            return await c.health()

    assert asyncio.run(body()) is False


def test_pooled_connection_closed_by_server_is_replaced(etcd_url, prefix):
    async def body():
        proxy = Proxy(etcd_url)
        await proxy.start()
        async with Client([proxy.url]) as c:
            await c.set(f"{prefix}/k", "1")
            # The idle keep-alive connection dies; the next write must not fail on it.
            proxy.drop()
            await asyncio.sleep(0.05)
            put = await c.set(f"{prefix}/k", "2")
            proxy.drop()
            got = await c.get(f"{prefix}/k")
        proxy.stop()
        return put, got

    put, got = asyncio.run(body())
    assert put.node.value == got.value == "2"
