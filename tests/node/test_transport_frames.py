"""Peer frames read from whatever arrives: split anywhere, several per read, limits kept."""

from __future__ import annotations

import asyncio
import random

import pytest

from grozd.raft.transport import MAX_FRAME, MESSAGE, SNAP_CHUNK, frame, read_frames


async def collect(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return [f async for f in read_frames(reader)]


def test_frames_survive_any_split() -> None:
    sent = [(MESSAGE, b"a" * n) for n in (0, 1, 7, 300, 70_000)] + [(SNAP_CHUNK, b"s" * 5)]
    stream = b"".join(frame(kind, body) for kind, body in sent)
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), 6))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert asyncio.run(collect(chunks)) == sent


def test_a_stream_ending_mid_frame_is_incomplete() -> None:
    data = frame(MESSAGE, b"hello")
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(collect([data[:-2]]))


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    head = (MAX_FRAME + 1).to_bytes(4, "big") + bytes([MESSAGE])
    with pytest.raises(ValueError, match="exceeds the limit"):
        asyncio.run(collect([head]))
