# Declarations from <netinet/udp.h>: the UDP segmentation (GSO) and receive-coalescing (GRO)
# socket options.

cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT
        UDP_GRO
