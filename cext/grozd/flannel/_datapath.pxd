# Declarations of the userspace data paths (flannel's udp, and VXLAN); bodies live in _datapath.pyx.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

from grozd.flannel._netinet_in cimport sockaddr_in
from grozd.flannel._sys_socket cimport mmsghdr


cdef enum:
    MAX_READ = 65536 + 512        # one TUN read: a 64 KB super-packet, with slack
    TX_ARENA = 256 * 1024         # bytes read from the TUN before the queued datagrams go out
    TX_MAX_READS = 64             # TUN reads per batch
    TX_MAX_MSGS = 256             # messages per sendmmsg
    TX_MAX_IOV = 2048             # two per segment: rewritten header, payload slice
    TX_HDR_POOL = 128 * 1024      # rewritten segment headers (encapsulation + IP + TCP)
    SEG_HDR_MAX = 160             # one of them: VXLAN (8) + Ethernet (14) + IP and TCP (120)
    CTRL_SPACE = 64               # control buffer per message (one cmsg with an int)
    UDP_MAX_PAYLOAD = 65507       # 65535 - IPv4 header - UDP header
    GSO_MAX_SEGS = 64             # UDP_MAX_SEGMENTS on older kernels
    RX_GRO_BUFS = 32              # recvmmsg slots with UDP_GRO (64 KB each)
    RX_GRO_BUF = 65536 + 4096
    RX_PLAIN_BUFS = 64            # recvmmsg slots without UDP_GRO (MTU-sized)
    GROUP_MAX = 64                # TCP segments coalesced into one TUN write
    ICMP_BUF = 192
    VNET_MAX = 16
    ETH_HLEN = 14
    VXLAN_HLEN = 8
    ENCAP_MAX = VXLAN_HLEN + ETH_HLEN
    ARP_LEN = 42                  # Ethernet + ARP for IPv4


# Counters, one array per loop thread (each written only by its thread); Python sums them.
cdef enum Counter:
    C_TUN_READS
    C_TUN_READ_BYTES
    C_TUN_SUPER_PACKETS
    C_TX_PACKETS
    C_TX_BYTES
    C_TX_SYSCALLS
    C_TX_GSO_SENDS
    C_RX_SYSCALLS
    C_RX_DATAGRAMS
    C_RX_BYTES
    C_RX_GRO_BUFFERS
    C_RX_ERRORS
    C_TUN_WRITES
    C_TUN_WRITE_BYTES
    C_TUN_GSO_WRITES
    C_RX_PACKETS
    C_ICMP_UNREACHABLE
    C_ICMP_TIME_EXCEEDED
    C_DROP_NO_ROUTE
    C_DROP_TTL
    C_DROP_NOT_IPV4
    C_DROP_MALFORMED
    C_DROP_TRUNCATED
    C_DROP_SEND_ERROR
    C_DROP_TUN_WRITE_ERROR
    C_GSO_SEND_FALLBACKS
    C_GSO_WRITE_FALLBACKS
    C_ARP_REPLIES
    C_RX_CSUM_COMPLETED
    C_RX_SUPER_FRAMES
    C_DROP_MULTICAST
    C_DROP_BAD_VXLAN
    C_COUNT


# The route table maps a key to a peer: a destination IPv4 address by longest prefix (udp), or a
# destination MAC address exactly (VXLAN: the FDB, one group of 48-bit "prefixes").
cdef struct Route:
    uint64_t net                  # host byte order
    sockaddr_in hop


cdef struct RouteGroup:
    uint64_t mask                 # all routes of one prefix length
    int start
    int count


# VXLAN: the addresses answered for on the TAP (each remote subnet's gateway -> its VTEP's MAC).
cdef struct ArpEntry:
    uint32_t ip                   # host byte order
    uint8_t mac[6]


cdef struct RouteTable:
    int ngroups                   # longest prefix first
    int nroutes
    int narp
    RouteGroup groups[49]
    Route *routes                 # sorted by net within each group
    ArpEntry *arp                 # sorted by ip


# What both loops share. Flags are read and written with atomics: the loops clear the offload
# flags at run time when the kernel refuses an offload, Python reads them.
cdef struct Shared:
    int encap                     # 0: flannel udp (IP in UDP, TUN); 1: VXLAN (Ethernet in UDP, TAP)
    uint8_t vxh[VXLAN_HLEN]       # the VXLAN header every datagram starts with (flags, VNI)
    int tun_fd
    int sock_fd
    int stop_fd
    int mtu
    int vnet_len                  # 0: the TUN has no virtio header
    int tso                       # the TUN hands us TCP super-packets
    int udp_gso                   # trains go out with UDP_SEGMENT
    int udp_gro                   # datagrams come in coalesced (UDP_GRO)
    int tun_gso_write             # coalesced TCP segments go into the TUN as one write
    int stopping
    int inject_send_refusal       # tests: the next UDP_SEGMENT send fails as if refused (EIO)
    int inject_write_refusal      # tests: the next GSO TUN write fails as if refused (EINVAL)
    int tx_errno                  # the error that ended a loop (0: stopped on request)
    int rx_errno
    RouteTable *table
    RouteTable *hazard            # the table the TUN->UDP loop is reading, if any
    uint64_t tx[<int>C_COUNT]
    uint64_t rx[<int>C_COUNT]


# TUN -> UDP: packets read into an arena, datagrams queued as mmsghdrs pointing into it.
cdef struct Tx:
    uint64_t *cnt
    uint8_t *arena
    size_t arena_off
    uint8_t *hdrs
    size_t hdr_off
    iovec *iov
    int niov
    mmsghdr *msgs
    sockaddr_in *names
    uint8_t *ctrl
    int *seglen                   # per message: UDP_SEGMENT size, 0 for one datagram
    int *nseg                     # per message: inner packets in it
    int nmsg
    int cur                       # the message being built, -1 when none
    uint8_t vh[VNET_MAX]
    uint8_t zero_vh[VNET_MAX]
    uint8_t icmp[ICMP_BUF]
    uint8_t pre[ENCAP_MAX]        # VXLAN: what goes before every segment's IP header
    uint8_t arp[ARP_LEN]


# UDP -> TUN: one recvmmsg batch, and the run of same-flow TCP segments being coalesced.
cdef struct Rx:
    uint64_t *cnt
    int eth                       # bytes before the IP header of a packet (Ethernet: 14, or 0)
    uint8_t *bufs
    int nbuf
    int bufsize
    mmsghdr *msgs
    iovec *iov
    sockaddr_in *names
    uint8_t *ctrl
    uint8_t *gpkt[GROUP_MAX]
    int glen[GROUP_MAX]
    int gn
    int ghl                       # IP + TCP header length of the group
    int gmss                      # payload of every segment but the last
    int gtotal                    # bytes of the coalesced packet
    int gclosed                   # the last segment had PSH: nothing may follow it
    iovec wiov[GROUP_MAX + 1]
    uint8_t vh[VNET_MAX]
    uint8_t zero_vh[VNET_MAX]
    uint8_t saved[128]
    uint8_t icmp[ICMP_BUF]


cdef class Core:
    cdef Shared *sh
    cdef Tx *tx
    cdef Rx *rx
    cdef int started_tx
    cdef int started_rx
    cdef void _probe(self, int offload) except *
    cdef void _alloc(self) except *
