"""The wire format against a stand-in for a stock flannel ``udp`` peer.

Host A runs the udp backend; host B runs none: a plain UDP socket on 192.0.2.2:8285 plays
flannel there, so every datagram can be inspected (one inner IPv4 packet, as is, checksums
complete, TTL decremented once) and hand-made ones can be injected. A TCP handshake answered by
hand lets the kernel on A send a first flight as one super-packet, whose segments are checked.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from grozd.flannel.backends.udp import UdpBackend

from .nsutil import HOST_A, HOST_B, NETWORK, POD_A, SUBNET_A, SUBNET_B, ns_socket, two_hosts

FAKE_POD = "10.77.2.7"


@dataclass
class Half:
    backend: UdpBackend
    peer: socket.socket  # the stand-in flannel on host B
    ns_a: str


@pytest.fixture(scope="module", params=[True, False], ids=["offload", "per-packet"])
def half(request: pytest.FixtureRequest) -> Iterator[Half]:
    with two_hosts() as hosts:
        backend = UdpBackend(hosts.a, NETWORK, SUBNET_A, HOST_A, offload=request.param)
        backend.add_peer(SUBNET_B, HOST_B)
        peer = ns_socket(hosts.b, socket.AF_INET, socket.SOCK_DGRAM)
        with peer, backend:
            peer.bind((HOST_B, 8285))
            yield Half(backend, peer, hosts.a)


def csum(data: bytes) -> int:
    """The ones'-complement sum of ``data`` (0xffff over a region with a correct checksum)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s >> 16) + (s & 0xFFFF)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ip_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0x1234, 0x4000, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", ~csum(hdr) & 0xFFFF) + hdr[12:]


def receive_all(peer: socket.socket, quiet: float = 0.3, limit: float = 3.0,
                expect: int = 0) -> list[bytes]:
    """Datagrams until none came for ``quiet`` seconds (or ``expect`` of them came)."""
    got: list[bytes] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not (expect and len(got) >= expect):
        peer.settimeout(quiet if got else limit)
        try:
            data, frm = peer.recvfrom(65535)
        except TimeoutError:
            break
        assert frm == (HOST_A, 8285)
        got.append(data)
    return got


def drain(peer: socket.socket) -> None:
    peer.setblocking(False)
    try:
        while True:
            peer.recv(65535)
    except BlockingIOError:
        pass
    finally:
        peer.setblocking(True)


def check_ip(pkt: bytes, src: str, dst: str, proto: int) -> int:
    """Asserts a sane, checksummed IPv4 header as sent by A's kernel through the data path."""
    assert pkt[0] == 0x45
    assert struct.unpack("!H", pkt[2:4])[0] == len(pkt)
    assert pkt[8] == 63, "the data path decrements the TTL once"
    assert pkt[9] == proto
    assert (socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])) == (src, dst)
    assert csum(pkt[:20]) == 0xFFFF
    return 20


def test_udp_out_is_one_inner_packet_as_is(half: Half) -> None:
    drain(half.peer)
    pod = ns_socket(half.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    with pod:
        pod.bind((POD_A, 0))
        port = pod.getsockname()[1]
        for payload in (b"hello", os.urandom(1400)):
            pod.sendto(payload, (FAKE_POD, 4000))
            (pkt,) = receive_all(half.peer)
            off = check_ip(pkt, POD_A, FAKE_POD, 17)
            sport, dport, ulen, ucsum = struct.unpack("!HHHH", pkt[off:off + 8])
            assert (sport, dport, ulen) == (port, 4000, 8 + len(payload))
            assert pkt[off + 8:] == payload
            # With offloads the kernel leaves the UDP checksum to the data path: it is complete.
            assert ucsum != 0
            assert csum(pseudo(pkt[12:16], pkt[16:20], 17, ulen) + pkt[off:]) == 0xFFFF


def test_udp_in_is_written_as_is(half: Half) -> None:
    pod = ns_socket(half.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    with pod:
        pod.bind((POD_A, 0))
        pod.settimeout(3)
        port = pod.getsockname()[1]
        payload = b"reply from a stock flannel"
        udp = struct.pack("!HHHH", 4000, port, 8 + len(payload), 0) + payload
        ph = pseudo(socket.inet_aton(FAKE_POD), socket.inet_aton(POD_A), 17, len(udp))
        udp = udp[:6] + struct.pack("!H", ~csum(ph + udp) & 0xFFFF) + udp[8:]
        half.peer.sendto(ip_header(FAKE_POD, POD_A, 17, len(udp)) + udp, (HOST_A, 8285))
        assert pod.recvfrom(100) == (payload, (FAKE_POD, 4000))


def test_tcp_first_flight_is_segmented_correctly(half: Half) -> None:
    """Answers A's SYN by hand; the kernel then sends its initial window, in offload mode as a
    super-packet the data path cuts up. Every segment must be a valid, full TCP/IP packet."""
    drain(half.peer)
    client = ns_socket(half.ns_a)
    data = os.urandom(256 * 1024)
    with client:
        client.bind((POD_A, 0))
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.connect((FAKE_POD, 5000))
        # Answered at once: the RTT the kernel measures sets its pacing rate, and with it the
        # size of the super-packets it builds.
        (syn,) = receive_all(half.peer, expect=1)
        off = check_ip(syn, POD_A, FAKE_POD, 6)
        sport, dport, isn = struct.unpack("!HHI", syn[off:off + 8])
        assert syn[off + 13] & 0x3F == 0x02  # SYN
        assert csum(pseudo(syn[12:16], syn[16:20], 6, len(syn) - off) + syn[off:]) == 0xFFFF
        # SYN-ACK with an MSS option (no window scaling: the flight is at most 64 KB).
        tcp = struct.pack("!HHIIBBHHH", dport, sport, 1000, isn + 1, 6 << 4, 0x12, 65535, 0, 0)
        tcp += struct.pack("!BBH", 2, 4, 1400)
        ph = pseudo(socket.inet_aton(FAKE_POD), socket.inet_aton(POD_A), 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", ~csum(ph + tcp) & 0xFFFF) + tcp[18:]
        before = half.backend.counters()
        half.peer.sendto(ip_header(FAKE_POD, POD_A, 6, len(tcp)) + tcp, (HOST_A, 8285))
        deadline = time.monotonic() + 3
        while True:
            try:
                client.send(data)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the handshake did not complete"
                time.sleep(0.01)
        got = receive_all(half.peer)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    segments: dict[int, tuple[int, int, bytes]] = {}
    for pkt in got:
        off = check_ip(pkt, POD_A, FAKE_POD, 6)
        assert len(pkt) <= half.backend.mtu  # type: ignore[operator]
        seq, ack = struct.unpack("!II", pkt[off + 4:off + 12])
        doff = (pkt[off + 12] >> 4) * 4
        flags = pkt[off + 13]
        assert csum(pseudo(pkt[12:16], pkt[16:20], 6, len(pkt) - off) + pkt[off:]) == 0xFFFF
        payload = pkt[off + doff:]
        if not payload:
            continue  # the handshake's ACK
        assert ack == 1001 and flags & 0x10 and not flags & 0x07  # ACK; no SYN, RST, FIN
        ip_id = struct.unpack("!H", pkt[4:6])[0]
        segments.setdefault(seq, (ip_id, flags, payload))
    assert segments, "no data segments arrived"
    # Contiguous from the first byte, each carrying the right slice of the data.
    pos = isn + 1
    ids = []
    for seq in sorted(segments):
        ip_id, flags, payload = segments[seq]
        assert seq == pos
        assert payload == data[seq - isn - 1:seq - isn - 1 + len(payload)]
        assert len(payload) <= 1400
        pos += len(payload)
        ids.append(ip_id)
    assert len(segments) >= 5
    assert len(set(ids)) == len(ids), "every segment has its own IP id"
    counters = half.backend.counters()
    if half.backend.datapath is not None and half.backend.datapath.offloads["tun_tso"]:
        assert counters["tun_super_packets"] > before["tun_super_packets"]
        assert counters["tx_gso_sends"] > before["tx_gso_sends"]
