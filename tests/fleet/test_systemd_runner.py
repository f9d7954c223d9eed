"""The systemd D-Bus runner against a real systemd 252 running as PID 1 of its own
namespaces (see `tests.fleet.sdlab`); skipped when that cannot be set up here."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grozd.fleet.runners import UnitState, make_runner, systemd_is_pid1
from grozd.fleet.unit import content_hash
from tests.fleet.conftest import Cluster, run_async
from tests.fleet.sdlab import Container, container

dbus_fast = pytest.importorskip("dbus_fast", reason="the systemd runner needs dbus-fast")

from grozd.fleet.runners.systemd import SystemdRunner  # noqa: E402

LOOP_UNIT = """[Unit]
Description=loop {tag}

[Service]
ExecStart=/bin/sh -c "echo hello {tag}; while true; do sleep 1; done"
"""

FAILING_UNIT = """[Unit]
Description=fails

[Service]
Type=oneshot
ExecStart=/bin/false
"""


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    with container(tmp_path_factory.mktemp("sd")) as c:
        yield c


def unique(stem: str) -> str:
    return f"{stem}-{secrets.token_hex(3)}.service"


def runner_for(sd: Container) -> SystemdRunner:
    return SystemdRunner(bus_address=sd.bus_address, root=sd.root)


async def until(check: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_load_start_stop_unload(sd: Container) -> None:
    name = unique("loop")
    text = LOOP_UNIT.format(tag=name)

    async def main() -> None:
        r = runner_for(sd)
        seen: list[tuple[str, UnitState | None]] = []
        r.subscribe(lambda n, s: seen.append((n, s)))
        await r.open()
        try:
            await r.load(name, text)
            st = r.units()[name]
            assert (st.load_state, st.active_state, st.hash) == (
                "loaded", "inactive", content_hash(text))  # fmt: skip
            link = sd.root / "run/systemd/system" / name
            assert link.is_symlink()
            assert str(link.readlink()) == f"/run/grozd/fleet/units/{name}"

            assert await r.run_job("StartUnit", name, timeout=10) == "done"
            await until(lambda: r.units()[name].sub_state == "running")
            assert r.units()[name].active_state == "active"
            assert any(n == name and s is not None and s.sub_state == "running"
                       for n, s in seen)  # fmt: skip
            out = sd.run("systemctl", "is-active", name, check=False).stdout.strip()
            assert out == "active"

            text_status, code = await r.status(name)
            assert code == 0 and f"{name} - loop {name}" in text_status
            assert "Active: active (running)" in text_status

            await until(lambda: bool(sd.run("journalctl", "-u", name, "-q", check=False)
                                     .stdout.strip()))  # fmt: skip
            lines = [line async for line in r.journal(name, lines=5)]
            assert any(f"hello {name}" in line for line in lines), lines

            await r.stop(name)  # queued; the state follows through PropertiesChanged
            await until(lambda: r.units()[name].active_state == "inactive")
            assert r.units()[name].sub_state == "dead"

            await r.start(name)
            await until(lambda: r.units()[name].sub_state == "running")
            await r.unload(name)
            assert name not in r.units()
            assert seen[-1] == (name, None)
            assert not link.exists() and not link.is_symlink()
            code = (await r.status(name))[1]
            assert code in (3, 4)
        finally:
            await r.close()

    run_async(main())


def test_failed_job_and_new_content(sd: Container) -> None:
    name = unique("fails")

    async def main() -> None:
        r = runner_for(sd)
        await r.open()
        try:
            await r.load(name, FAILING_UNIT)
            assert await r.run_job("StartUnit", name, timeout=10) == "failed"
            await until(lambda: r.units()[name].active_state == "failed")
            # New content replaces the old one on reload.
            fixed = FAILING_UNIT.replace("/bin/false", "/bin/true")
            await r.load(name, fixed)
            assert r.units()[name].hash == content_hash(fixed)
            assert await r.run_job("StartUnit", name, timeout=10) == "done"
            await until(lambda: r.units()[name].active_state == "inactive")
        finally:
            await r.close()
        assert not (sd.root / "run/grozd/fleet/units" / name).exists()

    run_async(main())


def test_restart_takes_running_units_over(sd: Container) -> None:
    name = unique("kept")

    async def main() -> None:
        first = runner_for(sd)
        await first.open()
        await first.load(name, LOOP_UNIT.format(tag=name))
        assert await first.run_job("StartUnit", name, timeout=10) == "done"
        # Gone without cleaning up (as after a crash): only the bus connection closes.
        assert first._bus is not None
        first._bus.disconnect()
        second = runner_for(sd)
        await second.open()
        try:
            st = second.units()[name]
            assert (st.active_state, st.sub_state) == ("active", "running")
            assert st.hash == content_hash(LOOP_UNIT.format(tag=name))
        finally:
            await second.close()
        out = sd.run("systemctl", "is-active", name, check=False).stdout.strip()
        assert out in ("inactive", "unknown")

    run_async(main())


def test_agent_runs_a_unit_through_systemd(sd: Container, etcd_url: str, prefix: str) -> None:
    """An agent and engine on real etcd, with this runner: the unit runs in systemd."""
    from grozd.client import Client

    name = unique("agent")

    async def main() -> None:
        async with Client([etcd_url]) as client:
            cluster = Cluster(client, prefix)
            try:
                node = await cluster.add(runner=runner_for(sd))
                await cluster.registry.submit(name, LOOP_UNIT.format(tag=name), "launched")

                async def running() -> bool:
                    st = (await cluster.registry.unit_states()).get((name, node.id))
                    return st is not None and st.sub_state == "running"

                await cluster.wait(running, 15, "the unit running under systemd")
                out = sd.run("systemctl", "is-active", name, check=False).stdout.strip()
                assert out == "active"
                await cluster.registry.set_desired_state(name, "loaded")

                async def stopped() -> bool:
                    st = (await cluster.registry.unit_states()).get((name, node.id))
                    return st is not None and st.active_state == "inactive"

                await cluster.wait(stopped, 15, "the unit stopped")
            finally:
                await cluster.close()

    run_async(main())


def test_make_runner_picks_systemd(tmp_path: Path) -> None:
    assert isinstance(make_runner("systemd", tmp_path), SystemdRunner)
    auto = make_runner("auto", tmp_path)
    assert isinstance(auto, SystemdRunner) == systemd_is_pid1()
