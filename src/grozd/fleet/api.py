"""fleet's HTTP API (v1), served by ``grozd fleetd``.

Resources, JSON in and out, errors as ``{"error": {"code": N, "message": "..."}}``::

    GET    /fleet/v1/units                     {"units": [Unit...], "nextPageToken"?}
    GET    /fleet/v1/units/<name>              Unit (404 if unknown)
    PUT    /fleet/v1/units/<name>              {"desiredState", "options"?}: 201 created,
                                               204 changed, 409 (new without options, or
                                               existing with different options), 400
    DELETE /fleet/v1/units/<name>              204, 404
    GET    /fleet/v1/machines                  {"machines": [Machine...], "nextPageToken"?}
    GET    /fleet/v1/state[?machineID=&unitName=]  {"states": [UnitState...], ...}
    GET    /fleet/v1/discovery                 a short description of the above

Unit = {"name", "options": [{"section", "name", "value"}], "desiredState", "currentState",
"machineID"} plus grozd's "reason" (why a wanted unit is not placed). UnitState =
{"name", "hash", "machineID", "systemdLoadState", "systemdActiveState",
"systemdSubState"}. Machine = {"id", "primaryIP", "metadata"}. Collections come in pages
(``?nextPageToken=`` continues). grozd adds two machine-local resources, answered from
this fleetd's own runner (what fleetctl reached over SSH)::

    GET /grozd/v1/units/<name>/status          systemctl status text; X-Exit-Status header
    GET /grozd/v1/units/<name>/journal?lines=N[&follow=true]   journal lines (streamed)
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, unquote

from grozd.client import EtcdError, EtcdUnavailable
from grozd.fleet.registry import (
    JOB_STATES,
    JobRecord,
    MachineState,
    Registry,
    UnitExistsError,
    UnitStateRecord,
    current_state,
)
from grozd.fleet.runners import Runner
from grozd.fleet.spec import UnitFileError, parse_spec, spec_for
from grozd.fleet.unit import parse_unit
from grozd.http.config import ApiConfig
from grozd.http.server import HttpServer, Request, Response

log = logging.getLogger(__name__)

PAGE_SIZE = 100
JSON = [("Content-Type", "application/json")]


class ApiError(Exception):
    """An error answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _json(status: int, data: Any) -> Response:
    return Response(status, list(JSON), json.dumps(data).encode())


def _error(code: int, message: str) -> Response:
    return _json(code, {"error": {"code": code, "message": message}})


def encode_token(page: int, limit: int) -> str:
    """An opaque page token."""
    raw = json.dumps({"page": page, "limit": limit}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[int, int]:
    """(page, limit) from a token; `ApiError` 400 when it is not one of ours."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        page, limit = int(data["page"]), int(data["limit"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "invalid value of nextPageToken query parameter") from None
    if page < 1 or not 1 <= limit <= 1000:
        raise ApiError(400, "invalid value of nextPageToken query parameter")
    return page, limit


def _page(items: list[Any], query: dict[str, list[str]], size: int) -> tuple[list[Any], str | None]:
    tokens = query.get("nextPageToken")
    page, limit = decode_token(tokens[0]) if tokens else (0, size)
    start = page * limit
    chunk = items[start : start + limit]
    more = len(items) > start + limit
    return chunk, encode_token(page + 1, limit) if more else None


def options_to_text(options: list[dict[str, str]]) -> str:
    """Unit file text from API options: sections in order of first appearance."""
    sections: dict[str, list[str]] = {}
    for opt in options:
        sections.setdefault(opt["section"], []).append(f"{opt['name']}={opt['value']}")
    return "\n".join(f"[{sec}]\n" + "".join(f"{line}\n" for line in lines)
                     for sec, lines in sections.items())  # fmt: skip


def text_to_options(text: str, name: str) -> list[dict[str, str]]:
    """API options of a stored unit file."""
    try:
        unit = parse_unit(text, name)
    except (UnitFileError, ValueError):
        return []
    return [{"section": o.section, "name": o.key, "value": o.value} for o in unit.options]


def _validate_options(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list):
        raise ApiError(400, "options must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("section", "name", "value")
        ):
            raise ApiError(400, "each option needs string section, name and value")
        if not item["section"] or not item["name"] or "\n" in "".join(item.values()):
            raise ApiError(400, "invalid unit option")
        out.append({"section": item["section"], "name": item["name"], "value": item["value"]})
    return out


class FleetAPI:
    """The request handler and its HTTP server."""

    def __init__(
        self,
        registry: Registry,
        runner: Runner | None = None,
        *,
        page_size: int = PAGE_SIZE,
        config: ApiConfig | None = None,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.page_size = page_size
        self.http = HttpServer(self.handle, config or ApiConfig(cors=False))
        self._texts: dict[str, str] = {}

    async def start(self, host: str, port: int) -> None:
        """Listen (port 0 picks one; see `port`)."""
        await self.http.start(host, port)

    async def stop(self) -> None:
        await self.http.stop()

    @property
    def port(self) -> int:
        return self.http.port

    async def handle(self, req: Request) -> Response:
        """Route one request."""
        path = unquote(req.path.decode("latin-1"))
        query = parse_qs(req.query.decode("latin-1")) if req.query else {}
        try:
            return await self._route(req.method, path.rstrip("/") or "/", query, req.body)
        except ApiError as exc:
            return _error(exc.code, exc.message)
        except (EtcdError, EtcdUnavailable) as exc:
            log.warning("event=api_registry_error error=%r", str(exc))
            return _error(500, f"registry unavailable: {exc}")

    async def _route(self, method: str, path: str, query: dict[str, list[str]],
                     body: bytes) -> Response:  # fmt: skip
        parts = path.strip("/").split("/")
        if parts[:2] == ["fleet", "v1"]:
            rest = parts[2:]
            if rest == ["units"] and method == "GET":
                return await self._list_units(query)
            if len(rest) == 2 and rest[0] == "units":
                name = rest[1]
                if method == "GET":
                    return await self._get_unit(name)
                if method == "PUT":
                    return await self._put_unit(name, body)
                if method == "DELETE":
                    return await self._delete_unit(name)
                raise ApiError(405, f"method {method} not allowed")
            if rest == ["machines"] and method == "GET":
                return await self._list_machines(query)
            if rest == ["state"] and method == "GET":
                return await self._list_states(query)
            if rest == ["discovery"] and method == "GET":
                return _json(200, DISCOVERY)
            if rest and rest[0] in ("units", "machines", "state", "discovery"):
                raise ApiError(405, f"method {method} not allowed")
        if parts[:3] == ["grozd", "v1", "units"] and len(parts) == 5 and method == "GET":
            if parts[4] == "status":
                return await self._status(parts[3])
            if parts[4] == "journal":
                return await self._journal(parts[3], query)
        raise ApiError(404, "not found")

    # -- units --------------------------------------------------------------------------

    async def _text(self, digest: str | None) -> str | None:
        if digest is None:
            return None
        text = self._texts.get(digest)
        if text is None:
            text = await self.registry.unit_text(digest)
            if text is not None:
                self._texts[digest] = text
        return text

    async def _unit_json(
        self,
        job: JobRecord,
        states: dict[tuple[str, str], UnitStateRecord],
        machines: dict[str, MachineState],
    ) -> dict[str, Any]:
        text = await self._text(job.hash) or ""
        spec = spec_for(job.name, text) if text else None
        is_global = spec is not None and not isinstance(spec, UnitFileError) and spec.is_global
        data: dict[str, Any] = {
            "name": job.name,
            "options": text_to_options(text, job.name),
            "desiredState": job.desired_state,
            "currentState": "" if is_global else current_state(job, states, machines),
        }
        if job.target:
            data["machineID"] = job.target
        if job.reason:
            data["reason"] = job.reason
        return data

    async def _list_units(self, query: dict[str, list[str]]) -> Response:
        jobs, _ = await self.registry.jobs()
        names = sorted(n for n, j in jobs.items() if j.submitted)
        chunk, token = _page(names, query, self.page_size)
        states = await self.registry.unit_states()
        machines, _ = await self.registry.machines()
        units = [await self._unit_json(jobs[n], states, machines) for n in chunk]
        data: dict[str, Any] = {"units": units}
        if token:
            data["nextPageToken"] = token
        return _json(200, data)

    async def _get_unit(self, name: str) -> Response:
        job = await self.registry.job(name)
        if job is None:
            raise ApiError(404, "unit does not exist")
        states = await self.registry.unit_states()
        machines, _ = await self.registry.machines()
        return _json(200, await self._unit_json(job, states, machines))

    async def _put_unit(self, name: str, body: bytes) -> Response:
        try:
            data = json.loads(body or b"null")
        except ValueError:
            raise ApiError(400, "unable to decode body as JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        if "name" in data and data["name"] != name:
            raise ApiError(400, "name in body does not match the URL")
        state = data.get("desiredState")
        if state not in JOB_STATES:
            raise ApiError(400, f"invalid desiredState {state!r}")
        options = _validate_options(data["options"]) if data.get("options") else None
        existing = await self.registry.job(name)
        if existing is not None:
            if options is not None:
                current = text_to_options(await self._text(existing.hash) or "", name)
                if current != options:
                    raise ApiError(409, f"unit {name} already exists with different options")
            await self.registry.set_desired_state(name, state)
            return Response(204)
        if options is None:
            raise ApiError(409, "unit does not exist and options were not given")
        text = options_to_text(options)
        try:
            spec = parse_spec(name, text)
        except UnitFileError as exc:
            raise ApiError(400, str(exc)) from None
        for warning in spec.warnings:
            log.info("event=unit_warning unit=%s warning=%r", name, warning)
        try:
            await self.registry.submit(name, text, state)
        except UnitExistsError:
            raise ApiError(409, f"unit {name} already exists") from None
        return Response(201)

    async def _delete_unit(self, name: str) -> Response:
        if not await self.registry.destroy(name):
            raise ApiError(404, "unit does not exist")
        return Response(204)

    # -- machines and states ------------------------------------------------------------

    async def _list_machines(self, query: dict[str, list[str]]) -> Response:
        machines, _ = await self.registry.machines()
        ordered = [machines[m] for m in sorted(machines)]
        chunk, token = _page(ordered, query, self.page_size)
        data: dict[str, Any] = {
            "machines": [
                {"id": m.id, "primaryIP": m.public_ip, "metadata": dict(m.metadata)} for m in chunk
            ]
        }
        if token:
            data["nextPageToken"] = token
        return _json(200, data)

    async def _list_states(self, query: dict[str, list[str]]) -> Response:
        states = await self.registry.unit_states()
        machine = query.get("machineID", [None])[0]
        unit = query.get("unitName", [None])[0]
        items = [
            s
            for key, s in sorted(states.items())
            if (machine is None or s.machine_id == machine) and (unit is None or s.name == unit)
        ]
        chunk, token = _page(items, query, self.page_size)
        data: dict[str, Any] = {
            "states": [
                {
                    "name": s.name,
                    "hash": s.unit_hash,
                    "machineID": s.machine_id,
                    "systemdLoadState": s.load_state,
                    "systemdActiveState": s.active_state,
                    "systemdSubState": s.sub_state,
                }
                for s in chunk
            ]
        }
        if token:
            data["nextPageToken"] = token
        return _json(200, data)

    # -- this machine -------------------------------------------------------------------

    async def _status(self, name: str) -> Response:
        if self.runner is None:
            raise ApiError(404, "this fleetd runs no units")
        text, code = await self.runner.status(name)
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("X-Exit-Status", str(code))]
        return Response(200, headers, text.encode())

    async def _journal(self, name: str, query: dict[str, list[str]]) -> Response:
        if self.runner is None:
            raise ApiError(404, "this fleetd runs no units")
        try:
            lines = int(query.get("lines", ["10"])[0])
        except ValueError:
            raise ApiError(400, "lines must be a number") from None
        follow = query.get("follow", ["false"])[0] in ("1", "true", "yes")
        source = self.runner.journal(name, lines, follow)

        async def chunks() -> AsyncIterator[bytes]:
            async for line in source:
                yield (line + "\n").encode()

        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if follow:
            # The server cancels the writer when the client goes away, which ends this too.
            return Response(200, headers, stream=chunks())
        body = b"".join([chunk async for chunk in chunks()])
        return Response(200, headers, body)


DISCOVERY = {
    "kind": "discovery#restDescription",
    "name": "fleet",
    "version": "v1",
    "servicePath": "fleet/v1/",
    "resources": {
        "Units": {"methods": {"List": "GET units", "Get": "GET units/{unitName}",
                              "Set": "PUT units/{unitName}", "Delete": "DELETE units/{unitName}"}},
        "Machines": {"methods": {"List": "GET machines"}},
        "UnitState": {"methods": {"List": "GET state"}},
    },
}  # fmt: skip
