# Declarations from <poll.h>.

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    ctypedef unsigned long nfds_t

    int poll(pollfd *fds, nfds_t nfds, int timeout)

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL
