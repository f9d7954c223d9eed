"""``uvxlan``: VXLAN in userspace, wire-compatible with the kernel ``vxlan`` backend.

Where the kernel backend has a VXLAN device, this one has a TAP device of the same name
(``flannel.<VNI>``) and a UDP socket on the VXLAN port (8472), joined by the compiled data path
(`grozd.flannel.datapath.VxlanDataPath`): frames the kernel routes into the TAP are wrapped in
the 8-byte VXLAN header and sent to the VTEP that owns their destination MAC; datagrams received
(from any source port) are unwrapped into the TAP.

Everything else is the kernel backend's: the TAP's MAC is the VtepMAC published in the lease
(BackendType ``vxlan``, so kernel hosts and this one route to each other), the TAP holds
``<subnet>.0/32``, and each remote lease gets the permanent neighbour ``<subnet>.0 -> VtepMAC``
and the route ``<subnet>/<len> via <subnet>.0 dev flannel.<VNI> onlink``. The FDB entry
``VtepMAC -> PublicIP`` lives in the data path instead of the kernel, which also answers ARP
requests for the remote gateways (the kernel should never need to ask; see the neighbours).

The VtepMAC is derived from the VNI and the host's PublicIP, so a restarted host publishes the
same lease and its peers have nothing to reprogram (the kernel backend keeps its device instead;
a TAP goes with the process that holds it).

`UserVxlan` is the device, socket and data path on their own (tests, benchmarks);
`UvxlanBackend` is what ``flanneld`` drives.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from grozd.flannel.backends import BackendError
from grozd.flannel.backends.udp import (
    IFF_UP,
    SIOCGIFFLAGS,
    SIOCSIFADDR,
    SIOCSIFFLAGS,
    SIOCSIFMTU,
    SIOCSIFNETMASK,
    _ifreq,
    _interface_with,
    _sockaddr_in,
    open_tun,
    run_in_netns,
    udp_socket,
)
from grozd.flannel.backends.vxlan import ENCAP_OVERHEAD, VxlanBackend
from grozd.flannel.config import BackendConfig
from grozd.flannel.datapath import VXLAN_PORT, VxlanDataPath
from grozd.flannel.leases import Lease
from grozd.flannel.netlink import Netlink, Underlay

log = logging.getLogger(__name__)

SIOCGIFHWADDR, SIOCSIFHWADDR = 0x8927, 0x8924
ARPHRD_ETHER = 1

__all__ = ["ENCAP_OVERHEAD", "UserVxlan", "UvxlanBackend", "stable_mac"]


def stable_mac(vni: int, public_ip: IPv4Address | str) -> str:
    """A locally administered unicast MAC that depends only on the VNI and the PublicIP."""
    digest = bytearray(hashlib.sha256(f"grozd-uvxlan/{vni}/{public_ip}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # locally administered, not multicast
    return ":".join(f"{b:02x}" for b in digest)


def _configure_tap(name: str, mac: str | None, mtu: int, address: IPv4Interface | None) -> str:
    """MAC, MTU, address, up (in this thread's namespace); returns the MAC in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fd = s.fileno()
        if mac is not None:
            raw = bytes.fromhex(mac.replace(":", ""))
            fcntl.ioctl(fd, SIOCSIFHWADDR, _ifreq(name, struct.pack("H6s", ARPHRD_ETHER, raw)))
        fcntl.ioctl(fd, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
        if address is not None:
            fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address.ip)))
            fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(address.network.netmask)))
        res = fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(name))
        (flags,) = struct.unpack_from("H", res, 16)
        fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
        res = fcntl.ioctl(fd, SIOCGIFHWADDR, _ifreq(name))
    return ":".join(f"{b:02x}" for b in res[18:24])


class UserVxlan:
    """One host's userspace VTEP: TAP ``device``, a UDP socket on ``port``, the data path.

    ``local_ip`` is the underlay address the socket binds to (all addresses when it is not
    local); ``mtu`` the TAP's, by default the MTU of the interface holding ``local_ip`` less 50.
    ``mac``: the TAP's MAC (the kernel picks one when None). ``address``: optionally set on the
    TAP (the daemon sets it through netlink instead). ``offload``/``vnet_hdr`` as for
    `grozd.flannel.backends.udp.UdpBackend`.

    Peers (`set_peer`/`remove_peer`) may change before and after `start`; the neighbours and
    routes that send traffic into the TAP are the caller's (the daemon's, or a test's).
    """

    def __init__(self, netns: str | None, local_ip: str, vni: int = 1, port: int = VXLAN_PORT,
                 mtu: int | None = None, *, device: str | None = None, mac: str | None = None,
                 address: IPv4Interface | str | None = None, offload: bool | None = None,
                 vnet_hdr: bool | None = None) -> None:
        self.netns = netns
        self.local_ip = ipaddress.IPv4Address(local_ip)
        self.vni = vni
        self.port = port
        self.device = device or f"flannel.{vni}"
        self.offload = offload
        self.vnet_hdr = offload is not False if vnet_hdr is None else vnet_hdr
        self.address = IPv4Interface(address) if address is not None else None
        self._mac = mac.lower() if mac is not None else None
        self._mtu = mtu
        self._peers: dict[IPv4Network, tuple[str, IPv4Address]] = {}
        self._tap_fd: int | None = None
        self._sock: socket.socket | None = None
        self.datapath: VxlanDataPath | None = None

    @property
    def mtu(self) -> int | None:
        """The TAP's MTU; known after `start` unless given."""
        return self._mtu

    @property
    def mac(self) -> str | None:
        """The TAP's MAC (the VtepMAC); known after `start` unless given."""
        return self._mac

    @property
    def peers(self) -> dict[IPv4Network, tuple[str, IPv4Address]]:
        """Remote subnet -> (VtepMAC, public IP)."""
        return dict(self._peers)

    def start(self) -> None:
        """Creates and configures the TAP, binds the socket and starts forwarding."""
        if self.datapath is not None:
            raise RuntimeError("this VTEP is already started")

        def setup() -> tuple[int, str, socket.socket, int, str]:
            underlay = _interface_with(self.local_ip)
            mtu = self._mtu
            if mtu is None:
                if underlay is None:
                    raise ValueError(f"{self.local_ip} is not an address here: give the mtu")
                mtu = underlay[1] - ENCAP_OVERHEAD
            fd, name = open_tun(self.device, self.vnet_hdr, tap=True)
            try:
                mac = _configure_tap(name, self._mac, mtu, self.address)
                bind_ip = self.local_ip if underlay is not None else IPv4Address(0)
                sock = udp_socket(bind_ip, self.port)
            except BaseException:
                os.close(fd)
                raise
            return fd, name, sock, mtu, mac

        fd, name, sock, mtu, mac = run_in_netns(self.netns, setup)
        try:
            datapath = VxlanDataPath(fd, sock.fileno(), mtu, self.vni, self.offload,
                                     port=self.port)
            self.datapath = datapath
            self._push()
            datapath.start()
        except BaseException:
            self.datapath = None
            sock.close()
            os.close(fd)
            raise
        self.device, self._mtu, self._mac = name, mtu, mac
        self._tap_fd, self._sock = fd, sock

    def stop(self) -> None:
        """Stops forwarding and removes the TAP (closing it deletes the device); idempotent."""
        if self.datapath is not None:
            self.datapath.stop()  # on a TimeoutError the fds stay open, as in UdpBackend
            self.datapath = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tap_fd is not None:
            os.close(self._tap_fd)
            self._tap_fd = None

    def set_peer(self, subnet: IPv4Network | str, mac: str, public_ip: str) -> None:
        """Frames to ``mac`` go to ``public_ip``; ARP for ``subnet``'s ``.0`` is answered with
        ``mac`` (replacing any previous peer of the subnet)."""
        subnet = ipaddress.IPv4Network(subnet)
        self._peers[subnet] = (mac.lower(), ipaddress.IPv4Address(public_ip))
        self._push()

    def remove_peer(self, subnet: IPv4Network | str) -> None:
        """Forgets the peer of ``subnet``."""
        if self._peers.pop(ipaddress.IPv4Network(subnet), None) is not None:
            self._push()

    def counters(self) -> dict[str, int]:
        """The data path's counters (empty when not started)."""
        return self.datapath.counters() if self.datapath is not None else {}

    def _push(self) -> None:
        if self.datapath is None:
            return
        fdb = {mac: str(ip) for mac, ip in self._peers.values()}
        arp = {subnet.network_address: mac for subnet, (mac, _) in self._peers.items()}
        self.datapath.set_peers(fdb, arp)

    def __enter__(self) -> UserVxlan:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UvxlanBackend(VxlanBackend):
    """The kernel vxlan backend with the VXLAN device and its FDB replaced by a `UserVxlan`."""

    def __init__(self, config: BackendConfig, netlink: Netlink, underlay: Underlay,
                 network: IPv4Network | None = None) -> None:
        super().__init__(config, netlink, underlay, network)
        self.core: UserVxlan | None = None

    async def setup(self) -> dict[str, Any]:
        """Create the TAP and start forwarding; its MAC goes into the lease."""
        link = await self.netlink.get_link(self.device)
        if link is not None and link.kind != "tun":
            # Most likely the kernel backend's device from an earlier run: the name is ours.
            log.warning("deleting %s (a %s device) to make way for the userspace VTEP",
                        self.device, link.kind)
            await self.netlink.delete_link(self.device)
        core = UserVxlan(
            self.netlink.netns, str(self.underlay.address), self.config.vni,
            self.config.port or VXLAN_PORT, self.mtu, device=self.device,
            mac=stable_mac(self.config.vni, self.underlay.public_ip),
        )  # fmt: skip
        try:
            await asyncio.to_thread(core.start)
        except OSError as exc:
            raise BackendError(f"cannot create the userspace VTEP {self.device}: {exc}") from exc
        self.core = core
        self.mac = core.mac
        dp = core.datapath
        log.info("userspace VXLAN device %s (VNI %d, port %d, MTU %d) has VtepMAC %s;"
                 " offloads %s", self.device, self.config.vni, core.port, self.mtu, core.mac,
                 dp.offloads if dp is not None else {})
        return {"VtepMAC": core.mac}

    async def _fdb_add(self, lease: Lease, mac: str) -> None:
        if self.core is None:
            raise BackendError("the userspace VTEP is not running")
        self.core.set_peer(lease.subnet, mac, str(lease.attrs.public_ip))

    async def _fdb_remove(self, lease: Lease, mac: str) -> None:
        if self.core is not None:
            self.core.remove_peer(lease.subnet)

    def counters(self) -> dict[str, int]:
        return self.core.counters() if self.core is not None else {}

    async def close(self) -> None:
        """Stop forwarding; the TAP (and the neighbours and routes on it) go with its fd."""
        core, self.core = self.core, None
        if core is not None:
            await asyncio.to_thread(core.stop)
