"""Test hosts as network namespaces: a switch namespace with a bridge, one namespace per
member joined to it by a veth pair, addresses in 198.19.0.0/24 inside them only. Nothing is
created in the machine's own namespace; everything is deleted on exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import secrets
import subprocess
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000
SUBNET = "198.19.0"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    name = f"gzp{secrets.token_hex(3)}"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot create a network namespace: {e}")
    ip("netns", "del", name)


class Lab:
    """A switch and `size` hosts; host i has address 198.19.0.i."""

    def __init__(self, size: int) -> None:
        self.tag = f"gz{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [f"{self.tag}-h{i}" for i in range(1, size + 1)]
        self.loop_thread: NamespaceLoop | None = None

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i}"

    def __enter__(self) -> Lab:
        try:
            ip("netns", "add", self.switch)
            ip("-n", self.switch, "link", "set", "lo", "up")
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
            ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts, 1):
                ip("netns", "add", host)
                ip("-n", host, "link", "set", "lo", "up")
                ip("-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                   "netns", self.switch)
                ip("-n", host, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                ip("-n", host, "link", "set", "eth0", "up")
                ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            self.loop_thread = NamespaceLoop(self.switch)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop_thread is not None:
            self.loop_thread.close()
        for ns in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def cut(self, i: int) -> None:
        """Partition host i away (its link goes down)."""
        ip("-n", self.hosts[i - 1], "link", "set", "eth0", "down")

    def heal(self, i: int) -> None:
        ip("-n", self.hosts[i - 1], "link", "set", "eth0", "up")

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run a coroutine on an event loop whose sockets live in the switch namespace."""
        return self.loop_thread.run(coro, timeout)


class NamespaceLoop:
    """An asyncio loop in a thread that has entered a network namespace: every socket it
    opens belongs to that namespace."""

    def __init__(self, netns: str) -> None:
        self.loop = asyncio.new_event_loop()
        entered = concurrent.futures.Future()

        def main() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
            except BaseException as e:
                entered.set_exception(e)
                return
            entered.set_result(None)
            asyncio.set_event_loop(self.loop)
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        entered.result(5)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
