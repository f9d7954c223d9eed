# Declarations from <netinet/in.h>: IPv4 socket addresses and byte order.

from libc.stdint cimport uint16_t, uint32_t


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr

    uint16_t htons(uint16_t x)
    uint16_t ntohs(uint16_t x)
    uint32_t htonl(uint32_t x)
    uint32_t ntohl(uint32_t x)
