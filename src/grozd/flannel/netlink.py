"""The few netlink operations flannel needs, on one network namespace.

pyroute2's asyncio API cannot run on uvloop, so its synchronous ``IPRoute`` lives in a
dedicated thread (one per `Netlink`), with its own plain asyncio loop, and every call is
handed to that thread. Operations on the per-lease paths (neighbours, FDB entries,
routes) address one object by its exact key; only setup (`find_underlay`,
`ensure_addr`) lists anything.

The ``*_many`` variants apply one kind of operation to many objects at once, for bursts of
lease events: their requests go to the kernel many to one ``send``, on a plain netlink socket
of their own (opened in the namespace), and each request's acknowledgement is read back, so
every object still gets its own answer. They send the same requests the single-object calls
send through pyroute2, one object after another in the order given.

The ``*_many`` variants apply one kind of operation to many objects at once, for bursts of
lease events: their requests go to the kernel many to one ``send`` on a plain netlink socket
of their own (opened in the namespace), and each request's acknowledgement is read back, so
every object still gets its own answer. They send exactly the requests the single-object
calls send through pyroute2.

All ``ensure``/``replace``/``append`` operations are idempotent and the deletes report
whether there was something to delete, so a resync may simply apply everything again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network
from typing import Any, TypeVar

T = TypeVar("T")

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
RTN_LOCAL = 2
IFF_UP = 1

# Netlink message framing (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h).
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_REPLACE = 0x100
_NLM_F_CREATE = 0x400
_NLM_F_APPEND = 0x800
_RTM_NEWROUTE, _RTM_DELROUTE = 24, 25
_RTM_NEWNEIGH, _RTM_DELNEIGH = 28, 29
_NDA_DST, _NDA_LLADDR = 1, 2
_RTA_DST, _RTA_OIF, _RTA_GATEWAY = 1, 4, 5
_NUD_NOARP = 0x40
_NTF_SELF = 0x02
_AF_BRIDGE = 7
_RT_TABLE_MAIN = 254
_RTPROT_STATIC = 4
_RTN_UNICAST = 1
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
#: Requests per ``send``; their acknowledgements must fit in the socket's receive buffer.
_BATCH_CHUNK = 256
_BATCH_RCVBUF = 4 << 20
_BATCH_TIMEOUT = 30.0


class NetlinkOpError(OSError):
    """A netlink request failed; ``errno`` is the kernel's answer."""


#: One answer of a ``*_many`` call: None (done), True/False (deleted / there was nothing to
#: delete) or the error.
BatchResult = NetlinkOpError | bool | None


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface."""

    index: int
    name: str
    kind: str | None
    mtu: int
    mac: str | None
    up: bool


@dataclass(frozen=True, slots=True)
class Underlay:
    """The interface flannel sends its traffic over (flannel's "external interface").

    ``address`` is the interface's own IPv4 address (the VXLAN source); ``public_ip`` is
    what other hosts are told to send to (the same unless behind NAT).
    """

    name: str
    index: int
    address: IPv4Address
    public_ip: IPv4Address
    mtu: int


@dataclass(frozen=True, slots=True)
class RouteLookup:
    """The kernel's answer to "how would a packet to X go?"."""

    oif: int | None
    gateway: IPv4Address | None
    local: bool


class Netlink:
    """Netlink on namespace ``netns`` (None: this process's), from a thread of its own.

    Use as ``async with Netlink("name") as nl: ...``. A named namespace must exist: it is
    never created here.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._executor: ThreadPoolExecutor | None = None
        self._ipr: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._index_cache: dict[str, int] = {}
        self._batch_sock: socket.socket | None = None
        self._seq = 0

    async def __aenter__(self) -> Netlink:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the netlink socket (in the namespace) in the dedicated thread."""
        if self._executor is None:
            name = f"netlink-{self.netns or 'self'}"
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        await self._call(self._open)

    async def close(self) -> None:
        """Close the socket and stop the thread."""
        if self._executor is None:
            return
        try:
            await self._call(self._close)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            raise RuntimeError("Netlink is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    # -- in the thread ---------------------------------------------------------------------

    def _open(self) -> None:
        if self._ipr is not None:
            return
        from pyroute2 import IPRoute

        # A plain selector loop of this thread's own: given no loop, pyroute2 would ask
        # the global policy, which may be uvloop's.
        self._loop = asyncio.SelectorEventLoop()
        try:
            if self.netns is None:
                self._ipr = IPRoute(groups=0, use_event_loop=self._loop)
            else:
                from pyroute2 import config as pyroute2_config

                # pyroute2 opens the socket in a forked child, then SIGTERMs it. A child
                # that kept our SIGTERM handler would write the signal to the event loop's
                # wakeup fd, which it shares with us: the daemon would take it for its own
                # SIGTERM and stop. This makes the child reset its handlers first.
                pyroute2_config.disable_mp_signal = True
                # flags=0: a missing namespace is an error, not something to create.
                self._ipr = IPRoute(
                    netns=self.netns, flags=0, groups=0, use_event_loop=self._loop
                )
        except BaseException:
            self._loop.close()
            self._loop = None
            raise

    def _close(self) -> None:
        try:
            if self._batch_sock is not None:
                self._batch_sock.close()
                self._batch_sock = None
            if self._ipr is not None:
                self._ipr.close()
        finally:
            self._ipr = None
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    def _req(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one pyroute2 request, turning its NetlinkError into `NetlinkOpError`."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kwargs)
        except NetlinkError as exc:
            code = exc.code or errno.EIO
            raise NetlinkOpError(code, f"{what}: {os.strerror(code)}") from None

    def _link_msg(self, name: str) -> Any | None:
        try:
            msgs = self._req(f"get link {name}", self._ipr.link, "get", ifname=name)
        except NetlinkOpError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return msgs[0] if msgs else None

    def _index(self, name: str) -> int:
        index = self._index_cache.get(name)
        if index is None:
            msg = self._link_msg(name)
            if msg is None:
                raise NetlinkOpError(errno.ENODEV, f"no interface named {name}")
            index = self._index_cache[name] = msg["index"]
        return index

    def _on_link(self, name: str, fn: Callable[[int], Any]) -> Any:
        """Run ``fn(ifindex)``; a device recreated under the same name is looked up again."""
        try:
            return fn(self._index(name))
        except NetlinkOpError as exc:
            if exc.errno != errno.ENODEV or name not in self._index_cache:
                raise
            del self._index_cache[name]
            return fn(self._index(name))

    # -- links -----------------------------------------------------------------------------

    async def get_link(self, name: str) -> Link | None:
        """The interface called ``name``, or None."""
        return await self._call(self._get_link, name)

    def _get_link(self, name: str) -> Link | None:
        msg = self._link_msg(name)
        return _link(msg) if msg is not None else None

    async def set_up(self, name: str) -> None:
        """Bring an interface up."""
        await self._call(
            self._on_link, name,
            lambda i: self._req(f"set {name} up", self._ipr.link, "set", index=i, state="up"),
        )

    async def delete_link(self, name: str) -> bool:
        """Delete interface ``name``; False if there was none."""
        return await self._call(self._delete_link, name)

    def _delete_link(self, name: str) -> bool:
        self._index_cache.pop(name, None)
        msg = self._link_msg(name)
        if msg is None:
            return False
        return self._absent_ok(f"delete {name}", (errno.ENODEV,), self._ipr.link, "del",
                               index=msg["index"])

    async def ensure_vxlan(
        self,
        name: str,
        vni: int,
        port: int,
        local_ip: IPv4Address | str,
        dev: str,
        mtu: int,
    ) -> Link:
        """A VXLAN device with learning off, up, with this MTU; returns it (with its MAC).

        An existing device with the same parameters is kept, so its MAC (published in
        the lease) survives restarts; one that differs is deleted and created again.
        """
        return await self._call(self._ensure_vxlan, name, vni, port, IPv4Address(local_ip), dev,
                                mtu)

    def _ensure_vxlan(
        self, name: str, vni: int, port: int, local_ip: IPv4Address, dev: str, mtu: int
    ) -> Link:
        dev_index = self._index(dev)
        existing = self._link_msg(name)
        if existing is not None:
            wanted = {"kind": "vxlan", "vni": vni, "port": port, "local": str(local_ip),
                      "link": dev_index, "learning": 0}
            have = _vxlan_params(existing)
            if have != wanted:
                self._req(f"delete {name}", self._ipr.link, "del", index=existing["index"])
                existing = None
        if existing is None:
            self._index_cache.pop(name, None)
            self._req(
                f"create vxlan {name}", self._ipr.link, "add",
                ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
                vxlan_local=str(local_ip), vxlan_link=dev_index, vxlan_learning=0, mtu=mtu,
            )  # fmt: skip
        index = self._index(name)
        self._req(f"set {name} mtu {mtu} up", self._ipr.link, "set", index=index, mtu=mtu,
                  state="up")
        msg = self._link_msg(name)
        assert msg is not None
        return _link(msg)

    # -- addresses -------------------------------------------------------------------------

    async def ensure_addr(
        self, name: str, address: IPv4Interface | str, *, exclusive: bool = True
    ) -> None:
        """Make ``address`` (``10.5.34.0/32``) an address of ``name``.

        ``exclusive`` removes the link's other IPv4 addresses, as flannel does for its
        VXLAN device (a stale address from an old lease would attract traffic).
        """
        await self._call(self._ensure_addr, name, IPv4Interface(address), exclusive)

    def _ensure_addr(self, name: str, address: IPv4Interface, exclusive: bool) -> None:
        index = self._index(name)
        have = False
        for current in self._addrs(index):
            if current == address:
                have = True
            elif exclusive:
                self._req(f"delete {current} from {name}", self._ipr.addr, "del", index=index,
                          address=str(current.ip), prefixlen=current.network.prefixlen)
        if not have:
            self._req(f"add {address} to {name}", self._ipr.addr, "add", index=index,
                      address=str(address.ip), prefixlen=address.network.prefixlen)

    def _addrs(self, index: int) -> list[IPv4Interface]:
        msgs = self._req("list addresses", self._ipr.addr, "dump", family=socket.AF_INET,
                         index=index)
        out = []
        for msg in msgs:
            # Filtered again here: older kernels ignore the index in a dump request.
            if msg["index"] != index:
                continue
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append(IPv4Interface(f"{addr}/{msg['prefixlen']}"))
        return out

    async def addresses(self, name: str) -> list[IPv4Interface]:
        """The IPv4 addresses of an interface."""
        return await self._call(lambda: self._addrs(self._index(name)))

    # -- neighbours and FDB ----------------------------------------------------------------

    async def neigh_replace(self, dev: str, ip: IPv4Address | str, mac: str) -> None:
        """A permanent neighbour entry ``ip -> mac`` on ``dev`` (created or replaced)."""
        what = f"neighbour {ip} lladdr {mac} dev {dev}"
        await self._call(
            self._on_link, dev,
            lambda i: self._req(what, self._ipr.neigh, "replace", ifindex=i, dst=str(ip),
                                lladdr=mac, state=NUD_PERMANENT),
        )

    async def neigh_delete(self, dev: str, ip: IPv4Address | str) -> bool:
        """Delete the neighbour entry for ``ip`` on ``dev``; False if there was none."""
        what = f"delete neighbour {ip} dev {dev}"
        return await self._call(
            self._on_link, dev,
            lambda i: self._absent_ok(what, (errno.ENOENT,), self._ipr.neigh, "del",
                                      ifindex=i, dst=str(ip)),
        )

    async def fdb_append(self, dev: str, mac: str, dst: IPv4Address | str) -> None:
        """Add the FDB entry ``mac -> dst`` (the remote VTEP) to a VXLAN device."""
        what = f"fdb {mac} dst {dst} dev {dev}"

        def append(i: int) -> None:
            try:
                self._req(what, self._ipr.fdb, "append", ifindex=i, lladdr=mac, dst=str(dst))
            except NetlinkOpError as exc:
                if exc.errno != errno.EEXIST:
                    raise

        await self._call(self._on_link, dev, append)

    async def fdb_delete(self, dev: str, mac: str, dst: IPv4Address | str) -> bool:
        """Delete the FDB entry ``mac -> dst``; False if there was none."""
        what = f"delete fdb {mac} dst {dst} dev {dev}"
        return await self._call(
            self._on_link, dev,
            lambda i: self._absent_ok(what, (errno.ENOENT,), self._ipr.fdb, "del", ifindex=i,
                                      lladdr=mac, dst=str(dst)),
        )

    # -- routes ----------------------------------------------------------------------------

    async def replace_route(
        self,
        dst: IPv4Network | str,
        gateway: IPv4Address | str,
        dev: str,
        onlink: bool = False,
    ) -> None:
        """``ip route replace dst via gateway dev dev [onlink]``."""
        what = f"route {dst} via {gateway} dev {dev}{' onlink' if onlink else ''}"
        await self._call(
            self._on_link, dev,
            lambda i: self._req(what, self._ipr.route, "replace", dst=str(dst),
                                gateway=str(gateway), oif=i,
                                flags=RTNH_F_ONLINK if onlink else 0),
        )

    async def delete_route(
        self,
        dst: IPv4Network | str,
        gateway: IPv4Address | str | None = None,
        dev: str | None = None,
    ) -> bool:
        """Delete the route to ``dst`` (matching gateway and device when given).

        False if there was no such route.
        """
        what = f"delete route {dst}" + (f" via {gateway}" if gateway else "") + (
            f" dev {dev}" if dev else ""
        )
        kwargs: dict[str, Any] = {"dst": str(dst)}
        if gateway is not None:
            kwargs["gateway"] = str(gateway)

        def delete(oif: int | None) -> bool:
            extra = {"oif": oif} if oif is not None else {}
            return self._absent_ok(what, (errno.ESRCH,), self._ipr.route, "del", **kwargs,
                                   **extra)

        if dev is None:
            return await self._call(delete, None)
        try:
            return await self._call(self._on_link, dev, delete)
        except NetlinkOpError as exc:
            if exc.errno == errno.ENODEV:
                return False  # the device went, and its routes with it
            raise

    async def lookup_route(self, dst: IPv4Address | str) -> RouteLookup | None:
        """How the kernel would route a packet to ``dst``; None when it is unreachable."""
        return await self._call(self._lookup_route, IPv4Address(dst))

    def _lookup_route(self, dst: IPv4Address) -> RouteLookup | None:
        try:
            msgs = self._req(f"route get {dst}", self._ipr.route, "get", dst=str(dst))
        except NetlinkOpError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return None
            raise
        if not msgs:
            return None
        msg = msgs[0]
        gw = msg.get_attr("RTA_GATEWAY")
        return RouteLookup(
            oif=msg.get_attr("RTA_OIF"),
            gateway=IPv4Address(gw) if gw else None,
            local=msg["type"] == RTN_LOCAL,
        )

    def _absent_ok(
        self, what: str, absent: tuple[int, ...], fn: Callable[..., Any], *args: Any,
        **kwargs: Any,
    ) -> bool:
        try:
            self._req(what, fn, *args, **kwargs)
        except NetlinkOpError as exc:
            if exc.errno in absent:
                return False
            raise
        return True

    # -- many objects at once --------------------------------------------------------------

    async def neigh_replace_many(
        self, dev: str, entries: Sequence[tuple[IPv4Address | str, str]]
    ) -> list[BatchResult]:
        """`neigh_replace` for each ``(ip, mac)``; None or the error for each, in order."""
        items = [(IPv4Address(ip), mac) for ip, mac in entries]

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_neigh_msg(_RTM_NEWNEIGH, _NLM_F_CREATE | _NLM_F_REPLACE, i, ip, mac),
                     f"neighbour {ip} lladdr {mac} dev {dev}") for ip, mac in items]

        return await self._call(self._batch, dev, build, (), ())

    async def neigh_delete_many(
        self, dev: str, ips: Sequence[IPv4Address | str]
    ) -> list[BatchResult]:
        """`neigh_delete` for each ip; True/False (deleted / none) or the error, in order."""
        items = [IPv4Address(ip) for ip in ips]

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_neigh_msg(_RTM_DELNEIGH, 0, i, ip, None),
                     f"delete neighbour {ip} dev {dev}") for ip in items]

        return await self._call(self._batch, dev, build, (errno.ENOENT,), ())

    async def fdb_append_many(
        self, dev: str, entries: Sequence[tuple[str, IPv4Address | str]]
    ) -> list[BatchResult]:
        """`fdb_append` for each ``(mac, dst)``; None or the error for each, in order."""
        items = [(mac, IPv4Address(dst)) for mac, dst in entries]

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_fdb_msg(_RTM_NEWNEIGH, _NLM_F_CREATE | _NLM_F_APPEND, i, mac, dst),
                     f"fdb {mac} dst {dst} dev {dev}") for mac, dst in items]

        return await self._call(self._batch, dev, build, (), (errno.EEXIST,))

    async def fdb_delete_many(
        self, dev: str, entries: Sequence[tuple[str, IPv4Address | str]]
    ) -> list[BatchResult]:
        """`fdb_delete` for each ``(mac, dst)``; True/False or the error for each, in order."""
        items = [(mac, IPv4Address(dst)) for mac, dst in entries]

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_fdb_msg(_RTM_DELNEIGH, 0, i, mac, dst),
                     f"delete fdb {mac} dst {dst} dev {dev}") for mac, dst in items]

        return await self._call(self._batch, dev, build, (errno.ENOENT,), ())

    async def replace_route_many(
        self,
        dev: str,
        routes: Sequence[tuple[IPv4Network | str, IPv4Address | str]],
        onlink: bool = False,
    ) -> list[BatchResult]:
        """`replace_route` for each ``(dst, gateway)`` on ``dev``; None or the error each."""
        items = [(IPv4Network(dst), IPv4Address(gw)) for dst, gw in routes]
        flags = RTNH_F_ONLINK if onlink else 0
        suffix = " onlink" if onlink else ""

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_route_msg(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, dst, gw, i,
                                flags),
                     f"route {dst} via {gw} dev {dev}{suffix}") for dst, gw in items]

        return await self._call(self._batch, dev, build, (), ())

    async def delete_route_many(
        self, dev: str, routes: Sequence[tuple[IPv4Network | str, IPv4Address | str]]
    ) -> list[BatchResult]:
        """`delete_route` for each ``(dst, gateway)`` on ``dev``: True/False or the error.

        All False when ``dev`` is gone (its routes went with it).
        """
        items = [(IPv4Network(dst), IPv4Address(gw)) for dst, gw in routes]

        def build(i: int) -> list[tuple[bytes, str]]:
            return [(_route_msg(_RTM_DELROUTE, 0, dst, gw, i, 0),
                     f"delete route {dst} via {gw} dev {dev}") for dst, gw in items]

        try:
            return await self._call(self._batch, dev, build, (errno.ESRCH,), ())
        except NetlinkOpError as exc:
            if exc.errno == errno.ENODEV:
                return [False] * len(items)
            raise

    def _batch(
        self,
        dev: str,
        build: Callable[[int], list[tuple[bytes, str]]],
        absent: tuple[int, ...],
        fine: tuple[int, ...],
    ) -> list[BatchResult]:
        """Send ``build(ifindex of dev)``'s requests; each one's answer, in order.

        An errno in ``absent`` answers False (others True), one in ``fine`` None. Requests
        that found the device gone are sent again once, to a device recreated under the
        same name (as `_on_link` does); the device missing altogether raises ENODEV.
        """
        cached = dev in self._index_cache
        reqs = build(self._index(dev))
        codes = self._send_batch([msg for msg, _ in reqs])
        gone = [n for n, code in enumerate(codes) if code == errno.ENODEV]
        if gone and cached:
            del self._index_cache[dev]
            again = build(self._index(dev))
            for n, code in zip(gone, self._send_batch([again[n][0] for n in gone]),
                               strict=True):
                codes[n] = code
        out: list[BatchResult] = []
        for (_, what), code in zip(reqs, codes, strict=True):
            if code == 0:
                out.append(True if absent else None)
            elif code in absent:
                out.append(False)
            elif code in fine:
                out.append(None)
            else:
                out.append(NetlinkOpError(code, f"{what}: {os.strerror(code)}"))
        return out

    def _batch_socket(self) -> socket.socket:
        if self._batch_sock is None:

            def make() -> socket.socket:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

            if self.netns is None:
                sock = make()
            else:
                from grozd.flannel.backends.udp import run_in_netns

                sock = run_in_netns(self.netns, make)
            try:
                sock.bind((0, 0))
                for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, _BATCH_RCVBUF)
                        break
                    except OSError:
                        continue
                # Acknowledge errors with the request's header only, not all of it.
                try:
                    sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
                except OSError:
                    pass
                sock.settimeout(_BATCH_TIMEOUT)
            except BaseException:
                sock.close()
                raise
            self._batch_sock = sock
        return self._batch_sock

    def _send_batch(self, msgs: list[bytes]) -> list[int]:
        """Send requests (without sequence numbers yet), ``_BATCH_CHUNK`` to a ``send``;
        the errno each was answered with (0: done)."""
        sock = self._batch_socket()
        codes: list[int] = []
        for start in range(0, len(msgs), _BATCH_CHUNK):
            chunk = msgs[start:start + _BATCH_CHUNK]
            first = self._seq + 1
            self._seq += len(chunk)
            buf = bytearray()
            for n, msg in enumerate(chunk):
                buf += msg[:8] + struct.pack("=II", (first + n) & 0xFFFFFFFF, 0) + msg[16:]
            pending = {(first + n) & 0xFFFFFFFF: n for n in range(len(chunk))}
            answers = [0] * len(chunk)
            try:
                sock.send(bytes(buf))
                while pending:
                    data = sock.recv(1 << 20)
                    offset = 0
                    while offset + 16 <= len(data):
                        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data,
                                                                             offset)
                        if length < 16:
                            break
                        if kind == _NLMSG_ERROR and seq in pending:
                            (err,) = struct.unpack_from("=i", data, offset + 16)
                            answers[pending.pop(seq)] = -err
                        offset += (length + 3) & ~3
            except OSError:
                # A socket in an unknown state (lost answers, a timeout): start afresh.
                sock.close()
                self._batch_sock = None
                raise
            codes += answers
        return codes

    # -- the underlay ----------------------------------------------------------------------

    async def find_underlay(
        self, iface: str | None = None, public_ip: str | None = None
    ) -> Underlay:
        """Resolve flannel's ``--iface`` / ``--public-ip`` to the underlay interface.

        ``iface`` is a name or one of the interface's IPv4 addresses. Without it, the
        interface holding ``public_ip``, else the one of the default route.
        """
        return await self._call(self._find_underlay, iface, public_ip)

    def _find_underlay(self, iface: str | None, public_ip: str | None) -> Underlay:
        pub = _ipv4(public_ip, "--public-ip") if public_ip else None
        index: int | None = None
        if iface:
            try:
                by_ip = IPv4Address(iface)
            except AddressValueError:
                msg = self._link_msg(iface)
                if msg is None:
                    raise NetlinkOpError(errno.ENODEV, f"no interface named {iface!r}") from None
                index = msg["index"]
            else:
                index = self._index_holding(by_ip)
                if index is None:
                    raise NetlinkOpError(errno.EADDRNOTAVAIL,
                                         f"no interface has the address {by_ip}")
        elif pub is not None:
            index = self._index_holding(pub)
        if index is None:
            index = self._default_route_index()
            if index is None:
                raise NetlinkOpError(errno.ENETUNREACH,
                                     "no default route to find the interface by; pass --iface")
        msgs = self._req(f"get link {index}", self._ipr.link, "get", index=index)
        link = _link(msgs[0])
        addrs = self._addrs(index)
        if not addrs:
            raise NetlinkOpError(errno.EADDRNOTAVAIL, f"interface {link.name} has no IPv4 address")
        address = addrs[0].ip
        if iface:
            try:
                wanted = IPv4Address(iface)
            except AddressValueError:
                pass
            else:
                address = wanted
        return Underlay(link.name, link.index, address, pub or address, link.mtu)

    def _index_holding(self, ip: IPv4Address) -> int | None:
        for msg in self._req("list addresses", self._ipr.addr, "dump", family=socket.AF_INET):
            if (msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")) == str(ip):
                return msg["index"]
        return None

    def _default_route_index(self) -> int | None:
        for msg in self._req("list routes", self._ipr.route, "dump", family=socket.AF_INET):
            if msg["dst_len"] == 0 and msg.get_attr("RTA_TABLE") in (254, None):
                oif = msg.get_attr("RTA_OIF")
                if oif:
                    return oif
        return None


def _nlmsg(kind: int, flags: int, body: bytes) -> bytes:
    """A request (sequence number and port id filled in when sent), with an ack asked for."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                       0, 0) + body


def _rta(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _neigh_msg(kind: int, flags: int, ifindex: int, ip: IPv4Address, mac: str | None) -> bytes:
    """What pyroute2's ``neigh(..., ifindex, dst, [lladdr], state=NUD_PERMANENT)`` sends."""
    body = struct.pack("=BxxxiHBB", socket.AF_INET, ifindex, NUD_PERMANENT, 0, 0)
    body += _rta(_NDA_DST, ip.packed)
    if mac is not None:
        body += _rta(_NDA_LLADDR, _mac(mac))
    return _nlmsg(kind, flags, body)


def _fdb_msg(kind: int, flags: int, ifindex: int, mac: str, dst: IPv4Address) -> bytes:
    """What pyroute2's ``fdb(..., ifindex, lladdr, dst)`` sends (permanent, noarp, self)."""
    body = struct.pack("=BxxxiHBB", _AF_BRIDGE, ifindex, NUD_PERMANENT | _NUD_NOARP,
                       _NTF_SELF, 0)
    body += _rta(_NDA_LLADDR, _mac(mac)) + _rta(_NDA_DST, dst.packed)
    return _nlmsg(kind, flags, body)


def _route_msg(kind: int, flags: int, dst: IPv4Network, gateway: IPv4Address, oif: int,
               rtflags: int) -> bytes:
    """What pyroute2's ``route(..., dst, gateway, oif, flags)`` sends (a new route: main
    table, proto static, unicast; a deletion leaves protocol, scope and type open)."""
    new = kind == _RTM_NEWROUTE
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, dst.prefixlen, 0, 0, _RT_TABLE_MAIN,
                       _RTPROT_STATIC if new else 0, 0, _RTN_UNICAST if new else 0, rtflags)
    body += (_rta(_RTA_DST, dst.network_address.packed) + _rta(_RTA_GATEWAY, gateway.packed)
             + _rta(_RTA_OIF, struct.pack("=i", oif)))
    return _nlmsg(kind, flags, body)


def _ipv4(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from None


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mtu=msg.get_attr("IFLA_MTU") or 0,
        mac=msg.get_attr("IFLA_ADDRESS"),
        up=bool(msg["flags"] & IFF_UP),
    )


def _vxlan_params(msg: Any) -> dict[str, Any]:
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return {"kind": info.get_attr("IFLA_INFO_KIND") if info is not None else None}
    data = info.get_attr("IFLA_INFO_DATA")
    return {
        "kind": "vxlan",
        "vni": data.get_attr("IFLA_VXLAN_ID"),
        "port": data.get_attr("IFLA_VXLAN_PORT"),
        "local": data.get_attr("IFLA_VXLAN_LOCAL"),
        "link": data.get_attr("IFLA_VXLAN_LINK"),
        "learning": data.get_attr("IFLA_VXLAN_LEARNING"),
    }
