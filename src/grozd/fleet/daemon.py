"""fleetd: the agent, an engine candidate and the API in one process.

`Fleetd.run` opens the runner, starts the API (so the machine can announce where it
answers), then runs the agent and the engine candidate until `Fleetd.stop`. Stopping is
orderly: the engine hands its lease back, the agent stops its units and withdraws the
machine (so the engine elsewhere moves them at once), the runner is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from grozd.client import Client
from grozd.fleet.agent import Agent
from grozd.fleet.api import FleetAPI
from grozd.fleet.engine import Engine
from grozd.fleet.registry import DEFAULT_PREFIX, MachineState, Registry
from grozd.fleet.runners import Runner, make_runner
from grozd.fleet.unit import SpecifierContext

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/grozd/fleet")
DEFAULT_API_LISTEN = "127.0.0.1:49153"


class FleetdError(Exception):
    """fleetd cannot start as configured."""


def parse_metadata(text: str) -> dict[str, str]:
    """fleet's ``--metadata`` format: ``key=value,key2=value2``."""
    meta: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"invalid metadata {item!r}: expected key=value")
        meta[key.strip()] = value.strip()
    return meta


def read_machine_id(path: str = "/etc/machine-id") -> str:
    """This host's machine ID (32 lowercase hex digits)."""
    try:
        text = Path(path).read_text().strip().lower().replace("-", "")
    except OSError as exc:
        raise FleetdError(f"cannot read {path}: {exc}; pass --machine-id") from None
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise FleetdError(f"{path} does not hold a machine ID; pass --machine-id")
    return text


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass
class FleetdConfig:
    """Everything fleetd can be told (flags of ``grozd fleetd``)."""

    etcd_servers: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    etcd_key_prefix: str = DEFAULT_PREFIX
    etcd_request_timeout: float = 3.0
    machine_id: str | None = None
    public_ip: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    agent_ttl: int = 30
    agent_reconcile_interval: float = 30.0
    engine_reconcile_interval: float = 10.0
    engine_lease_ttl: int = 10
    disable_engine: bool = False
    api_listen: str = DEFAULT_API_LISTEN
    api_advertise: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    runner: str = "auto"


class Fleetd:
    """One machine's fleet daemon."""

    def __init__(self, config: FleetdConfig, runner: Runner | None = None) -> None:
        self.config = config
        self.machine_id = config.machine_id or read_machine_id()
        self._runner = runner
        self.agent: Agent | None = None
        self.engine: Engine | None = None
        self.api: FleetAPI | None = None
        self.endpoint = ""
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def stop(self) -> None:
        """Ask `run` to shut down cleanly."""
        self._stop.set()

    async def run(self) -> None:
        """Run until `stop`."""
        cfg = self.config
        client = Client(cfg.etcd_servers, timeout=cfg.etcd_request_timeout)
        registry = Registry(client, cfg.etcd_key_prefix)
        runner = self._runner or make_runner(
            cfg.runner,
            cfg.state_dir,
            context=SpecifierContext(machine_id=self.machine_id),
        )
        api = self.api = FleetAPI(registry, runner)
        tasks: list[asyncio.Task[None]] = []
        try:
            await runner.open()
            host, port = split_host_port(cfg.api_listen)
            await api.start(host, port)
            self.endpoint = cfg.api_advertise or self._advertise(host, api.port)
            machine = MachineState(
                id=self.machine_id,
                public_ip=cfg.public_ip,
                metadata=dict(cfg.metadata),
                endpoint=self.endpoint,
            )
            self.agent = Agent(
                registry, runner, machine,
                ttl=cfg.agent_ttl, reconcile_interval=cfg.agent_reconcile_interval,
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            tasks.append(loop.create_task(self.agent.run(), name="agent"))
            if not cfg.disable_engine:
                self.engine = Engine(
                    registry, self.machine_id,
                    lease_ttl=cfg.engine_lease_ttl,
                    reconcile_interval=cfg.engine_reconcile_interval,
                )  # fmt: skip
                tasks.append(loop.create_task(self.engine.run(), name="engine"))
            log.info("event=fleetd_started machine=%s api=%s prefix=%s",
                     self.machine_id, self.endpoint, registry.prefix)  # fmt: skip
            self.ready.set()
            stop = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    log.error("event=fleetd_task_failed task=%s error=%r",
                              task.get_name(), str(task.exception()))  # fmt: skip
        finally:
            if self.engine is not None:
                self.engine.stop()
            for task in tasks:
                if task.get_name() == "engine":
                    # Give the engine a moment to hand its lease back.
                    await asyncio.wait({task}, timeout=5.0)
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.agent is not None:
                await self.agent.shutdown()
            await runner.close()
            await api.stop()
            await client.close()
            log.info("event=fleetd_stopped machine=%s", self.machine_id)

    def _advertise(self, host: str, port: int) -> str:
        if host in ("0.0.0.0", "::", ""):
            host = self.config.public_ip or socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


def default_state_dir() -> Path:
    """/var/lib/grozd/fleet for root, else a per-user directory."""
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    return Path.home() / ".local" / "state" / "grozd" / "fleet"
