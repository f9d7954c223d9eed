"""The userspace data paths (the loops are compiled: `_datapath`).

`UdpDataPath` is flannel's ``udp`` backend: it forwards between a TUN device and a UDP socket, in
two threads that run without the GIL: packets read from the TUN go to the peer whose subnet holds
their destination (one inner IPv4 packet per datagram, flannel's wire format), datagrams received
go into the TUN. Where the kernel allows, it works on 64 KB TCP super-packets (TUN offloads, UDP GSO
and GRO) and falls back to one packet per datagram otherwise; ``offload`` chooses (see
`UdpDataPath`). Unlike stock flannel, a packet whose TTL runs out gets ICMP time-exceeded back
(flannel drops it silently); an unknown destination gets ICMP net-unreachable, as with flannel.

`VxlanDataPath` is the same machinery speaking VXLAN over a TAP device, wire-compatible with the
kernel's ``vxlan`` device: frames go to the VTEP whose MAC they are addressed to.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network

from grozd.flannel._datapath import COUNTER_NAMES, Core

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285

#: A peer: its public address (the data path's port is used), or an explicit ``(address, port)``.
Peer = str | IPv4Address | tuple[str | IPv4Address, int]

#: The Linux kernel's VXLAN port (IANA's is 4789), flannel's default.
VXLAN_PORT = 8472

__all__ = ["COUNTER_NAMES", "DEFAULT_PORT", "VXLAN_PORT", "Peer", "UdpDataPath", "VxlanDataPath",
           "mac_to_int"]


def mac_to_int(mac: str) -> int:
    """``"0a:58:00:00:00:01"`` as a 48-bit integer; ValueError when malformed."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return int("".join(parts), 16)


class _Loops:
    """Runs a `Core`'s two loops in threads of their own; start once, stop once."""

    _core: Core
    _thread_prefix = "flannel-dp"

    def _init_loops(self) -> None:
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def offloads(self) -> dict[str, bool]:
        """The offloads in use: vnet_hdr, tun_tso, udp_gso, udp_gro, tun_gso_write."""
        return self._core.offloads()

    @property
    def running(self) -> bool:
        """Both loops are running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def errors(self) -> dict[str, int]:
        """The errno that ended a loop on its own (0: none), by loop."""
        tx, rx = self._core.errors()
        return {"tun_to_udp": tx, "udp_to_tun": rx}

    def start(self) -> None:
        """Starts both loops (once)."""
        with self._lock:
            if self._started:
                raise RuntimeError(f"a {type(self).__name__} starts only once")
            self._started = True
            for name, loop in (("tun-to-udp", self._core.run_tx),
                               ("udp-to-tun", self._core.run_rx)):
                thread = threading.Thread(target=self._run, args=(name, loop),
                                          name=f"{self._thread_prefix}-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _run(self, name: str, loop: Callable[[], int]) -> None:
        err = loop()
        if err:
            log.error("%s: %s loop ended: %s", self._thread_prefix, name, os.strerror(err))

    def stop(self, timeout: float = 5.0) -> None:
        """Stops both loops and waits for them (idempotent); the fds can be closed afterwards."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._core.request_stop()
            for thread in self._threads:
                thread.join(timeout)
                if thread.is_alive():
                    raise TimeoutError(f"{thread.name} did not stop within {timeout} s")

    def counters(self) -> dict[str, int]:
        """Packets, bytes, system calls, ICMP sent and drops by reason (``drop_*``), summed over
        both loops; names in `COUNTER_NAMES`."""
        return self._core.counters()

    def _inject_refusal(self, send: bool = False, write: bool = False) -> None:
        """Tests only: the next UDP GSO send / coalesced TUN write fails as if the kernel refused
        the offload, so the run-time fallback to per-packet can be exercised."""
        self._core.inject_refusal(send, write)


class UdpDataPath(_Loops):
    """TUN <-> UDP forwarding for flannel's ``udp`` backend.

    ``tun_fd``: a TUN opened with ``IFF_TUN | IFF_NO_PI`` (and ``IFF_VNET_HDR`` for offloads);
    ``sock_fd``: a bound UDP socket. Both stay owned by the caller, who closes them after `stop`.
    The TUN is switched to non-blocking mode. ``mtu`` is the TUN's MTU (underlay MTU - 28).

    ``offload``: True requires TUN segmentation offload, UDP GSO and GRO (OSError or ValueError
    when the kernel refuses one); False forces one packet per datagram and per TUN write (what a
    stock flannel peer does; still batched); None (default) probes each and uses what works. An
    offload the kernel refuses later, at run time, is dropped for the per-packet path (counted in
    ``gso_send_fallbacks``/``gso_write_fallbacks``).
    """

    def __init__(self, tun_fd: int, sock_fd: int, mtu: int, offload: bool | None = None, *,
                 port: int = DEFAULT_PORT) -> None:
        mode = -1 if offload is None else int(bool(offload))
        self._core = Core(tun_fd, sock_fd, mtu, mode)
        self.mtu = mtu
        self.port = port
        self._thread_prefix = "flannel-udp"
        self._init_loops()

    def set_routes(self, routes: Mapping[IPv4Network | str, Peer]) -> None:
        """Replaces the whole route table atomically: subnet -> peer public IP (or (IP, port)).

        The longest matching prefix wins; destinations matching none get ICMP net-unreachable.
        """
        entries = []
        for subnet, peer in routes.items():
            net = ipaddress.IPv4Network(subnet)
            if isinstance(peer, tuple):
                host, port = peer
            else:
                host, port = peer, self.port
            addr = ipaddress.IPv4Address(host)
            entries.append((int(net.network_address), net.prefixlen, int(addr), int(port)))
        self._core.set_routes(entries)

    def __enter__(self) -> UdpDataPath:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class VxlanDataPath(_Loops):
    """TAP <-> UDP forwarding speaking VXLAN (RFC 7348) as the kernel's ``vxlan`` device does.

    ``tap_fd``: a TAP opened with ``IFF_TAP | IFF_NO_PI`` (and ``IFF_VNET_HDR`` for offloads);
    ``sock_fd``: a UDP socket bound to the VXLAN port (datagrams from any source port are taken).
    Both stay owned by the caller. ``mtu`` is the TAP's (underlay MTU - 50). ``offload`` as for
    `UdpDataPath`.

    Frames read from the TAP go to the VTEP their destination MAC belongs to (`set_peers`, the
    FDB); ARP requests for the addresses of `set_peers`' ``arp`` are answered with the MAC given
    there. Other broadcasts and unknown MACs are dropped, as the kernel backend drops them.
    """

    def __init__(self, tap_fd: int, sock_fd: int, mtu: int, vni: int,
                 offload: bool | None = None, *, port: int = VXLAN_PORT) -> None:
        mode = -1 if offload is None else int(bool(offload))
        self._core = Core(tap_fd, sock_fd, mtu, mode, 1, vni)
        self.mtu = mtu
        self.vni = vni
        self.port = port
        self._thread_prefix = "flannel-uvxlan"
        self._init_loops()

    def set_peers(self, fdb: Mapping[str, Peer],
                  arp: Mapping[IPv4Address | str, str] | None = None) -> None:
        """Replaces the FDB (VTEP MAC -> public IP, or (IP, port)) and the ARP answers (gateway
        IP -> VTEP MAC) together, atomically."""
        entries = []
        for mac, peer in fdb.items():
            host, port = peer if isinstance(peer, tuple) else (peer, self.port)
            entries.append((mac_to_int(mac), 48, int(ipaddress.IPv4Address(host)), int(port)))
        answers = [(int(ipaddress.IPv4Address(ip)), mac_to_int(mac))
                   for ip, mac in (arp or {}).items()]
        self._core.set_routes(entries, answers)

    def __enter__(self) -> VxlanDataPath:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
