"""Run grozd's API (LocalBackend) on a free loopback port in a background event loop.

Usable from synchronous tests::

    with GrozdServer() as server:
        urllib.request.urlopen(server.url + "/v2/keys/")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from grozd.api import ApiConfig, LocalBackend, expiry_loop, make_app
from grozd.api.app import ApiServer
from grozd.store import Store

T = TypeVar("T")


class GrozdServer:
    """A grozd API server in its own thread; ``url``, ``store``, ``backend``, ``app``."""

    def __init__(
        self,
        config: ApiConfig | None = None,
        backend_factory: Callable[[Store], Any] | None = None,
        expiry_interval: float = 0.5,
    ) -> None:
        self.config = config or ApiConfig()
        self.backend_factory = backend_factory or (lambda store: LocalBackend(store))
        self.expiry_interval = expiry_interval
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: Store | None = None
        self.backend: Any = None
        self.app: ApiServer | None = None
        self.url = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> GrozdServer:
        self._thread = threading.Thread(target=self._main, name="grozd-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("grozd server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _main(self) -> None:
        uvloop.run(self._serve())

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.store = Store()
            self.backend = self.backend_factory(self.store)
            self.app = make_app(self.store, self.backend, self.config)
            await self.app.start("127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.app.port}"
            expiry = asyncio.create_task(
                expiry_loop(self.store, self.backend, self.config.clock,
                            interval=self.expiry_interval)
            )
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        expiry.cancel()
        await self.app.stop()

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10) -> T:
        """Run ``fn()`` on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def sync(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run a plain function on the server's loop (to read the store safely)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper, timeout)
