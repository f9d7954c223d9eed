# Declarations from <sys/socket.h> the data path uses (batched and GSO-capable I/O).

from posix.time cimport timespec
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        unsigned short sa_family

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    # Macros, declared as functions.
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr,
                   socklen_t addr_len)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)

    enum:
        AF_INET
        SOL_SOCKET
        SO_TYPE
        SOCK_DGRAM
        MSG_DONTWAIT
        MSG_TRUNC
