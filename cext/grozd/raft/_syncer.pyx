# cython: language_level=3
"""The body of the WAL's sync thread, which never holds the GIL.

A Python thread that calls fdatasync needs the GIL back after every call and, with the
event loop busy, waits for it for up to the interpreter's switch interval (5 ms): longer
than the sync itself. This loop runs entirely without the GIL and answers through a pipe
the event loop watches.
"""

from libc.errno cimport EINTR, errno

cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int fdatasync(int fd)


def serve(int requests, int answers) -> None:
    """For each file descriptor number (a native int) read from ``requests``, fdatasync it
    and write the outcome (0 or an errno, a native int) to ``answers``. Returns when
    ``requests`` reaches its end or either pipe fails."""
    cdef int fd = 0
    cdef int outcome = 0
    cdef ssize_t n
    with nogil:
        while True:
            n = read(requests, &fd, sizeof(int))
            if n < 0 and errno == EINTR:
                continue
            if n != sizeof(int):
                break
            outcome = 0
            while fdatasync(fd) != 0:
                if errno != EINTR:
                    outcome = errno
                    break
            while True:
                n = write(answers, &outcome, sizeof(int))
                if n < 0 and errno == EINTR:
                    continue
                break
            if n != sizeof(int):
                break
