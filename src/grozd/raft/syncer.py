"""fdatasync off the event loop, without a thread that competes for the GIL.

`Syncer.fdatasync(fd)` returns a future for the outcome: the request goes down a pipe to a
thread running native code only (`_syncer.serve`), whose answer wakes the loop through
another pipe. Requests are answered in order.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections import deque

from grozd.raft import _syncer

_INT = struct.Struct("=i")


class Syncer:
    """One sync thread serving one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._requests_r, self._requests_w = os.pipe()
        self._answers_r, self._answers_w = os.pipe()
        os.set_blocking(self._answers_r, False)
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._pending = b""
        self._thread = threading.Thread(target=_syncer.serve, name="grozd-wal-sync",
                                        args=(self._requests_r, self._answers_w), daemon=True)
        self._thread.start()
        loop.add_reader(self._answers_r, self._on_answers)
        self._closed = False

    def fdatasync(self, fd: int) -> asyncio.Future[int]:
        """A future for the errno of fdatasync(fd): 0 when the data is durable."""
        if self._closed:
            raise RuntimeError("syncer closed")
        fut = self._loop.create_future()
        self._waiting.append(fut)
        os.write(self._requests_w, _INT.pack(fd))
        return fut

    def _on_answers(self) -> None:
        try:
            data = self._pending + os.read(self._answers_r, 4096)
        except BlockingIOError:
            return
        whole = len(data) - len(data) % _INT.size
        self._pending = data[whole:]
        for (outcome,) in _INT.iter_unpack(data[:whole]):
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(outcome)

    def close(self) -> None:
        """Stop the thread once it has answered what was asked (idempotent)."""
        if self._closed:
            return
        self._closed = True
        os.close(self._requests_w)  # the thread sees the end of its requests
        self._thread.join()
        self._on_answers()
        self._loop.remove_reader(self._answers_r)
        for fd in (self._requests_r, self._answers_r, self._answers_w):
            os.close(fd)
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.cancel()
