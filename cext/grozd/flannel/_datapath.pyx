"""The userspace data paths: TUN/TAP <-> UDP forwarding compiled to C, each loop in its own thread.

Two wire formats share the machinery. flannel's ``udp`` (``encap`` 0, a TUN): every UDP datagram
carries exactly one inner IPv4 packet, as is, so a stock flannel ``udp`` peer interoperates. VXLAN
(``encap`` 1, a TAP; RFC 7348 as the kernel's ``vxlan`` device speaks it): every datagram is the
8-byte header ``08 00 00 00 | VNI << 8`` and one Ethernet frame, addressed to the peer VTEP's MAC;
peers are found by that MAC (the FDB), and ARP requests for the remote gateways are answered here.
What makes both fast is how packets cross the kernel boundary:

- TUN -> UDP: with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` one read returns a TCP super-packet (up to
  64 KB) behind a ``virtio_net_hdr``. It is cut into MSS-sized TCP segments here (headers rewritten,
  checksums computed) and the whole train goes out with one ``sendmmsg`` carrying ``UDP_SEGMENT``
  (the kernel splits it into one datagram per segment, late and cheaply). Payload is never copied
  in userspace: every segment is an iovec pair (its rewritten header, a slice of the read buffer).
- UDP -> TUN: with ``UDP_GRO`` one receive returns many datagrams; consecutive TCP segments of one
  flow are written back into the TUN as one super-packet (``VIRTIO_NET_HDR_GSO_TCPV4``, partial
  checksum), again gathered by ``writev`` without copying.

Every offload has a per-packet fallback, chosen at start-up by probing, forced by ``offload=0``,
and taken at run time when the kernel refuses (EIO/EINVAL): then it is one inner packet per
datagram and per TUN write, as flannel does (still batched with ``recvmmsg``/``sendmmsg``).

VXLAN specifics: a VXLAN hop is a layer-2 link, so the TTL is left alone and nothing sends ICMP.
A kernel VXLAN sender over veth may leave the inner TCP/UDP checksum partial (the pseudo-header sum
only; the NIC that would finish it is missing) or even hand over a whole TSO super-frame in one
datagram: partial checksums are recognised (the field equals the pseudo-header sum) and completed,
super-frames are written into the TAP as one GSO frame.

udp specifics: like flannel, both directions decrement the TTL; unlike stock flannel (which drops silently), an
expiring packet gets an ICMP time-exceeded back (into the TUN, or over UDP to the sending peer).
A destination without a route gets ICMP net-unreachable into the TUN, as flannel does; the ICMP
source is the unreachable destination, again as flannel does.

The route table is swapped from Python while the loops run: the TUN->UDP loop publishes the table it
is reading (a hazard pointer) and the writer frees the old table only once it is not published.
"""

from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport (
    EAGAIN,
    ECONNREFUSED,
    EHOSTUNREACH,
    EINTR,
    EINVAL,
    EIO,
    EMSGSIZE,
    ENETDOWN,
    ENETUNREACH,
    ENOBUFS,
    ENOMEM,
    EPERM,
    errno,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.ioctl cimport ioctl
from posix.uio cimport iovec, readv, writev
from posix.unistd cimport close, read, usleep, write

from grozd.flannel._linux_if_tun cimport (
    IFF_NO_PI,
    IFF_TAP,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNGETIFF,
    TUNGETVNETHDRSZ,
    TUNSETOFFLOAD,
)
from grozd.flannel._linux_virtio_net cimport (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    virtio_net_hdr,
)
from grozd.flannel._net_if cimport ifreq
from grozd.flannel._netinet_in cimport htonl, htons, sockaddr_in
from grozd.flannel._netinet_udp cimport SOL_UDP, UDP_GRO, UDP_SEGMENT
from grozd.flannel._poll cimport POLLIN, POLLOUT, poll, pollfd
from grozd.flannel._sys_eventfd cimport EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from grozd.flannel._sys_socket cimport (
    AF_INET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    MSG_DONTWAIT,
    MSG_TRUNC,
    cmsghdr,
    mmsghdr,
    msghdr,
    recvmmsg,
    sendmmsg,
    sendmsg,
    sendto,
    setsockopt,
    sockaddr,
)

cdef extern from *:
    """
    /* The few atomics the loops need. Counters are written by one thread only, so a relaxed
       load-and-store (plain instructions on x86) is enough for Python's concurrent reads. */
    static inline void *gz_ptr_load(void **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void gz_ptr_store(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void *gz_ptr_swap(void **p, void *v) {
        return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int gz_int_load(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gz_int_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void gz_add(uint64_t *c, uint64_t v) {
        __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
    }
    static inline uint64_t gz_u64_load(uint64_t *c) { return __atomic_load_n(c, __ATOMIC_RELAXED); }
    """
    void *gz_ptr_load(void **p) noexcept nogil
    void gz_ptr_store(void **p, void *v) noexcept nogil
    void *gz_ptr_swap(void **p, void *v) noexcept nogil
    int gz_int_load(int *p) noexcept nogil
    void gz_int_store(int *p, int v) noexcept nogil
    void gz_add(uint64_t *c, uint64_t v) noexcept nogil
    uint64_t gz_u64_load(uint64_t *c) noexcept nogil


COUNTER_NAMES = (
    "tun_reads",             # read() calls that returned a packet
    "tun_read_bytes",
    "tun_super_packets",     # of those, TCP super-packets (TSO) that were segmented here
    "tx_packets",            # inner packets sent, one per datagram on the wire
    "tx_bytes",
    "tx_syscalls",           # sendmmsg/sendmsg calls
    "tx_gso_sends",          # messages sent as a UDP_SEGMENT train
    "rx_syscalls",           # recvmmsg calls that returned datagrams
    "rx_datagrams",
    "rx_bytes",
    "rx_gro_buffers",        # receive buffers holding more than one datagram (UDP_GRO)
    "rx_errors",             # transient receive errors
    "tun_writes",
    "tun_write_bytes",
    "tun_gso_writes",        # of those, coalesced TCP super-packets
    "rx_packets",            # inner packets delivered into the TUN
    "icmp_unreachable",
    "icmp_time_exceeded",
    "drop_no_route",
    "drop_ttl",
    "drop_not_ipv4",
    "drop_malformed",
    "drop_truncated",
    "drop_send_error",
    "drop_tun_write_error",
    "gso_send_fallbacks",
    "gso_write_fallbacks",
    "arp_replies",           # VXLAN: ARP requests for a remote gateway answered into the TAP
    "rx_csum_completed",     # VXLAN: received inner packets whose partial checksum was completed
    "rx_super_frames",       # VXLAN: received datagrams holding a whole TSO super-frame
    "drop_multicast",        # VXLAN: broadcast/multicast frames other than ARP (no flooding)
    "drop_bad_vxlan",        # VXLAN: datagrams without the I flag, of another VNI, or too short
)
assert len(COUNTER_NAMES) == C_COUNT

# TCP flags.
cdef enum:
    TH_FIN = 0x01
    TH_SYN = 0x02
    TH_RST = 0x04
    TH_PSH = 0x08
    TH_ACK = 0x10
    TH_URG = 0x20
    TH_ECE = 0x40
    TH_CWR = 0x80


# ---------------------------------------------------------------------------------------------
# Byte access and checksums

cdef inline uint32_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t rd48(const uint8_t *p) noexcept nogil:
    return (<uint64_t>rd16(p) << 32) | rd32(p + 2)


cdef inline void wr16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xff
    p[1] = v & 0xff


cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xff
    p[1] = (v >> 16) & 0xff
    p[2] = (v >> 8) & 0xff
    p[3] = v & 0xff


cdef inline uint64_t csum_add(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """Adds ``n`` bytes (starting at an even offset of the checksummed data) to a ones'-complement
    accumulator. Words are summed in native order; the folded result is then in memory order
    (RFC 1071), so it is stored with memcpy. Four accumulators keep the adds independent."""
    cdef uint32_t w0, w1, w2, w3
    cdef uint16_t h
    cdef uint8_t tail[2]
    cdef uint64_t a1 = 0, a2 = 0, a3 = 0
    while n >= 16:
        memcpy(&w0, p, 4)
        memcpy(&w1, p + 4, 4)
        memcpy(&w2, p + 8, 4)
        memcpy(&w3, p + 12, 4)
        acc += w0
        a1 += w1
        a2 += w2
        a3 += w3
        p += 16
        n -= 16
    acc += a1 + a2 + a3
    while n >= 4:
        memcpy(&w0, p, 4)
        acc += w0
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&h, p, 2)
        acc += h
        p += 2
        n -= 2
    if n:
        tail[0] = p[0]
        tail[1] = 0
        memcpy(&h, tail, 2)
        acc += h
    return acc


cdef inline uint16_t csum_fold(uint64_t s) noexcept nogil:
    s = <uint32_t>s + (s >> 32)
    s = <uint32_t>s + (s >> 32)
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return <uint16_t>s


cdef inline void store_csum(uint8_t *p, uint16_t folded) noexcept nogil:
    cdef uint16_t c = <uint16_t>(~folded)
    memcpy(p, &c, 2)


cdef inline void ip_checksum(uint8_t *ip, int ihl) noexcept nogil:
    ip[10] = 0
    ip[11] = 0
    store_csum(ip + 10, csum_fold(csum_add(ip, ihl, 0)))


cdef inline void dec_ttl(uint8_t *ip) noexcept nogil:
    """TTL - 1 with the header checksum patched incrementally (RFC 1624, eqn. 3), as flannel does:
    a header that arrived corrupt stays corrupt and is dropped by the kernel."""
    cdef uint32_t old = rd16(ip + 8)
    cdef uint32_t s
    ip[8] -= 1
    s = (~rd16(ip + 10) & 0xffff) + (~old & 0xffff) + rd16(ip + 8)
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    wr16(ip + 10, ~s & 0xffff)


cdef int build_icmp(uint8_t *out, const uint8_t *off, int n, int type, int code) noexcept nogil:
    """An ICMP error about packet ``off`` (``n`` bytes) into ``out``; returns its length, or 0 when
    none may be sent (RFC 1812 4.3.2.7: not about ICMP errors, non-first fragments, multicast or
    broadcast). The source is the offender's destination, as flannel does."""
    cdef int ihl = (off[0] & 15) * 4
    cdef int quote, m
    cdef uint32_t src = rd32(off + 12)
    cdef uint32_t dst = rd32(off + 16)
    if n < ihl:
        return 0
    if off[9] == 1 and n > ihl and off[ihl] not in (0, 8, 13, 14, 15, 16, 17, 18):
        return 0
    if rd16(off + 6) & 0x1fff:
        return 0
    if src == 0 or (src >> 28) == 14 or (dst >> 28) == 14 or dst == <uint32_t>0xffffffff:
        return 0
    quote = ihl + 8
    if quote > n:
        quote = n
    m = 28 + quote
    memset(out, 0, 28)
    out[0] = 0x45
    wr16(out + 2, m)
    out[8] = 64
    out[9] = 1
    memcpy(out + 12, off + 16, 4)
    memcpy(out + 16, off + 12, 4)
    ip_checksum(out, 20)
    out[20] = type
    out[21] = code
    memcpy(out + 28, off, quote)
    store_csum(out + 22, csum_fold(csum_add(out + 20, m - 20, 0)))
    return m


# ---------------------------------------------------------------------------------------------
# Route table

cdef const sockaddr_in *rt_lookup(const RouteTable *t, uint64_t dst) noexcept nogil:
    """Longest-prefix match: one binary search per distinct prefix length (usually one)."""
    cdef int g, lo, hi, mid
    cdef uint64_t key
    if t == NULL:
        return NULL
    for g in range(t.ngroups):
        key = dst & t.groups[g].mask
        lo = t.groups[g].start
        hi = lo + t.groups[g].count
        while lo < hi:
            mid = (lo + hi) >> 1
            if t.routes[mid].net < key:
                lo = mid + 1
            elif t.routes[mid].net > key:
                hi = mid
            else:
                return &t.routes[mid].hop
    return NULL


cdef const uint8_t *arp_lookup(const RouteTable *t, uint32_t ip) noexcept nogil:
    """The MAC to answer an ARP request for ``ip`` with, or NULL."""
    cdef int lo = 0, hi, mid
    if t == NULL:
        return NULL
    hi = t.narp
    while lo < hi:
        mid = (lo + hi) >> 1
        if t.arp[mid].ip < ip:
            lo = mid + 1
        elif t.arp[mid].ip > ip:
            hi = mid
        else:
            return t.arp[mid].mac
    return NULL


cdef RouteTable *rt_acquire(Shared *sh) noexcept nogil:
    cdef void *t
    while True:
        t = gz_ptr_load(<void **>&sh.table)
        gz_ptr_store(<void **>&sh.hazard, t)
        if gz_ptr_load(<void **>&sh.table) == t:
            return <RouteTable *>t


cdef inline void rt_release(Shared *sh) noexcept nogil:
    gz_ptr_store(<void **>&sh.hazard, NULL)


# ---------------------------------------------------------------------------------------------
# Shared I/O helpers

cdef int tun_write(Shared *sh, uint8_t *vh, const uint8_t *p, int n) noexcept nogil:
    """One packet into the TUN (behind an all-zero virtio header when the TUN has one): 0 or errno."""
    cdef iovec v[2]
    cdef ssize_t r
    while True:
        if sh.vnet_len:
            v[0].iov_base = vh
            v[0].iov_len = sh.vnet_len
            v[1].iov_base = <void *>p
            v[1].iov_len = n
            r = writev(sh.tun_fd, v, 2)
        else:
            r = write(sh.tun_fd, p, n)
        if r >= 0:
            return 0
        if errno != EINTR:
            return errno


cdef int wait_fd(Shared *sh, int fd, short events) noexcept nogil:
    """Waits until ``fd`` is ready; 0 when stopping was requested instead."""
    cdef pollfd fds[2]
    fds[0].fd = fd
    fds[0].events = events
    fds[0].revents = 0
    fds[1].fd = sh.stop_fd
    fds[1].events = POLLIN
    fds[1].revents = 0
    while True:
        if gz_int_load(&sh.stopping):
            return 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return 0
        if fds[1].revents:
            return 0
        return 1


# ---------------------------------------------------------------------------------------------
# TUN -> UDP

cdef void tx_begin(Shared *sh, Tx *tx, const sockaddr_in *hop, int seglen) noexcept nogil:
    cdef int i
    cdef msghdr *h
    if tx.nmsg == TX_MAX_MSGS or tx.niov + 2 > TX_MAX_IOV or tx.hdr_off + SEG_HDR_MAX > TX_HDR_POOL:
        tx_flush(sh, tx)
    i = tx.nmsg
    tx.nmsg += 1
    tx.names[i] = hop[0]
    h = &tx.msgs[i].msg_hdr
    h.msg_name = &tx.names[i]
    h.msg_namelen = sizeof(sockaddr_in)
    h.msg_iov = &tx.iov[tx.niov]
    h.msg_iovlen = 0
    h.msg_control = NULL
    h.msg_controllen = 0
    h.msg_flags = 0
    tx.seglen[i] = seglen
    tx.nseg[i] = 0
    tx.cur = i


cdef inline void tx_iov(Tx *tx, void *base, size_t n) noexcept nogil:
    tx.iov[tx.niov].iov_base = base
    tx.iov[tx.niov].iov_len = n
    tx.niov += 1
    tx.msgs[tx.cur].msg_hdr.msg_iovlen += 1


cdef void tx_end(Tx *tx) noexcept nogil:
    cdef int i = tx.cur
    cdef msghdr *h
    cdef cmsghdr *c
    cdef uint16_t v
    if i < 0:
        return
    tx.cur = -1
    if tx.seglen[i] > 0 and tx.nseg[i] > 1:
        h = &tx.msgs[i].msg_hdr
        h.msg_control = tx.ctrl + i * CTRL_SPACE
        h.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
        c = CMSG_FIRSTHDR(h)
        c.cmsg_level = SOL_UDP
        c.cmsg_type = UDP_SEGMENT
        c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
        v = <uint16_t>tx.seglen[i]
        memcpy(CMSG_DATA(c), &v, sizeof(uint16_t))
    else:
        tx.seglen[i] = 0


cdef void tx_send_unrolled(Shared *sh, Tx *tx, int i) noexcept nogil:
    """Sends a refused UDP_SEGMENT train one datagram per segment (each is two iovecs)."""
    cdef msghdr m
    cdef msghdr *h = &tx.msgs[i].msg_hdr
    cdef size_t k
    cdef ssize_t r
    for k in range(0, h.msg_iovlen, 2):
        m = h[0]
        m.msg_iov = h.msg_iov + k
        m.msg_iovlen = 2 if k + 2 <= h.msg_iovlen else h.msg_iovlen - k
        m.msg_control = NULL
        m.msg_controllen = 0
        while True:
            r = sendmsg(sh.sock_fd, &m, 0)
            if r < 0 and errno == EINTR:
                continue
            if r < 0 and errno == EAGAIN and wait_fd(sh, sh.sock_fd, POLLOUT):
                continue
            break
        gz_add(&tx.cnt[<int>C_TX_SYSCALLS], 1)
        if r < 0:
            gz_add(&tx.cnt[<int>C_DROP_SEND_ERROR], 1)
        else:
            gz_add(&tx.cnt[<int>C_TX_PACKETS], 1)
            gz_add(&tx.cnt[<int>C_TX_BYTES], r)


cdef void tx_flush(Shared *sh, Tx *tx) noexcept nogil:
    """Sends every queued message (sendmmsg), falling back per datagram if GSO is refused."""
    cdef int i = 0
    cdef int r, k, e
    tx_end(tx)
    while i < tx.nmsg:
        if tx.seglen[i] > 0 and gz_int_load(&sh.inject_send_refusal):
            gz_int_store(&sh.inject_send_refusal, 0)
            r = -1
            e = EIO
        else:
            r = sendmmsg(sh.sock_fd, &tx.msgs[i], tx.nmsg - i, 0)
            e = errno
        if r > 0:
            gz_add(&tx.cnt[<int>C_TX_SYSCALLS], 1)
            for k in range(i, i + r):
                gz_add(&tx.cnt[<int>C_TX_PACKETS], tx.nseg[k])
                gz_add(&tx.cnt[<int>C_TX_BYTES], tx.msgs[k].msg_len)
                if tx.seglen[k] > 0:
                    gz_add(&tx.cnt[<int>C_TX_GSO_SENDS], 1)
            i += r
            continue
        if e == EINTR:
            continue
        if e == EAGAIN:
            # A non-blocking socket is full: wait for room rather than drop a whole train.
            if wait_fd(sh, sh.sock_fd, POLLOUT):
                continue
            for k in range(i, tx.nmsg):
                gz_add(&tx.cnt[<int>C_DROP_SEND_ERROR], tx.nseg[k])
            break
        if (e == EIO or e == EINVAL) and tx.seglen[i] > 0:
            # The kernel refused UDP GSO (a device without checksum offload gives EIO): one
            # datagram per segment from now on.
            gz_int_store(&sh.udp_gso, 0)
            gz_add(&tx.cnt[<int>C_GSO_SEND_FALLBACKS], 1)
            tx_send_unrolled(sh, tx, i)
            i += 1
            continue
        if e == EMSGSIZE and tx.seglen[i] > 0:
            # Segments larger than the path MTU (an MTU set too high): GSO stays, this train
            # goes out datagram by datagram and the kernel fragments them.
            tx_send_unrolled(sh, tx, i)
            i += 1
            continue
        # Any other error (no route to the peer, ...) costs this message only.
        gz_add(&tx.cnt[<int>C_DROP_SEND_ERROR], tx.nseg[i])
        i += 1
    tx.nmsg = 0
    tx.niov = 0
    tx.hdr_off = 0
    tx.cur = -1


cdef void tx_single(Shared *sh, Tx *tx, uint8_t *pkt, int n, const sockaddr_in *hop) noexcept nogil:
    """Queues one datagram: the packet (udp), or the VXLAN header and the frame (VXLAN)."""
    tx_begin(sh, tx, hop, 0)
    if sh.encap:
        tx_iov(tx, sh.vxh, VXLAN_HLEN)
    tx_iov(tx, pkt, n)
    tx.nseg[tx.cur] = 1
    tx_end(tx)


cdef void tx_segment(Shared *sh, Tx *tx, uint8_t *pkt, int n, int mss, const sockaddr_in *hop,
                     const uint8_t *pre, int npre) noexcept nogil:
    """Cuts a TCP super-packet into MSS-sized segments, as the NIC would: IP ids count up from the
    super-packet's, sequence numbers advance by the MSS, FIN/PSH stay on the last segment and CWR on
    the first, and both checksums are computed in full (the receiver may be a stock flannel that
    writes the datagram into its TUN as is). ``pre`` (``npre`` bytes: VXLAN and Ethernet headers)
    goes before each segment's IP header. Segments are queued as UDP_SEGMENT trains."""
    cdef int ihl = (pkt[0] & 15) * 4
    cdef uint8_t *th = pkt + ihl
    cdef int doff = (th[12] >> 4) * 4
    cdef int hlen = ihl + doff
    cdef int payload = n - hlen
    cdef int nseg = (payload + mss - 1) // mss
    cdef int seg = npre + hlen + mss
    cdef int per_msg = 1
    cdef int in_msg = 0
    cdef int i, plen
    cdef uint32_t id0 = rd16(pkt + 4)
    cdef uint32_t seq0 = rd32(th + 4)
    cdef uint8_t flags0 = th[13]
    cdef uint8_t fl
    cdef uint64_t base, s
    cdef uint8_t *h
    cdef uint8_t *th2
    cdef uint8_t *data = pkt + hlen
    if gz_int_load(&sh.udp_gso) and nseg > 1:
        per_msg = UDP_MAX_PAYLOAD // seg
        if per_msg > GSO_MAX_SEGS:
            per_msg = GSO_MAX_SEGS
        if per_msg < 2:
            per_msg = 1
    # Pseudo-header: both addresses and the protocol; the length differs per segment.
    base = csum_add(pkt + 12, 8, 0) + htons(6)
    for i in range(nseg):
        plen = payload - i * mss if i == nseg - 1 else mss
        if in_msg == per_msg or tx.niov + 2 > TX_MAX_IOV or tx.hdr_off + SEG_HDR_MAX > TX_HDR_POOL:
            tx_end(tx)
            in_msg = 0
        if in_msg == 0:
            tx_begin(sh, tx, hop, seg if per_msg > 1 else 0)
        h = tx.hdrs + tx.hdr_off
        tx.hdr_off += (npre + hlen + 7) & ~7
        if npre:
            memcpy(h, pre, npre)
        tx_iov(tx, h, npre + hlen)
        h += npre
        memcpy(h, pkt, hlen)
        wr16(h + 2, hlen + plen)
        wr16(h + 4, (id0 + i) & 0xffff)
        ip_checksum(h, ihl)
        th2 = h + ihl
        wr32(th2 + 4, seq0 + <uint32_t>(i * mss))
        fl = flags0
        if i != nseg - 1:
            fl &= ~(TH_FIN | TH_PSH)
        if i != 0:
            fl &= ~TH_CWR
        th2[13] = fl
        th2[16] = 0
        th2[17] = 0
        s = base + htons(<uint16_t>(doff + plen))
        s = csum_add(th2, doff, s)
        s = csum_add(data + i * mss, plen, s)
        store_csum(th2 + 16, csum_fold(s))
        tx_iov(tx, data + i * mss, plen)
        tx.nseg[tx.cur] += 1
        in_msg += 1
    tx_end(tx)


cdef void tx_icmp(Shared *sh, Tx *tx, const uint8_t *pkt, int n, int type) noexcept nogil:
    cdef int m = build_icmp(tx.icmp, pkt, n, type, 0)
    if m and tun_write(sh, tx.zero_vh, tx.icmp, m) == 0:
        gz_add(&tx.cnt[<int>(C_ICMP_UNREACHABLE if type == 3 else C_ICMP_TIME_EXCEEDED)], 1)


cdef void tx_arp(Shared *sh, Tx *tx, const RouteTable *t, const uint8_t *f, int n) noexcept nogil:
    """Answers an ARP request for a remote subnet's gateway with its VTEP's MAC, as the kernel's
    neighbour entry would (flannel installs those as permanent, so requests are rare)."""
    cdef const uint8_t *mac
    cdef uint8_t *r = tx.arp
    if (n < ARP_LEN or rd16(f + 14) != 1 or rd16(f + 16) != 0x0800 or f[18] != 6 or f[19] != 4
            or rd16(f + 20) != 1):
        gz_add(&tx.cnt[<int>C_DROP_MULTICAST], 1)
        return
    mac = arp_lookup(t, rd32(f + 38))
    if mac == NULL:
        gz_add(&tx.cnt[<int>C_DROP_NO_ROUTE], 1)
        return
    memcpy(r, f + 6, 6)                  # to the asker
    memcpy(r + 6, mac, 6)
    wr16(r + 12, 0x0806)
    wr16(r + 14, 1)
    wr16(r + 16, 0x0800)
    r[18] = 6
    r[19] = 4
    wr16(r + 20, 2)                      # reply
    memcpy(r + 22, mac, 6)               # sender: the gateway, at the VTEP's MAC
    memcpy(r + 28, f + 38, 4)
    memcpy(r + 32, f + 22, 6)            # target: the asker
    memcpy(r + 38, f + 28, 4)
    if tun_write(sh, tx.zero_vh, r, ARP_LEN) == 0:
        gz_add(&tx.cnt[<int>C_ARP_REPLIES], 1)


cdef void tx_frame(Shared *sh, Tx *tx, const RouteTable *t, uint8_t *f, int n,
                   const virtio_net_hdr *vh) noexcept nogil:
    """VXLAN: one frame read from the TAP: ARP, FDB lookup by destination MAC, checksum completion
    or segmentation, queue."""
    cdef int et, ihl, doff, cs, co, proto
    cdef int gso = VIRTIO_NET_HDR_GSO_NONE
    cdef const sockaddr_in *hop
    cdef uint8_t *ip
    cdef uint16_t folded
    if n < ETH_HLEN:
        gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    et = rd16(f + 12)
    if f[0] & 1:
        # Broadcast or multicast: the kernel backend floods nothing either (no all-zero FDB entry).
        if et == 0x0806:
            tx_arp(sh, tx, t, f, n)
        else:
            gz_add(&tx.cnt[<int>C_DROP_MULTICAST], 1)
        return
    hop = rt_lookup(t, rd48(f))
    if hop == NULL:
        gz_add(&tx.cnt[<int>C_DROP_NO_ROUTE], 1)
        return
    if vh != NULL:
        gso = vh.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso != VIRTIO_NET_HDR_GSO_NONE:
        ip = f + ETH_HLEN
        if gso != VIRTIO_NET_HDR_GSO_TCPV4 or et != 0x0800 or n < ETH_HLEN + 40:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        ihl = (ip[0] & 15) * 4
        if (ip[0] >> 4) != 4 or ihl < 20 or ip[9] != 6 or ETH_HLEN + ihl + 20 > n:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        doff = (ip[ihl + 12] >> 4) * 4
        if doff < 20 or ETH_HLEN + ihl + doff >= n or vh.gso_size == 0:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        gz_add(&tx.cnt[<int>C_TUN_SUPER_PACKETS], 1)
        memcpy(tx.pre, sh.vxh, VXLAN_HLEN)
        memcpy(tx.pre + VXLAN_HLEN, f, ETH_HLEN)
        tx_segment(sh, tx, ip, n - ETH_HLEN, vh.gso_size, hop, tx.pre, ENCAP_MAX)
        return
    if vh != NULL and (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM):
        cs = vh.csum_start
        co = vh.csum_offset
        if cs < ETH_HLEN or cs + co + 2 > n:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        folded = csum_fold(csum_add(f + cs, n - cs, 0))
        proto = f[ETH_HLEN + 9] if et == 0x0800 else (f[ETH_HLEN + 6] if et == 0x86dd else 0)
        if folded == 0xffff and proto == 17:
            folded = 0  # a UDP checksum of 0 means "none": send 0xffff instead
        store_csum(f + cs + co, folded)
    tx_single(sh, tx, f, n, hop)


cdef void tx_packet(Shared *sh, Tx *tx, const RouteTable *t, uint8_t *pkt, int n,
                    const virtio_net_hdr *vh) noexcept nogil:
    """One packet read from the TUN: route, TTL, checksum completion or segmentation, queue."""
    cdef int ihl, tot, doff, cs, co
    cdef int gso = VIRTIO_NET_HDR_GSO_NONE
    cdef const sockaddr_in *hop
    cdef uint16_t folded
    if sh.encap:
        tx_frame(sh, tx, t, pkt, n, vh)
        return
    if n < 20:
        gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    if (pkt[0] >> 4) != 4:
        # flannel's udp network is IPv4 only (the kernel may still send IPv6 into the TUN).
        gz_add(&tx.cnt[<int>C_DROP_NOT_IPV4], 1)
        return
    ihl = (pkt[0] & 15) * 4
    if ihl < 20 or ihl > n:
        gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    if vh != NULL:
        gso = vh.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        tot = rd16(pkt + 2)
        if tot < ihl or tot > n:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        n = tot
    elif gso != VIRTIO_NET_HDR_GSO_TCPV4:
        gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    hop = rt_lookup(t, rd32(pkt + 16))
    if hop == NULL:
        gz_add(&tx.cnt[<int>C_DROP_NO_ROUTE], 1)
        tx_icmp(sh, tx, pkt, n, 3)
        return
    if pkt[8] <= 1:
        gz_add(&tx.cnt[<int>C_DROP_TTL], 1)
        tx_icmp(sh, tx, pkt, n, 11)
        return
    if gso == VIRTIO_NET_HDR_GSO_TCPV4:
        if pkt[9] != 6 or n < ihl + 20:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        doff = (pkt[ihl + 12] >> 4) * 4
        if doff < 20 or ihl + doff >= n or vh.gso_size == 0:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        gz_add(&tx.cnt[<int>C_TUN_SUPER_PACKETS], 1)
        pkt[8] -= 1  # every segment's header checksum is computed afresh
        tx_segment(sh, tx, pkt, n, vh.gso_size, hop, NULL, 0)
        return
    dec_ttl(pkt)
    if vh != NULL and (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM):
        # Checksum offload: the field holds the pseudo-header sum, finish it over the rest.
        cs = vh.csum_start
        co = vh.csum_offset
        if cs < ihl or cs + co + 2 > n:
            gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
            return
        folded = csum_fold(csum_add(pkt + cs, n - cs, 0))
        if folded == 0xffff and pkt[9] == 17:
            folded = 0  # a UDP checksum of 0 means "none": send 0xffff instead
        store_csum(pkt + cs + co, folded)
    tx_single(sh, tx, pkt, n, hop)


cdef int tx_loop(Shared *sh, Tx *tx) noexcept nogil:
    """Reads the TUN until it is empty (or a batch is full), then sends; sleeps in poll()."""
    cdef iovec v[2]
    cdef ssize_t r
    cdef int reads, e, n, again
    cdef uint8_t *buf
    cdef RouteTable *t
    cdef virtio_net_hdr vh
    cdef pollfd fds[2]
    fds[0].fd = sh.tun_fd
    fds[0].events = POLLIN
    fds[1].fd = sh.stop_fd
    fds[1].events = POLLIN
    while not gz_int_load(&sh.stopping):
        t = rt_acquire(sh)
        reads = 0
        again = 0
        while reads < TX_MAX_READS:
            if tx.arena_off > TX_ARENA:
                tx_flush(sh, tx)
                tx.arena_off = 0
            buf = tx.arena + tx.arena_off
            if sh.vnet_len:
                v[0].iov_base = tx.vh
                v[0].iov_len = sh.vnet_len
                v[1].iov_base = buf
                v[1].iov_len = MAX_READ
                r = readv(sh.tun_fd, v, 2)
            else:
                r = read(sh.tun_fd, buf, MAX_READ)
            if r <= 0:
                e = errno if r < 0 else EAGAIN
                if e == EINTR:
                    continue
                if e == EAGAIN:
                    again = 1
                    break
                tx_flush(sh, tx)
                rt_release(sh)
                sh.tx_errno = e
                return e
            reads += 1
            gz_add(&tx.cnt[<int>C_TUN_READS], 1)
            gz_add(&tx.cnt[<int>C_TUN_READ_BYTES], r)
            if sh.vnet_len:
                n = <int>r - sh.vnet_len
                if n < 0:
                    gz_add(&tx.cnt[<int>C_DROP_MALFORMED], 1)
                    continue
                memcpy(&vh, tx.vh, sizeof(virtio_net_hdr))
                tx_packet(sh, tx, t, buf, n, &vh)
            else:
                n = <int>r
                tx_packet(sh, tx, t, buf, n, NULL)
            tx.arena_off += (n + 63) & ~63
        tx_flush(sh, tx)
        tx.arena_off = 0
        rt_release(sh)
        if again:
            fds[0].revents = 0
            fds[1].revents = 0
            if poll(fds, 2, -1) < 0 and errno != EINTR:
                sh.tx_errno = errno
                return errno
            if fds[1].revents:
                break
    return 0


# ---------------------------------------------------------------------------------------------
# UDP -> TUN

cdef inline bint tcp_candidate(const uint8_t *p, int n) noexcept nogil:
    """A plain TCP data segment that may be coalesced: no IP options, not a fragment, only ACK
    (and PSH) set, and some payload."""
    cdef int doff
    if n < 41 or p[0] != 0x45 or p[9] != 6 or (rd16(p + 6) & 0x3fff) != 0:
        return False
    doff = (p[32] >> 4) * 4
    if doff < 20 or 20 + doff >= n:
        return False
    return (p[33] & ~(TH_ACK | TH_PSH)) == 0 and (p[33] & TH_ACK) != 0


cdef void rx_write_single(Shared *sh, Rx *rx, const uint8_t *p, int n) noexcept nogil:
    cdef int e = tun_write(sh, rx.zero_vh, p, n)
    if e == 0:
        gz_add(&rx.cnt[<int>C_TUN_WRITES], 1)
        gz_add(&rx.cnt[<int>C_TUN_WRITE_BYTES], n)
        gz_add(&rx.cnt[<int>C_RX_PACKETS], 1)
    else:
        gz_add(&rx.cnt[<int>C_DROP_TUN_WRITE_ERROR], 1)


cdef void csum_complete(Rx *rx, uint8_t *p, int n) noexcept nogil:
    """VXLAN: completes a TCP/UDP checksum left partial by a kernel sender (the field holds the
    pseudo-header sum: what the sender's NIC would have finished). Any other value is left alone,
    so a corrupt packet stays corrupt and the kernel drops it. If a complete checksum happens to
    equal the pseudo-header sum, completing it yields the same value: no harm either way."""
    cdef int ihl = (p[0] & 15) * 4
    cdef int proto = p[9]
    cdef int ln = n - ihl
    cdef int off
    cdef uint8_t *l4 = p + ihl
    cdef uint64_t pseudo
    cdef uint16_t folded
    if (rd16(p + 6) & 0x3fff) != 0:
        return  # a fragment: its checksum spans the whole datagram
    if proto == 6 and ln >= 20:
        off = 16
    elif proto == 17 and ln >= 8 and (l4[6] | l4[7]) != 0:
        off = 6
    else:
        return
    pseudo = csum_add(p + 12, 8, <uint64_t>htons(<uint16_t>proto) + htons(<uint16_t>ln))
    folded = csum_fold(pseudo)
    if memcmp(l4 + off, &folded, 2) != 0:
        return
    l4[off] = 0
    l4[off + 1] = 0
    folded = csum_fold(csum_add(l4, ln, pseudo))
    if folded == 0xffff and proto == 17:
        folded = 0
    store_csum(l4 + off, folded)
    gz_add(&rx.cnt[<int>C_RX_CSUM_COMPLETED], 1)


cdef void rx_deliver(Shared *sh, Rx *rx, uint8_t *p, int n) noexcept nogil:
    """One packet into the TUN, or (VXLAN) its frame into the TAP, partial checksum completed."""
    if rx.eth:
        csum_complete(rx, p, n)
    rx_write_single(sh, rx, p - rx.eth, n + rx.eth)


cdef void rx_write_super(Shared *sh, Rx *rx, uint8_t *p, int n) noexcept nogil:
    """VXLAN: a whole TCP super-frame in one datagram (a kernel sender's TSO frame that crossed a
    veth unsegmented) goes into the TAP as one GSO frame, segment size as the TAP's MTU allows."""
    cdef int ihl = (p[0] & 15) * 4
    cdef int doff, e
    cdef ssize_t r
    cdef uint16_t folded
    cdef virtio_net_hdr vh
    cdef iovec v[2]
    gz_add(&rx.cnt[<int>C_RX_SUPER_FRAMES], 1)
    if (not gz_int_load(&sh.tun_gso_write) or p[9] != 6 or n < ihl + 20
            or (rd16(p + 6) & 0x3fff) != 0):
        rx_deliver(sh, rx, p, n)  # one oversized frame: the receiving stack takes it
        return
    doff = (p[ihl + 12] >> 4) * 4
    if doff < 20 or ihl + doff >= n or sh.mtu <= ihl + doff:
        gz_add(&rx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    folded = csum_fold(csum_add(p + 12, 8, <uint64_t>htons(6) + htons(<uint16_t>(n - ihl))))
    memcpy(p + ihl + 16, &folded, 2)
    memset(&vh, 0, sizeof(vh))
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    vh.hdr_len = ETH_HLEN + ihl + doff
    vh.gso_size = sh.mtu - ihl - doff
    vh.csum_start = ETH_HLEN + ihl
    vh.csum_offset = 16
    memset(rx.vh, 0, VNET_MAX)
    memcpy(rx.vh, &vh, sizeof(vh))
    v[0].iov_base = rx.vh
    v[0].iov_len = sh.vnet_len
    v[1].iov_base = p - ETH_HLEN
    v[1].iov_len = n + ETH_HLEN
    while True:
        r = writev(sh.tun_fd, v, 2)
        e = errno
        if r < 0 and e == EINTR:
            continue
        break
    if r >= 0:
        gz_add(&rx.cnt[<int>C_TUN_WRITES], 1)
        gz_add(&rx.cnt[<int>C_TUN_GSO_WRITES], 1)
        gz_add(&rx.cnt[<int>C_TUN_WRITE_BYTES], n + ETH_HLEN)
        gz_add(&rx.cnt[<int>C_RX_PACKETS], 1)
    elif e == EINVAL:
        # GSO writes refused: per packet from now on, this frame as one oversized frame (its
        # checksum field holds the pseudo-header sum, which rx_deliver completes).
        gz_int_store(&sh.tun_gso_write, 0)
        gz_add(&rx.cnt[<int>C_GSO_WRITE_FALLBACKS], 1)
        rx_deliver(sh, rx, p, n)
    else:
        gz_add(&rx.cnt[<int>C_DROP_TUN_WRITE_ERROR], 1)


cdef void rx_write_gso(Shared *sh, Rx *rx) noexcept nogil:
    """Writes the group as one TCP super-packet: the first segment's headers (length, PSH of the
    last, IP checksum, pseudo-header TCP checksum as partial) and every segment's payload."""
    cdef uint8_t *f = rx.gpkt[0]
    cdef int hl = rx.ghl
    cdef int i, e
    cdef ssize_t r
    cdef uint16_t folded
    cdef virtio_net_hdr vh
    memcpy(rx.saved, f, hl)
    wr16(f + 2, rx.gtotal)
    ip_checksum(f, 20)
    if rx.gclosed:
        f[33] |= TH_PSH
    # NEEDS_CSUM: the checksum field holds the (uncomplemented) pseudo-header sum.
    memset(f + 36, 0, 2)
    folded = csum_fold(csum_add(f + 12, 8, <uint64_t>htons(6) + htons(rx.gtotal - 20)))
    memcpy(f + 36, &folded, 2)
    memset(&vh, 0, sizeof(vh))
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    vh.hdr_len = rx.eth + hl
    vh.gso_size = rx.gmss
    vh.csum_start = rx.eth + 20
    vh.csum_offset = 16
    memset(rx.vh, 0, VNET_MAX)
    memcpy(rx.vh, &vh, sizeof(vh))
    rx.wiov[0].iov_base = rx.vh
    rx.wiov[0].iov_len = sh.vnet_len
    rx.wiov[1].iov_base = f - rx.eth  # VXLAN: the first frame's Ethernet header stands for all
    rx.wiov[1].iov_len = rx.glen[0] + rx.eth
    for i in range(1, rx.gn):
        rx.wiov[i + 1].iov_base = rx.gpkt[i] + hl
        rx.wiov[i + 1].iov_len = rx.glen[i] - hl
    while True:
        if gz_int_load(&sh.inject_write_refusal):
            gz_int_store(&sh.inject_write_refusal, 0)
            r = -1
            e = EINVAL
            break
        r = writev(sh.tun_fd, rx.wiov, rx.gn + 1)
        e = errno
        if r < 0 and e == EINTR:
            continue
        break
    if r >= 0:
        gz_add(&rx.cnt[<int>C_TUN_WRITES], 1)
        gz_add(&rx.cnt[<int>C_TUN_GSO_WRITES], 1)
        gz_add(&rx.cnt[<int>C_TUN_WRITE_BYTES], rx.gtotal + rx.eth)
        gz_add(&rx.cnt[<int>C_RX_PACKETS], rx.gn)
        return
    memcpy(f, rx.saved, hl)
    if e == EINVAL:
        # The kernel refuses GSO writes into the TUN: segments one by one from now on.
        gz_int_store(&sh.tun_gso_write, 0)
        gz_add(&rx.cnt[<int>C_GSO_WRITE_FALLBACKS], 1)
        for i in range(rx.gn):
            rx_deliver(sh, rx, rx.gpkt[i], rx.glen[i])
    else:
        gz_add(&rx.cnt[<int>C_DROP_TUN_WRITE_ERROR], rx.gn)


cdef inline void rx_group_flush(Shared *sh, Rx *rx) noexcept nogil:
    if rx.gn == 1:
        rx_deliver(sh, rx, rx.gpkt[0], rx.glen[0])
    elif rx.gn > 1:
        rx_write_gso(sh, rx)
    rx.gn = 0


cdef inline void rx_group_start(Rx *rx, uint8_t *p, int n) noexcept nogil:
    rx.gpkt[0] = p
    rx.glen[0] = n
    rx.gn = 1
    rx.ghl = 20 + (p[32] >> 4) * 4
    rx.gmss = n - rx.ghl
    rx.gtotal = n
    rx.gclosed = (p[33] & TH_PSH) != 0


cdef bint rx_join(Rx *rx, uint8_t *p, int n) noexcept nogil:
    """Appends ``p`` to the group if it is the next full-or-last segment of the same flow with
    identical headers (bar length, id, checksums, sequence number and PSH)."""
    cdef const uint8_t *f
    cdef const uint8_t *l
    cdef int pay, doff
    if rx.gn == 0 or rx.gclosed or rx.gn == GROUP_MAX or not tcp_candidate(p, n):
        return False
    f = rx.gpkt[0]
    l = rx.gpkt[rx.gn - 1]
    doff = (p[32] >> 4) * 4
    pay = n - rx.ghl
    if 20 + doff != rx.ghl or pay > rx.gmss or rx.glen[rx.gn - 1] - rx.ghl != rx.gmss:
        return False
    if rx.gtotal + pay > 65535:
        return False
    if p[1] != f[1] or p[8] != f[8] or (p[6] & 0x40) != (f[6] & 0x40):
        return False
    if memcmp(p + 12, f + 12, 12) != 0:  # addresses and ports
        return False
    if rx.eth and memcmp(p - rx.eth, f - rx.eth, rx.eth) != 0:  # VXLAN: the same MACs
        return False
    if memcmp(p + 28, f + 28, 4) != 0 or memcmp(p + 34, f + 34, 2) != 0:  # ack, window
        return False
    if doff > 20 and memcmp(p + 40, f + 40, doff - 20) != 0:  # options
        return False
    if rd32(p + 24) != <uint32_t>(rd32(l + 24) + <uint32_t>rx.gmss):
        return False
    rx.gpkt[rx.gn] = p
    rx.glen[rx.gn] = n
    rx.gn += 1
    rx.gtotal += pay
    rx.gclosed = (p[33] & TH_PSH) != 0
    return True


cdef void rx_vxlan(Shared *sh, Rx *rx, uint8_t *p, int n, int coalesce) noexcept nogil:
    """VXLAN: one datagram: header and VNI checked, then the frame coalesced or written as is."""
    cdef uint8_t *f
    cdef uint8_t *ip
    cdef int ihl, tot
    if n < VXLAN_HLEN + ETH_HLEN or (p[0] & 0x08) == 0 or memcmp(p + 4, sh.vxh + 4, 3) != 0:
        gz_add(&rx.cnt[<int>C_DROP_BAD_VXLAN], 1)
        return
    f = p + VXLAN_HLEN
    n -= VXLAN_HLEN
    if rd16(f + 12) != 0x0800 or n < ETH_HLEN + 20:
        # ARP, IPv6, ...: layer 2 carries them as they are.
        if coalesce:
            rx_group_flush(sh, rx)
        rx_write_single(sh, rx, f, n)
        return
    ip = f + ETH_HLEN
    ihl = (ip[0] & 15) * 4
    tot = rd16(ip + 2)
    if (ip[0] >> 4) != 4 or ihl < 20 or tot < ihl or tot > n - ETH_HLEN:
        gz_add(&rx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    if tot > sh.mtu:
        if coalesce:
            rx_group_flush(sh, rx)
        rx_write_super(sh, rx, ip, tot)
        return
    if coalesce:
        if rx_join(rx, ip, tot):
            return
        rx_group_flush(sh, rx)
        if tcp_candidate(ip, tot):
            rx_group_start(rx, ip, tot)
            return
    rx_deliver(sh, rx, ip, tot)


cdef void rx_packet(Shared *sh, Rx *rx, uint8_t *p, int n, const sockaddr_in *src,
                    int coalesce) noexcept nogil:
    """One inner packet from a datagram: TTL, then coalesce or write."""
    cdef int ihl, tot, m
    if sh.encap:
        rx_vxlan(sh, rx, p, n, coalesce)
        return
    if n < 20:
        gz_add(&rx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    if (p[0] >> 4) != 4:
        gz_add(&rx.cnt[<int>C_DROP_NOT_IPV4], 1)
        return
    ihl = (p[0] & 15) * 4
    tot = rd16(p + 2)
    if ihl < 20 or tot < ihl or tot > n:
        gz_add(&rx.cnt[<int>C_DROP_MALFORMED], 1)
        return
    n = tot
    if p[8] <= 1:
        gz_add(&rx.cnt[<int>C_DROP_TTL], 1)
        # Back to the sending host, over UDP, to whatever address it sent from.
        m = build_icmp(rx.icmp, p, n, 11, 0)
        if m and sendto(sh.sock_fd, rx.icmp, m, MSG_DONTWAIT, <const sockaddr *>src,
                        sizeof(sockaddr_in)) == m:
            gz_add(&rx.cnt[<int>C_ICMP_TIME_EXCEEDED], 1)
        return
    dec_ttl(p)
    if coalesce:
        if rx_join(rx, p, n):
            return
        rx_group_flush(sh, rx)
        if tcp_candidate(p, n):
            rx_group_start(rx, p, n)
            return
    rx_write_single(sh, rx, p, n)


cdef inline bint transient_rx_error(int e) noexcept nogil:
    # ICMP errors queued on the socket, memory pressure: the next call may well succeed.
    return (e == ECONNREFUSED or e == EHOSTUNREACH or e == ENETUNREACH or e == ENOBUFS
            or e == ENOMEM or e == ENETDOWN or e == EPERM)


cdef int rx_loop(Shared *sh, Rx *rx) noexcept nogil:
    """Receives a batch of (possibly GRO-coalesced) datagrams, splits them into inner packets,
    coalesces and writes them; sleeps in poll()."""
    cdef int n, k, e, off, dl, seg, nd, coalesce
    cdef int gs = 0
    cdef msghdr *h
    cdef cmsghdr *c
    cdef uint8_t *buf
    cdef int gro = sh.udp_gro
    while not gz_int_load(&sh.stopping):
        for k in range(rx.nbuf):
            h = &rx.msgs[k].msg_hdr
            h.msg_namelen = sizeof(sockaddr_in)
            h.msg_controllen = CTRL_SPACE if gro else 0
            h.msg_flags = 0
        n = recvmmsg(sh.sock_fd, rx.msgs, rx.nbuf, MSG_DONTWAIT, NULL)
        if n < 0:
            e = errno
            if e == EAGAIN:
                if not wait_fd(sh, sh.sock_fd, POLLIN):
                    break
                continue
            if e == EINTR:
                continue
            if transient_rx_error(e):
                gz_add(&rx.cnt[<int>C_RX_ERRORS], 1)
                continue
            sh.rx_errno = e
            return e
        gz_add(&rx.cnt[<int>C_RX_SYSCALLS], 1)
        coalesce = gz_int_load(&sh.tun_gso_write)
        for k in range(n):
            h = &rx.msgs[k].msg_hdr
            dl = rx.msgs[k].msg_len
            if h.msg_flags & MSG_TRUNC:
                gz_add(&rx.cnt[<int>C_DROP_TRUNCATED], 1)
                continue
            seg = dl
            if gro and h.msg_controllen:
                c = CMSG_FIRSTHDR(h)
                while c != NULL:
                    if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                        memcpy(&gs, CMSG_DATA(c), sizeof(int))
                        if gs > 0:
                            seg = gs
                    c = CMSG_NXTHDR(h, c)
            buf = rx.bufs + <size_t>k * rx.bufsize
            off = 0
            nd = 0
            while off < dl:
                rx_packet(sh, rx, buf + off, seg if seg < dl - off else dl - off, &rx.names[k],
                          coalesce)
                off += seg
                nd += 1
            gz_add(&rx.cnt[<int>C_RX_DATAGRAMS], nd)
            gz_add(&rx.cnt[<int>C_RX_BYTES], dl)
            if nd > 1:
                gz_add(&rx.cnt[<int>C_RX_GRO_BUFFERS], 1)
        # The buffers are reused by the next receive: nothing may stay grouped across batches.
        rx_group_flush(sh, rx)
    return 0


# ---------------------------------------------------------------------------------------------
# Python face

cdef inline void *xcalloc(size_t n) except NULL:
    cdef void *p = calloc(1, n)
    if p == NULL:
        raise MemoryError()
    return p


cdef class Core:
    """The compiled data path over a TUN fd and a UDP socket fd (both stay owned by the caller).

    ``offload``: 1 requires the offloads (OSError/ValueError when refused), 0 forces per-packet,
    -1 probes each offload and falls back where refused. ``encap``: 0 is flannel's udp format over a
    TUN, 1 is VXLAN with network identifier ``vni`` over a TAP. ``run_tx``/``run_rx`` are the loops
    (each blocks, without the GIL, until `request_stop`); run each in its own thread.
    """

    def __cinit__(self, int tun_fd, int sock_fd, int mtu, int offload, int encap=0,
                  unsigned int vni=0):
        self.sh = <Shared *>xcalloc(sizeof(Shared))
        if encap not in (0, 1):
            raise ValueError(f"unknown encapsulation {encap}")
        if vni >= (1 << 24):
            raise ValueError(f"VNI {vni} does not fit in 24 bits")
        self.sh.encap = encap
        self.sh.vxh[0] = 0x08  # the I flag: the VNI is valid
        self.sh.vxh[4] = (vni >> 16) & 0xff
        self.sh.vxh[5] = (vni >> 8) & 0xff
        self.sh.vxh[6] = vni & 0xff
        self.sh.tun_fd = tun_fd
        self.sh.sock_fd = sock_fd
        self.sh.mtu = mtu
        self.sh.stop_fd = -1
        if mtu < 68 or mtu > 65535:
            raise ValueError(f"MTU {mtu} is out of range")
        self.sh.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.sh.stop_fd < 0:
            PyErr_SetFromErrno(OSError)
        self._probe(offload)
        self._alloc()

    def __dealloc__(self):
        if self.tx != NULL:
            free(self.tx.arena)
            free(self.tx.hdrs)
            free(self.tx.iov)
            free(self.tx.msgs)
            free(self.tx.names)
            free(self.tx.ctrl)
            free(self.tx.seglen)
            free(self.tx.nseg)
            free(self.tx)
        if self.rx != NULL:
            free(self.rx.bufs)
            free(self.rx.msgs)
            free(self.rx.iov)
            free(self.rx.names)
            free(self.rx.ctrl)
            free(self.rx)
        if self.sh != NULL:
            if self.sh.stop_fd >= 0:
                close(self.sh.stop_fd)
            free(self.sh.table)  # its ARP entries live in the same allocation
            free(self.sh)

    cdef void _probe(self, int offload) except *:
        cdef Shared *sh = self.sh
        cdef ifreq ifr
        cdef int sz = 0
        cdef int val
        cdef int fl
        memset(&ifr, 0, sizeof(ifr))
        if ioctl(sh.tun_fd, TUNGETIFF, &ifr) < 0:
            raise OSError(errno, "TUNGETIFF failed: tun_fd is not an attached TUN device")
        if sh.encap:
            if (ifr.ifr_flags & 3) != IFF_TAP or not (ifr.ifr_flags & IFF_NO_PI):
                raise ValueError("VXLAN needs a TAP (not TUN) device opened with IFF_NO_PI")
        elif (ifr.ifr_flags & 3) != IFF_TUN or not (ifr.ifr_flags & IFF_NO_PI):
            raise ValueError("tun_fd must be a TUN (not TAP) device opened with IFF_NO_PI")
        if ifr.ifr_flags & IFF_VNET_HDR:
            if ioctl(sh.tun_fd, TUNGETVNETHDRSZ, &sz) < 0:
                raise OSError(errno, "TUNGETVNETHDRSZ failed")
            if sz < <int>sizeof(virtio_net_hdr) or sz > VNET_MAX:
                raise ValueError(f"unsupported virtio header size {sz}")
            sh.vnet_len = sz
        if offload != 0:
            if sh.vnet_len == 0:
                if offload == 1:
                    raise ValueError("offloads need a TUN opened with IFF_VNET_HDR")
            else:
                # VXLAN carries any frame: IPv6 TCP is left for the kernel to segment.
                fl = TUN_F_CSUM | TUN_F_TSO4 | (0 if sh.encap else TUN_F_TSO6)
                if ioctl(sh.tun_fd, TUNSETOFFLOAD, <unsigned long>fl) == 0:
                    sh.tso = 1
                elif offload == 1:
                    raise OSError(errno, "TUNSETOFFLOAD refused")
                # Writing GSO packets needs only the virtio header; refusals show at run time.
                sh.tun_gso_write = 1
            val = 0
            if setsockopt(sh.sock_fd, SOL_UDP, UDP_SEGMENT, &val, sizeof(int)) == 0:
                sh.udp_gso = 1
            elif offload == 1:
                raise OSError(errno, "UDP_SEGMENT refused")
            val = 1
            if setsockopt(sh.sock_fd, SOL_UDP, UDP_GRO, &val, sizeof(int)) == 0:
                sh.udp_gro = 1
            elif offload == 1:
                raise OSError(errno, "UDP_GRO refused")
        else:
            # Per-packet: the kernel must finish checksums and never hand us super-packets.
            if sh.vnet_len and ioctl(sh.tun_fd, TUNSETOFFLOAD, <unsigned long>0) < 0:
                raise OSError(errno, "TUNSETOFFLOAD(0) refused")
            val = 0
            setsockopt(sh.sock_fd, SOL_UDP, UDP_GRO, &val, sizeof(int))
        # The TUN loop drains until EAGAIN; the socket is read with MSG_DONTWAIT instead, so its
        # blocking mode (the caller's) only decides whether sends wait for buffer space.
        fl = fcntl(sh.tun_fd, F_GETFL)
        if fl < 0 or fcntl(sh.tun_fd, F_SETFL, fl | O_NONBLOCK) < 0:
            raise OSError(errno, "cannot make the TUN non-blocking")

    cdef void _alloc(self) except *:
        cdef Tx *tx
        cdef Rx *rx
        cdef int k
        self.tx = tx = <Tx *>xcalloc(sizeof(Tx))
        tx.cnt = self.sh.tx
        tx.cur = -1
        tx.arena = <uint8_t *>xcalloc(TX_ARENA + 64 + MAX_READ)
        tx.hdrs = <uint8_t *>xcalloc(TX_HDR_POOL)
        tx.iov = <iovec *>xcalloc(sizeof(iovec) * TX_MAX_IOV)
        tx.msgs = <mmsghdr *>xcalloc(sizeof(mmsghdr) * TX_MAX_MSGS)
        tx.names = <sockaddr_in *>xcalloc(sizeof(sockaddr_in) * TX_MAX_MSGS)
        tx.ctrl = <uint8_t *>xcalloc(CTRL_SPACE * TX_MAX_MSGS)
        tx.seglen = <int *>xcalloc(sizeof(int) * TX_MAX_MSGS)
        tx.nseg = <int *>xcalloc(sizeof(int) * TX_MAX_MSGS)
        self.rx = rx = <Rx *>xcalloc(sizeof(Rx))
        rx.cnt = self.sh.rx
        rx.eth = ETH_HLEN if self.sh.encap else 0
        # VXLAN: a kernel sender's whole TSO frame can arrive as one datagram, GRO or not.
        if self.sh.udp_gro or self.sh.encap:
            rx.nbuf = RX_GRO_BUFS
            rx.bufsize = RX_GRO_BUF
        else:
            # Room for the MTU and then some: a bigger datagram is a misconfigured peer.
            rx.nbuf = RX_PLAIN_BUFS
            rx.bufsize = ((self.sh.mtu + 1024) + 63) & ~63
        rx.bufs = <uint8_t *>xcalloc(<size_t>rx.nbuf * rx.bufsize)
        rx.msgs = <mmsghdr *>xcalloc(sizeof(mmsghdr) * rx.nbuf)
        rx.iov = <iovec *>xcalloc(sizeof(iovec) * rx.nbuf)
        rx.names = <sockaddr_in *>xcalloc(sizeof(sockaddr_in) * rx.nbuf)
        rx.ctrl = <uint8_t *>xcalloc(CTRL_SPACE * rx.nbuf)
        for k in range(rx.nbuf):
            rx.iov[k].iov_base = rx.bufs + <size_t>k * rx.bufsize
            rx.iov[k].iov_len = rx.bufsize
            rx.msgs[k].msg_hdr.msg_iov = &rx.iov[k]
            rx.msgs[k].msg_hdr.msg_iovlen = 1
            rx.msgs[k].msg_hdr.msg_name = &rx.names[k]
            rx.msgs[k].msg_hdr.msg_control = rx.ctrl + k * CTRL_SPACE

    def run_tx(self) -> int:
        """The TUN -> UDP loop; returns 0 when stopped, or the errno that ended it."""
        cdef int r
        if self.started_tx:
            raise RuntimeError("the TUN -> UDP loop already ran")
        self.started_tx = 1
        with nogil:
            r = tx_loop(self.sh, self.tx)
        return r

    def run_rx(self) -> int:
        """The UDP -> TUN loop; returns 0 when stopped, or the errno that ended it."""
        cdef int r
        if self.started_rx:
            raise RuntimeError("the UDP -> TUN loop already ran")
        self.started_rx = 1
        with nogil:
            r = rx_loop(self.sh, self.rx)
        return r

    def request_stop(self) -> None:
        """Makes both loops return (the eventfd they poll on becomes readable)."""
        cdef uint64_t one = 1
        gz_int_store(&self.sh.stopping, 1)
        if write(self.sh.stop_fd, &one, sizeof(one)) < 0 and errno != EAGAIN:
            PyErr_SetFromErrno(OSError)

    def set_routes(self, entries, arp=()) -> None:
        """Replaces the route table: ``entries`` are ``(net, prefixlen, peer_ip, port)`` with the
        addresses as integers: IPv4 destinations (udp; prefixes up to 32 bits) or destination MACs
        (VXLAN; 48 bits, exact). ``arp``: ``(ip, mac)`` integers, the gateways answered for
        (VXLAN). The old table is freed once the TUN loop no longer reads it."""
        cdef list items = sorted(entries, key=lambda e: (-e[1], e[0]))
        cdef list arps = sorted(arp)
        cdef Py_ssize_t n = len(items)
        cdef Py_ssize_t na = len(arps)
        cdef Py_ssize_t i
        cdef int g = -1
        cdef int plen, last = -1
        cdef int width = 48 if self.sh.encap else 32
        cdef int k
        cdef object limit = (<object>1) << width
        cdef uint64_t net, mask, mac
        cdef RouteTable *t
        cdef RouteTable *old
        t = <RouteTable *>xcalloc(sizeof(RouteTable) + <size_t>n * sizeof(Route)
                                  + <size_t>na * sizeof(ArpEntry))
        t.routes = <Route *>(<char *>t + sizeof(RouteTable))
        t.arp = <ArpEntry *>(<char *>t.routes + <size_t>n * sizeof(Route))
        t.nroutes = <int>n
        t.narp = <int>na
        try:
            for i in range(na):
                ip_i, mac_i = arps[i]
                if not 0 <= ip_i < (1 << 32) or not 0 <= mac_i < (1 << 48):
                    raise ValueError(f"bad ARP entry {arps[i]!r}")
                if i and arps[i - 1][0] == ip_i:
                    raise ValueError(f"duplicate ARP entry {arps[i]!r}")
                t.arp[i].ip = <uint32_t>ip_i
                mac = <uint64_t>mac_i
                for k in range(6):
                    t.arp[i].mac[k] = (mac >> (40 - 8 * k)) & 0xff
            for i in range(n):
                net_i, plen, ip_i, port = items[i]
                if not 0 <= plen <= width or not 0 < port < 65536 or not 0 <= net_i < limit:
                    raise ValueError(f"bad route {items[i]!r}")
                mask = 0 if plen == 0 else ((<uint64_t>1 << width) - 1) & (
                    ((<uint64_t>1 << width) - 1) << (width - plen))
                net = <uint64_t>net_i
                if net & ~mask:
                    raise ValueError(f"route {items[i]!r} has host bits set")
                if plen != last:
                    g += 1
                    t.groups[g].mask = mask
                    t.groups[g].start = <int>i
                    last = plen
                elif t.routes[i - 1].net == net:
                    raise ValueError(f"duplicate route {items[i]!r}")
                t.groups[g].count += 1
                t.routes[i].net = net
                t.routes[i].hop.sin_family = AF_INET
                t.routes[i].hop.sin_port = htons(<uint16_t>port)
                t.routes[i].hop.sin_addr.s_addr = htonl(<uint32_t>ip_i)
            t.ngroups = g + 1
        except BaseException:
            free(t)
            raise
        with nogil:
            old = <RouteTable *>gz_ptr_swap(<void **>&self.sh.table, t)
            while old != NULL and gz_ptr_load(<void **>&self.sh.hazard) == <void *>old:
                usleep(20)
            free(old)

    def counters(self) -> dict:
        """Both loops' counters, summed, by name (see COUNTER_NAMES)."""
        cdef int i
        return {
            COUNTER_NAMES[i]: gz_u64_load(&self.sh.tx[i]) + gz_u64_load(&self.sh.rx[i])
            for i in range(C_COUNT)
        }

    def offloads(self) -> dict:
        """Which offloads are in use now (run-time fallbacks clear them)."""
        return {
            "vnet_hdr": self.sh.vnet_len != 0,
            "tun_tso": self.sh.tso != 0,
            "udp_gso": gz_int_load(&self.sh.udp_gso) != 0,
            "udp_gro": self.sh.udp_gro != 0,
            "tun_gso_write": gz_int_load(&self.sh.tun_gso_write) != 0,
        }

    def inject_refusal(self, bint send, bint write) -> None:
        """For tests: make the next UDP_SEGMENT send (EIO) and/or the next coalesced TUN write
        (EINVAL) fail as if the kernel refused the offload, to exercise the run-time fallback."""
        if send:
            gz_int_store(&self.sh.inject_send_refusal, 1)
        if write:
            gz_int_store(&self.sh.inject_write_refusal, 1)

    def errors(self) -> tuple:
        """The errno that ended each loop (TUN -> UDP, UDP -> TUN); 0 while running or stopped."""
        return (self.sh.tx_errno, self.sh.rx_errno)
