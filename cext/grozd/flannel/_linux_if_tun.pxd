# Declarations from <linux/if_tun.h>: TUN flags, ioctls and offload features.

cdef extern from "<linux/if_tun.h>" nogil:
    enum:
        TUNGETIFF
        TUNSETOFFLOAD
        TUNGETVNETHDRSZ
        IFF_TUN
        IFF_TAP
        IFF_NO_PI
        IFF_VNET_HDR
        TUN_F_CSUM
        TUN_F_TSO4
        TUN_F_TSO6
        TUN_F_TSO_ECN
