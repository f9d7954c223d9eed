# Declarations from <sys/eventfd.h>: the wake-up the loops poll on when stopping.

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)

    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
