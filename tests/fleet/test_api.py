"""fleet's v1 HTTP API (and grozd's machine-local status/journal) against real etcd."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

from grozd.client import Client
from grozd.fleet.api import FleetAPI, decode_token, encode_token, options_to_text
from grozd.fleet.registry import LAUNCHED, MachineState, Registry, UnitStateRecord

from .conftest import FakeRunner, run_async

OPTS = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 3000"}]


class Http:
    """Blocking requests run off the loop that serves them."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _do(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            data = None if body is None else (body if isinstance(body, bytes)
                                              else json.dumps(body).encode())  # fmt: skip
            conn.request(method, path, body=data)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    async def __call__(self, method: str, path: str, body: Any = None
                       ) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        loop = asyncio.get_running_loop()
        status, headers, raw = await loop.run_in_executor(None, self._do, method, path, body)
        ctype = headers.get("Content-Type", "")
        data: Any = json.loads(raw) if raw and ctype.startswith("application/json") else raw
        return status, data, headers


def api_test(etcd_url: str, prefix: str, fn, page_size: int = 100) -> None:
    async def main() -> None:
        async with Client([etcd_url]) as client:
            registry = Registry(client, prefix)
            runner = FakeRunner()
            api = FleetAPI(registry, runner, page_size=page_size)
            await api.start("127.0.0.1", 0)
            try:
                await fn(Http(api.port), registry, runner)
            finally:
                await api.stop()

    run_async(main())


def test_create_get_modify_delete_units(etcd_url, prefix):
    async def go(req: Http, registry: Registry, runner: FakeRunner):
        status, body, _ = await req("PUT", "/fleet/v1/units/hello.service",
                                    {"desiredState": "launched", "options": OPTS})  # fmt: skip
        assert (status, body) == (201, b"")
        job = await registry.job("hello.service")
        assert job.desired_state == LAUNCHED
        assert await registry.unit_text(job.hash) == options_to_text(OPTS)
        status, unit, _ = await req("GET", "/fleet/v1/units/hello.service")
        assert status == 200
        assert unit == {"name": "hello.service", "options": OPTS, "desiredState": "launched",
                        "currentState": "inactive"}  # fmt: skip
        # Modify: only the desired state (options may be repeated if equal).
        status, _, _ = await req("PUT", "/fleet/v1/units/hello.service",
                                 {"desiredState": "loaded", "name": "hello.service"})  # fmt: skip
        assert status == 204
        assert (await registry.job("hello.service")).desired_state == "loaded"
        status, _, _ = await req("PUT", "/fleet/v1/units/hello.service",
                                 {"desiredState": "loaded", "options": OPTS})  # fmt: skip
        assert status == 204
        other = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
        status, err, _ = await req("PUT", "/fleet/v1/units/hello.service",
                                   {"desiredState": "loaded", "options": other})  # fmt: skip
        assert status == 409 and err["error"]["code"] == 409
        # Placement and the agent's report show up as machineID and currentState.
        m = MachineState("m" * 32, "10.0.0.9", {"a": "b"})
        await registry.announce(m, ttl=30)
        await registry.set_target("hello.service", m.id)
        await registry.report_state(UnitStateRecord("hello.service", m.id, job.hash, "loaded",
                                                    "inactive", "dead", "loaded"))  # fmt: skip
        _, unit, _ = await req("GET", "/fleet/v1/units/hello.service")
        assert (unit["machineID"], unit["currentState"]) == (m.id, "loaded")
        status, _, _ = await req("DELETE", "/fleet/v1/units/hello.service")
        assert status == 204
        status, err, _ = await req("DELETE", "/fleet/v1/units/hello.service")
        assert status == 404 and err == {"error": {"code": 404, "message": "unit does not exist"}}
        status, err, _ = await req("GET", "/fleet/v1/units/hello.service")
        assert status == 404

    api_test(etcd_url, prefix, go)


def test_bad_requests(etcd_url, prefix):
    async def go(req: Http, registry: Registry, runner: FakeRunner):
        cases = [
            ({"desiredState": "launched"}, 409),  # new unit without options
            ({"desiredState": "running", "options": OPTS}, 400),
            ({"desiredState": "launched", "options": OPTS, "name": "other.service"}, 400),
            ({"desiredState": "launched", "options": [{"section": "Service"}]}, 400),
            (b"{not json", 400),
            ([1, 2], 400),
        ]
        for body, code in cases:
            status, err, _ = await req("PUT", "/fleet/v1/units/x.service", body)
            assert status == code, body
            assert err["error"]["code"] == code
        bad = [{"section": "X-Fleet", "name": "Global", "value": "maybe"}]
        status, err, _ = await req("PUT", "/fleet/v1/units/y.service",
                                   {"desiredState": "loaded", "options": bad})  # fmt: skip
        assert status == 400 and "y.service:2: Global=: not a boolean" in err["error"]["message"]
        status, err, _ = await req("PUT", "/fleet/v1/units/not-a-unit",
                                   {"desiredState": "loaded", "options": OPTS})  # fmt: skip
        assert status == 400
        status, err, _ = await req("GET", "/fleet/v1/units?nextPageToken=garbage")
        assert (status, err["error"]["message"]) == (
            400, "invalid value of nextPageToken query parameter")
        assert (await req("GET", "/fleet/v1/nothing"))[0] == 404
        assert (await req("POST", "/fleet/v1/units/x.service"))[0] == 405

    api_test(etcd_url, prefix, go)


def test_paging_machines_and_states(etcd_url, prefix):
    async def go(req: Http, registry: Registry, runner: FakeRunner):
        for i in range(5):
            await registry.submit(f"u{i}.service", "[Service]\nExecStart=/bin/true\n")
        names, path = [], "/fleet/v1/units"
        pages = 0
        while True:
            status, page, _ = await req("GET", path)
            assert status == 200
            pages += 1
            names += [u["name"] for u in page["units"]]
            if "nextPageToken" not in page:
                break
            path = f"/fleet/v1/units?nextPageToken={page['nextPageToken']}"
        assert pages == 3 and names == [f"u{i}.service" for i in range(5)]
        assert decode_token(encode_token(2, 7)) == (2, 7)
        for i, meta in enumerate(({"region": "eu"}, {})):
            await registry.announce(MachineState(f"{i}" * 32, f"10.0.0.{i}", meta), ttl=30)
        _, page, _ = await req("GET", "/fleet/v1/machines")
        assert page == {"machines": [
            {"id": "0" * 32, "primaryIP": "10.0.0.0", "metadata": {"region": "eu"}},
            {"id": "1" * 32, "primaryIP": "10.0.0.1", "metadata": {}},
        ]}  # fmt: skip
        for name, mid in (("u0.service", "0" * 32), ("u1.service", "0" * 32),
                          ("u1.service", "1" * 32)):  # fmt: skip
            await registry.report_state(UnitStateRecord(name, mid, "h", "loaded", "active",
                                                        "running", LAUNCHED))  # fmt: skip
        _, page, _ = await req("GET", f"/fleet/v1/state?machineID={'1' * 32}")
        assert page == {"states": [{"name": "u1.service", "hash": "h", "machineID": "1" * 32,
                                    "systemdLoadState": "loaded", "systemdActiveState": "active",
                                    "systemdSubState": "running"}]}  # fmt: skip
        _, page, _ = await req("GET", "/fleet/v1/state?unitName=u1.service")
        assert [s["machineID"] for s in page["states"]] == ["0" * 32, "1" * 32]
        _, page, _ = await req("GET", "/fleet/v1/state")
        assert len(page["states"]) == 2 and "nextPageToken" in page
        status, disco, _ = await req("GET", "/fleet/v1/discovery")
        assert status == 200 and disco["version"] == "v1"

    api_test(etcd_url, prefix, go, page_size=2)


def test_machine_local_status_and_journal(etcd_url, prefix):
    async def go(req: Http, registry: Registry, runner: FakeRunner):
        await runner.load("a.service", "[Service]\nExecStart=/bin/true\n")
        await runner.start("a.service")
        status, body, headers = await req("GET", "/grozd/v1/units/a.service/status")
        assert (status, body, headers["X-Exit-Status"]) == (200, b"a.service: active\n", "0")
        status, body, headers = await req("GET", "/grozd/v1/units/b.service/status")
        assert status == 200 and headers["X-Exit-Status"] == "4"
        status, body, _ = await req("GET", "/grozd/v1/units/a.service/journal?lines=5")
        assert (status, body) == (200, b"")
        status, err, _ = await req("GET", "/grozd/v1/units/a.service/journal?lines=x")
        assert status == 400

    api_test(etcd_url, prefix, go)
