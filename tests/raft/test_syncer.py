"""The WAL's sync thread: answers in order, reports errors, stops cleanly."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

from grozd.raft.syncer import Syncer


def test_syncs_in_order_and_reports_errno(tmp_path: Path) -> None:
    async def main() -> list[int]:
        syncer = Syncer(asyncio.get_running_loop())
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, b"x" * 4096)
            bad = os.open(os.devnull, os.O_RDONLY)
            os.close(bad)  # a closed descriptor: EBADF
            futures = [syncer.fdatasync(fd) for _ in range(50)] + [syncer.fdatasync(bad)]
            return list(await asyncio.gather(*futures))
        finally:
            syncer.close()
            os.close(fd)

    outcomes = asyncio.run(main())
    assert outcomes == [0] * 50 + [errno.EBADF]


def test_close_ends_the_thread_and_is_idempotent() -> None:
    async def main() -> None:
        syncer = Syncer(asyncio.get_running_loop())
        syncer.close()
        syncer.close()

    before = {t.name for t in threading.enumerate()}
    asyncio.run(main())
    assert "grozd-wal-sync" not in {t.name for t in threading.enumerate()} - before
