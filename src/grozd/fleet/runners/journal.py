"""Per-unit journals of the embedded supervisor: one append-only text file per unit.

Each line is ``<ISO 8601 time> <identifier>[<pid>]: <message>``; `format_short` turns it
into journalctl's default ("short") form, ``Nov 29 03:45:00 host sleep[123]: message``.
A file is rotated to ``<name>.log.1`` past ``max_bytes`` (one old file is kept).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

# journald splits longer lines too (LineMax=48K).
LINE_MAX = 48 * 1024
_LINE = re.compile(r"^(\S+) (.*)$", re.S)


def format_short(line: str, hostname: str) -> str:
    """journalctl's short format of one stored line."""
    m = _LINE.match(line)
    if m is None:
        return line
    try:
        when = datetime.fromisoformat(m.group(1)).astimezone()
    except ValueError:
        return line
    return f"{when.strftime('%b %d %H:%M:%S')} {hostname} {m.group(2)}"


class Journal:
    """The journals of every unit under one directory."""

    def __init__(self, directory: Path, hostname: str, max_bytes: int = 8 * 1024 * 1024):
        self.directory = directory
        self.hostname = hostname
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, unit: str) -> Path:
        """The current journal file of ``unit``."""
        return self.directory / f"{unit}.log"

    def write(self, unit: str, ident: str, pid: int, message: str) -> None:
        """Append one message (split into lines) to the unit's journal."""
        stamp = datetime.now(UTC).isoformat(timespec="microseconds")
        lines = []
        for text in message.splitlines() or [""]:
            for start in range(0, max(len(text), 1), LINE_MAX):
                lines.append(f"{stamp} {ident}[{pid}]: {text[start:start + LINE_MAX]}\n")
        path = self.path(unit)
        try:
            if path.exists() and path.stat().st_size > self.max_bytes:
                os.replace(path, path.with_name(path.name + ".1"))
            with open(path, "a", encoding="utf-8", errors="replace") as f:
                f.write("".join(lines))
        except OSError:
            # A full disk must not take the supervisor down with it.
            pass

    def tail(self, unit: str, lines: int) -> list[str]:
        """The last ``lines`` lines (short format), oldest first."""
        if lines <= 0:
            return []
        raw: list[str] = []
        for path in (self.path(unit), self.path(unit).with_name(f"{unit}.log.1")):
            if len(raw) >= lines:
                break
            raw = _last_lines(path, lines - len(raw)) + raw
        return [format_short(line, self.hostname) for line in raw[-lines:]]

    async def follow(
        self, unit: str, lines: int = 10, poll: float = 0.2
    ) -> AsyncIterator[str]:
        """The last ``lines`` lines, then every new line as it is written (forever)."""
        for line in self.tail(unit, lines):
            yield line
        path = self.path(unit)
        try:
            st = path.stat()
            offset, inode = st.st_size, st.st_ino
        except FileNotFoundError:
            offset, inode = 0, None
        partial = b""
        while True:
            await asyncio.sleep(poll)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_ino != inode or st.st_size < offset:
                # Rotated: the new file is read from its start.
                inode, offset, partial = st.st_ino, 0, b""
            if st.st_size == offset:
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            chunks = (partial + data).split(b"\n")
            partial = chunks.pop()
            for chunk in chunks:
                yield format_short(chunk.decode("utf-8", "replace"), self.hostname)


def _last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a file, read backwards in blocks."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        data = b""
        block = 8192
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    text = data.decode("utf-8", "replace")
    return text.splitlines()[-count:]
