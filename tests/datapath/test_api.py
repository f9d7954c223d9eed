"""The Python face: probing, validation, lifecycle (one namespace, TUNs and sockets in it)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network

import pytest

from grozd.flannel.backends.udp import UdpBackend, open_tun, run_in_netns
from grozd.flannel.datapath import COUNTER_NAMES, UdpDataPath

from .nsutil import NETWORK, SUBNET_A, ip, namespaces, ns_socket

Fds = Callable[..., tuple[int, int]]


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with namespaces(1) as (name,):
        ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "lo")
        yield name


@pytest.fixture
def fds(ns: str) -> Iterator[Fds]:
    """make(vnet_hdr) -> (tun_fd, sock_fd): a fresh TUN and UDP socket in the namespace."""
    opened: list[int] = []
    socks: list[socket.socket] = []

    def make(vnet_hdr: bool = True) -> tuple[int, int]:
        fd, _ = run_in_netns(ns, lambda: open_tun("dp%d", vnet_hdr))
        opened.append(fd)
        sock = ns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(sock)
        sock.bind(("127.0.0.1", 0))
        return fd, sock.fileno()

    yield make
    for sock in socks:
        sock.close()
    for fd in opened:
        os.close(fd)


def test_probe_finds_all_offloads(fds: Fds) -> None:
    dp = UdpDataPath(*fds(), 1472)
    assert dp.offloads == {"vnet_hdr": True, "tun_tso": True, "udp_gso": True, "udp_gro": True,
                           "tun_gso_write": True}
    assert UdpDataPath(*fds(), 1472, offload=True).offloads == dp.offloads


def test_per_packet_mode(fds: Fds) -> None:
    with_vnet = UdpDataPath(*fds(True), 1472, offload=False).offloads
    assert with_vnet == {"vnet_hdr": True, "tun_tso": False, "udp_gso": False, "udp_gro": False,
                         "tun_gso_write": False}
    # Probing without a virtio header: the socket's offloads still help, the TUN's cannot.
    plain = UdpDataPath(*fds(False), 1472).offloads
    assert plain == {"vnet_hdr": False, "tun_tso": False, "udp_gso": True, "udp_gro": True,
                     "tun_gso_write": False}


def test_offloads_required_without_vnet_hdr(fds: Fds) -> None:
    with pytest.raises(ValueError, match="IFF_VNET_HDR"):
        UdpDataPath(*fds(False), 1472, offload=True)


def test_rejects_what_is_not_a_tun(fds: Fds) -> None:
    _, sock_fd = fds()
    with pytest.raises(OSError):
        UdpDataPath(sock_fd, sock_fd, 1472)
    with pytest.raises(ValueError, match="MTU"):
        UdpDataPath(*fds(), 20)


def test_set_routes_validation(fds: Fds) -> None:
    dp = UdpDataPath(*fds(), 1472)
    dp.set_routes({IPv4Network("10.77.2.0/24"): "192.0.2.2", "10.77.3.0/24": ("192.0.2.3", 9000),
                   "0.0.0.0/0": "192.0.2.9"})
    dp.set_routes({})
    with pytest.raises(ValueError):
        dp.set_routes({"10.77.2.1/24": "192.0.2.2"})  # host bits
    with pytest.raises(ValueError):
        dp.set_routes({"10.77.2.0/24": ("192.0.2.2", 0)})
    with pytest.raises(ValueError):
        dp.set_routes({"10.77.2.0/24": "192.0.2.2", IPv4Network("10.77.2.0/24"): "192.0.2.3"})
    with pytest.raises(ValueError):
        dp.set_routes({"10.77.2.0/24": "not-an-ip"})


def test_lifecycle(fds: Fds) -> None:
    dp = UdpDataPath(*fds(), 1472)
    assert tuple(dp.counters()) == COUNTER_NAMES and not any(dp.counters().values())
    dp.stop()  # before start: nothing to do
    dp = UdpDataPath(*fds(), 1472)
    with dp:
        assert dp.running
        with pytest.raises(RuntimeError):
            dp.start()
        dp.set_routes({"10.77.2.0/24": "192.0.2.2"})
    assert not dp.running
    assert dp.errors == {"tun_to_udp": 0, "udp_to_tun": 0}
    dp.stop()  # idempotent


def test_backend_validation_and_cleanup(ns: str) -> None:
    with pytest.raises(ValueError, match="not inside"):
        UdpBackend(ns, NETWORK, IPv4Network("10.78.1.0/24"), "192.0.2.1")
    nowhere = UdpBackend(ns, NETWORK, SUBNET_A, "198.51.100.1")
    with pytest.raises(ValueError, match="mtu"):
        nowhere.start()
    backend = UdpBackend(ns, NETWORK, SUBNET_A, "192.0.2.1", device="flannel7")
    with backend:
        assert backend.mtu == 65536 - 28  # lo's MTU less the encapsulation
        assert "10.77.1.0/16" in ip("-n", ns, "addr", "show", "flannel7")
        assert "10.77.0.0/16 dev flannel7" in ip("-n", ns, "route")
    assert "flannel7" not in ip("-n", ns, "link")
    backend.stop()  # idempotent
