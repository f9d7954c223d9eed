"""flannel's ``udp`` backend: a TUN device and a UDP socket joined by the userspace data path.

The TUN (``flannel0``) holds ``<subnet>.0`` with the prefix length of the whole overlay network,
so the kernel routes the network to it (this host's own subnet, being more specific, stays on the
container bridge); its MTU is the underlay's less 28 (outer IPv4 + UDP). The socket listens on
the public IP, port 8285. Every datagram carries one inner IPv4 packet as is, so a stock flannel
``udp`` peer interoperates. The forwarding itself is `grozd.flannel.datapath.UdpDataPath`.

Everything that has to happen inside the host's network namespace (opening the TUN, configuring
it, creating the socket) runs in a short-lived thread that has ``setns``'d into it; the fds keep
working from any thread afterwards. Only plain ioctls are used, no netlink library.

`UdpBackend` is usable on its own (tests, benchmarks); `UdpDaemonBackend` is what ``flanneld``
drives: it creates the `UdpBackend` for the host's lease and routes every remote lease to its
host's PublicIP.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TypeVar

from grozd.flannel.backends import Backend, BackendError
from grozd.flannel.config import BackendConfig
from grozd.flannel.datapath import DEFAULT_PORT, UdpDataPath
from grozd.flannel.leases import Lease
from grozd.flannel.netlink import Netlink, Underlay

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Outer IPv4 (20) + UDP (8) headers.
ENCAP_OVERHEAD = 28
DEFAULT_DEVICE = "flannel0"
SOCKET_BUFFER = 4 * 1024 * 1024

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_UP = 0x0001, 0x0002, 0x1000, 0x4000, 0x1
SIOCGIFCONF, SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8912, 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCGIFMTU, SIOCSIFMTU = 0x8916, 0x891C, 0x8921, 0x8922
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
IFREQ_SIZE = 40  # struct ifreq on Linux (16-byte name + 24-byte union)

__all__ = ["DEFAULT_PORT", "ENCAP_OVERHEAD", "UdpBackend", "UdpDaemonBackend", "open_tun",
           "run_in_netns", "udp_socket"]


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in the named network namespace (``ip netns`` name), or here for None.

    It runs in a fresh thread that joins the namespace and then ends, so the caller's own thread
    never moves; sockets and TUN fds opened there stay in that namespace.
    """
    if netns is None:
        return fn()
    if not netns or "/" in netns or netns in (".", ".."):
        raise ValueError(f"bad network namespace name {netns!r}")
    out: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= 16:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack("16s", raw) + payload.ljust(IFREQ_SIZE - 16, b"\0")


def _sockaddr_in(addr: IPv4Address) -> bytes:
    return struct.pack("HH4s", socket.AF_INET, 0, addr.packed)


def open_tun(name: str, vnet_hdr: bool, *, tap: bool = False) -> tuple[int, str]:
    """Creates TUN ``name`` (IFF_TUN | IFF_NO_PI, plus IFF_VNET_HDR; IFF_TAP instead of IFF_TUN
    with ``tap``) in this thread's namespace; returns the fd (closing it removes the device) and
    the name the kernel gave it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", flags)))
    except BaseException:
        os.close(fd)
        raise
    return fd, res[:16].split(b"\0", 1)[0].decode()


def _configure_link(name: str, iface: IPv4Interface, mtu: int) -> None:
    """Address, MTU, up: set while down, so the kernel adds the network's route once, on up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fd = s.fileno()
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(name, _sockaddr_in(iface.ip)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(iface.network.netmask)))
        fcntl.ioctl(fd, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
        res = fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(name))
        (flags,) = struct.unpack_from("H", res, 16)
        fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))


def _interface_with(addr: IPv4Address) -> tuple[str, int] | None:
    """(name, MTU) of the interface holding ``addr`` in this thread's namespace, if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = IFREQ_SIZE * 32
        while True:
            buf = array.array("B", bytes(size))
            res = fcntl.ioctl(s.fileno(), SIOCGIFCONF,
                              struct.pack("iL", size, buf.buffer_info()[0]))
            (length,) = struct.unpack_from("i", res)
            if length < size:
                break
            size *= 2
        data = buf.tobytes()[:length]
        for off in range(0, length, IFREQ_SIZE):
            label = data[off:off + 16].split(b"\0", 1)[0].decode()
            if data[off + 20:off + 24] == addr.packed:
                name = label.split(":", 1)[0]  # an alias label names its device first
                res = fcntl.ioctl(s.fileno(), SIOCGIFMTU, _ifreq(name))
                return name, struct.unpack_from("i", res, 16)[0]
    return None


def udp_socket(bind_ip: IPv4Address, port: int) -> socket.socket:
    """A UDP socket bound to ``bind_ip:port`` with room for bursts (in this thread's namespace)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Bursts of 64 KB trains: give the socket room (forcing past rmem_max needs CAP_NET_ADMIN).
        for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                              (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        s.bind((str(bind_ip), port))
    except BaseException:
        s.close()
        raise
    return s


class UdpBackend:
    """One host's udp backend: the TUN, the socket and the data path, in namespace ``netns``.

    ``network`` is the whole overlay (e.g. 10.77.0.0/16), ``subnet`` this host's lease,
    ``public_ip`` where peers send to (the socket binds to it when it is a local address).
    ``mtu`` is the TUN's; by default the MTU of the interface holding ``public_ip`` less 28.
    ``offload`` is `UdpDataPath`'s; ``vnet_hdr`` (default: unless ``offload`` is False) opens the
    TUN with a virtio header, which every offload needs.

    Peers (``add_peer``/``remove_peer``) may change before and after `start`.
    """

    def __init__(self, netns: str | None, network: IPv4Network, subnet: IPv4Network,
                 public_ip: str, port: int = DEFAULT_PORT, mtu: int | None = None, *,
                 device: str = DEFAULT_DEVICE, offload: bool | None = None,
                 vnet_hdr: bool | None = None) -> None:
        self.netns = netns
        self.network = ipaddress.IPv4Network(network)
        self.subnet = ipaddress.IPv4Network(subnet)
        if not self.subnet.subnet_of(self.network):
            raise ValueError(f"subnet {self.subnet} is not inside network {self.network}")
        self.public_ip = ipaddress.IPv4Address(public_ip)
        self.port = port
        self.device = device
        self.offload = offload
        self.vnet_hdr = offload is not False if vnet_hdr is None else vnet_hdr
        self._mtu = mtu
        self._peers: dict[IPv4Network, IPv4Address] = {}
        self._tun_fd: int | None = None
        self._sock: socket.socket | None = None
        self.datapath: UdpDataPath | None = None

    @property
    def mtu(self) -> int | None:
        """The TUN's MTU (FLANNEL_MTU); known after `start` unless given."""
        return self._mtu

    @property
    def address(self) -> IPv4Interface:
        """The TUN's address: ``<subnet>.0`` with the network's prefix length."""
        return IPv4Interface((self.subnet.network_address, self.network.prefixlen))

    @property
    def peers(self) -> dict[IPv4Network, IPv4Address]:
        """Remote subnet -> public IP, as routed."""
        return dict(self._peers)

    def start(self) -> None:
        """Creates and configures the TUN, binds the socket and starts forwarding."""
        if self.datapath is not None:
            raise RuntimeError("the udp backend is already started")

        def setup() -> tuple[int, str, socket.socket, int]:
            underlay = _interface_with(self.public_ip)
            mtu = self._mtu
            if mtu is None:
                if underlay is None:
                    raise ValueError(f"{self.public_ip} is not an address here: give the mtu")
                mtu = underlay[1] - ENCAP_OVERHEAD
            try:
                fd, name = open_tun(self.device, self.vnet_hdr)
            except OSError as exc:
                if not self.vnet_hdr or self.offload or exc.errno != errno.EINVAL:
                    raise
                fd, name = open_tun(self.device, False)  # a kernel without virtio headers
            try:
                _configure_link(name, self.address, mtu)
                bind_ip = self.public_ip if underlay is not None else IPv4Address(0)
                sock = udp_socket(bind_ip, self.port)
            except BaseException:
                os.close(fd)
                raise
            return fd, name, sock, mtu

        fd, name, sock, mtu = run_in_netns(self.netns, setup)
        try:
            datapath = UdpDataPath(fd, sock.fileno(), mtu, self.offload, port=self.port)
            datapath.set_routes(self._peers)
            datapath.start()
        except BaseException:
            sock.close()
            os.close(fd)
            raise
        self.device, self._mtu = name, mtu
        self._tun_fd, self._sock, self.datapath = fd, sock, datapath

    def stop(self) -> None:
        """Stops forwarding and removes the TUN (closing it deletes the device); idempotent."""
        if self.datapath is not None:
            # On a TimeoutError the fds stay open: a loop still running must never see its fd
            # numbers reused by something else.
            self.datapath.stop()
            self.datapath = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun_fd is not None:
            os.close(self._tun_fd)
            self._tun_fd = None

    def add_peer(self, subnet: IPv4Network, public_ip: str) -> None:
        """Routes ``subnet`` to the host at ``public_ip`` (replacing any previous peer)."""
        subnet = ipaddress.IPv4Network(subnet)
        self._peers[subnet] = ipaddress.IPv4Address(public_ip)
        self._push()

    def remove_peer(self, subnet: IPv4Network) -> None:
        """Stops routing ``subnet`` (its destinations then get ICMP net-unreachable)."""
        if self._peers.pop(ipaddress.IPv4Network(subnet), None) is not None:
            self._push()

    def counters(self) -> dict[str, int]:
        """The data path's counters (empty when not started)."""
        return self.datapath.counters() if self.datapath is not None else {}

    def _push(self) -> None:
        if self.datapath is not None:
            self.datapath.set_routes(self._peers)

    def __enter__(self) -> UdpBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UdpDaemonBackend(Backend):
    """flannel's ``udp`` backend as the daemon drives it: a `UdpBackend` for the host's lease.

    The TUN (``flannel0``) appears when the lease is known (`configure`: its address is the
    lease's ``.0`` with the network's prefix, so the kernel routes the whole overlay into it);
    every remote lease becomes a route of the data path to its host's PublicIP. `close` stops
    forwarding and removes the TUN. Leases carry no BackendData, as flannel's.
    """

    type = "udp"

    def __init__(self, config: BackendConfig, netlink: Netlink, underlay: Underlay,
                 network: IPv4Network | None = None) -> None:
        super().__init__(config, netlink, underlay, network)
        self.core: UdpBackend | None = None

    @property
    def mtu(self) -> int:
        """The underlay's MTU less the outer IPv4 and UDP headers."""
        return self.underlay.mtu - ENCAP_OVERHEAD

    async def configure(self, lease: Lease) -> None:
        """Create the TUN for ``lease`` and start forwarding."""
        if self.network is None:
            raise BackendError("the udp backend needs the network (the TUN's prefix)")
        if self.core is not None:
            await self.close()
        core = UdpBackend(
            self.netlink.netns, self.network, lease.subnet, str(self.underlay.address),
            self.config.port or DEFAULT_PORT, self.mtu,
        )  # fmt: skip
        for subnet, peer in self.programmed.items():
            core.add_peer(subnet, str(peer.attrs.public_ip))
        # The TUN and socket are made in a thread that enters the namespace: off the event loop.
        await asyncio.to_thread(core.start)
        self.core = core
        dp = core.datapath
        log.info("udp: TUN %s (%s, MTU %d) forwarding on port %d; offloads %s", core.device,
                 core.address, self.mtu, core.port, dp.offloads if dp is not None else {})

    async def add(self, lease: Lease) -> None:
        """Route ``lease.subnet`` to its host (idempotent)."""
        log.info("adding subnet %s: PublicIP %s", lease.subnet, lease.attrs.public_ip)
        if self.core is not None:
            self.core.add_peer(lease.subnet, str(lease.attrs.public_ip))

    async def remove(self, lease: Lease) -> None:
        """Stop routing ``lease.subnet`` (its destinations get ICMP net-unreachable)."""
        log.info("removing subnet %s: PublicIP %s", lease.subnet, lease.attrs.public_ip)
        if self.core is not None:
            self.core.remove_peer(lease.subnet)

    def counters(self) -> dict[str, int]:
        return self.core.counters() if self.core is not None else {}

    async def close(self) -> None:
        """Stop forwarding; the TUN goes with its fd."""
        core, self.core = self.core, None
        if core is not None:
            await asyncio.to_thread(core.stop)
