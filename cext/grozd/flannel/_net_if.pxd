# Declarations from <net/if.h>: the interface request the TUN ioctls take.

cdef extern from "<net/if.h>" nogil:
    enum:
        IFNAMSIZ

    struct ifreq:
        char ifr_name[16]
        short ifr_flags
