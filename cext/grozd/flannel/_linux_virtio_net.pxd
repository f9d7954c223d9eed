# Declarations from <linux/virtio_net.h>: the header a TUN opened with IFF_VNET_HDR puts in
# front of every packet (offload metadata: segmentation and partial checksums).

from libc.stdint cimport uint8_t, uint16_t


cdef extern from "<linux/virtio_net.h>" nogil:
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset

    enum:
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_F_DATA_VALID
        VIRTIO_NET_HDR_GSO_NONE
        VIRTIO_NET_HDR_GSO_TCPV4
        VIRTIO_NET_HDR_GSO_UDP
        VIRTIO_NET_HDR_GSO_TCPV6
        VIRTIO_NET_HDR_GSO_ECN
