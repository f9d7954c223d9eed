"""`make_app`: the etcd v2 API server over a store and a backend, without any CLI."""

from __future__ import annotations

from grozd.api.backend import Backend
from grozd.api.handlers import Api
from grozd.http.config import ApiConfig
from grozd.http.server import HttpServer
from grozd.store import Store


class ApiServer:
    """The HTTP API of one member: ``await start(host, port)`` ... ``await stop()``."""

    def __init__(self, store: Store, backend: Backend, config: ApiConfig) -> None:
        self.store = store
        self.backend = backend
        self.config = config
        self.api = Api(store, backend, config)
        self.http = HttpServer(self.api, config)
        self.api.server = self.http

    async def start(self, host: str = "127.0.0.1", port: int = 2379) -> None:
        """Listen (port 0: any free port, see `port`); call again for more addresses."""
        await self.http.start(host, port)

    async def stop(self) -> None:
        """Stop listening and drop every client connection."""
        await self.http.stop()

    @property
    def port(self) -> int:
        """The port listened on."""
        return self.http.port

    @property
    def url(self) -> str:
        """http://host:port of the first listening socket."""
        host, port = self.http.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


def make_app(store: Store, backend: Backend, config: ApiConfig | None = None) -> ApiServer:
    """Build the API server (not yet listening)."""
    return ApiServer(store, backend, config or ApiConfig())
