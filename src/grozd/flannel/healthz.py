"""flanneld's health and metrics endpoint (`--healthz-port`): `/healthz` answers 200 once the
daemon holds its lease and has programmed its backend, `/metrics` exports the backend's data path
counters (packets, bytes, drops by reason) in Prometheus text."""

from __future__ import annotations

from grozd.flannel.daemon import Flanneld
from grozd.http.config import ApiConfig
from grozd.http.server import HttpServer, Request, Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(self, daemon: Flanneld) -> None:
        self.daemon = daemon
        self.http = HttpServer(self.handle, ApiConfig(cors=False))

    async def start(self, host: str, port: int) -> None:
        await self.http.start(host, port)

    async def stop(self) -> None:
        await self.http.stop()

    @property
    def port(self) -> int:
        return self.http.port

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == b"/healthz":
            if self.daemon.ready.is_set():
                return Response(200, [("Content-Type", "text/plain")], b"ok\n")
            return Response(503, [("Content-Type", "text/plain")], b"starting\n")
        if path == b"/metrics":
            return Response(200, [("Content-Type", CONTENT_TYPE)], self.metrics().encode())
        return Response(404, [("Content-Type", "text/plain")], b"not found\n")

    def metrics(self) -> str:
        backend = self.daemon.backend
        counters = backend.counters() if backend is not None else {}
        lines = [
            "# HELP flannel_ready Whether the daemon holds a lease and programmed its backend.",
            "# TYPE flannel_ready gauge",
            f"flannel_ready {int(self.daemon.ready.is_set())}",
        ]
        for name, value in sorted(counters.items()):
            metric = f"flannel_datapath_{name}_total"
            lines += [f"# HELP {metric} Data path counter {name}.",
                      f"# TYPE {metric} counter", f"{metric} {value}"]
        return "\n".join(lines) + "\n"
