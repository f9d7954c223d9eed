"""Peer transport: one persistent TCP stream to each peer, length-prefixed frames.

A frame is `length (u32 BE) | kind (u8) | body`. Each connection opens with a HELLO naming the
cluster and both members, so a member refuses traffic from another cluster (a different
--initial-cluster-token) and says why. Raft messages use the core's wire codec; a snapshot is
streamed in chunks ahead of its message. Writes are batched: everything queued for a peer goes
out in one write. Lost messages are fine (Raft retransmits); the core hears of unreachable peers
and of snapshots that could not be sent.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import msgpack

from grozd.raft.codec import CodecError, decode_message, encode_message
from grozd.raft.core import Message, MessageType, Snapshot

log = logging.getLogger("grozd.raft.transport")

PROTOCOL = 1
HELLO, MESSAGE, SNAP_CHUNK, SNAP_END, REFUSE = range(5)
MAX_FRAME = 16 * 1024 * 1024
SNAP_CHUNK_BYTES = 1024 * 1024
MAX_QUEUE = 8192  # frames waiting for one peer; beyond it messages are dropped like a lossy link
DIRECT_WRITE_LIMIT = 1024 * 1024  # unsent bytes beyond which frames queue for the writer task
READ_BYTES = 256 * 1024
_HEADER = struct.Struct(">IB")


def parse_url(url: str) -> tuple[str, int]:
    """host and port of an http://host:port peer or client URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "tcp") or not parts.hostname or not parts.port:
        raise ValueError(f"expected a URL like http://127.0.0.1:2380, got {url!r}")
    return parts.hostname, parts.port


def frame(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + 1, kind) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    length, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length < 1 or length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    return kind, await reader.readexactly(length - 1)


async def read_frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """Every frame of a stream, taken from whatever has arrived: one wakeup per read, not
    two per frame. Ends with IncompleteReadError mid-frame, or cleanly at a frame boundary."""
    buf = b""
    while True:
        chunk = await reader.read(READ_BYTES)
        if not chunk:
            if buf:
                raise asyncio.IncompleteReadError(buf, None)
            return
        buf = buf + chunk if buf else chunk
        offset, size = 0, len(buf)
        while size - offset >= _HEADER.size:
            length, kind = _HEADER.unpack_from(buf, offset)
            if length < 1 or length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
            end = offset + _HEADER.size + length - 1
            if end > size:
                break
            yield kind, buf[offset + _HEADER.size:end]
            offset = end
        buf = buf[offset:] if offset else buf


def cluster_query(kind: int, body: bytes) -> list[str] | None:
    """A hello with cluster 0 asks which cluster this is and which member has the given peer
    URLs (a member joining the cluster learns its ID this way)."""
    if kind != HELLO:
        return None
    try:
        fields = msgpack.unpackb(body)
    except Exception:
        return None
    if len(fields) == 5 and fields[0] == PROTOCOL and fields[1] == 0:
        return [str(u) for u in fields[4]]
    return None


async def fetch_cluster_id(peer_urls: list[str], urls: list[str],
                           timeout: float = 2.0) -> tuple[int, int, list]:
    """Ask existing members for (cluster ID, the member ID given to peer_urls or 0, and the
    members as [[id, name, peer URLs], ...]) so a joining member can talk to them."""
    errors = []
    found = None
    for url in urls:
        writer = None
        try:
            host, port = parse_url(url)
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(frame(HELLO, msgpack.packb([PROTOCOL, 0, 0, 0, list(peer_urls)])))
            kind, body = await asyncio.wait_for(read_frame(reader), timeout)
            version, cluster_id, _, member_id, members = msgpack.unpackb(body)
            if kind == HELLO and version == PROTOCOL and cluster_id:
                if member_id:
                    return cluster_id, member_id, members
                found = (cluster_id, 0, members)  # it may not have applied the addition yet
                continue
            errors.append(f"{url}: unexpected answer")
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            errors.append(f"{url}: {e or type(e).__name__}")
        finally:
            if writer is not None:
                writer.close()
    if found:
        return found
    raise ConnectionError("could not reach any existing member to join its cluster ("
                          + "; ".join(errors) + ")")


class PeerSender:
    """The outgoing stream to one peer: a queue, a writer task, reconnection with backoff."""

    def __init__(self, transport: Transport, peer_id: int, urls: list[str]) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.urls = urls
        self.queue: deque[tuple[bytes, int]] = deque()  # (frame bytes, snapshot target or 0)
        self.wakeup = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None  # while connected
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.connected = False

    def enqueue(self, data: bytes, snapshot_to: int = 0) -> bool:
        if len(self.queue) >= MAX_QUEUE:
            return False
        self.queue.append((data, snapshot_to))
        self.wakeup.set()
        return True

    def send_frames(self, frames: list[bytes]) -> bool:
        """Write at once when the stream is up and keeping pace (no extra loop turn on the
        commit path); otherwise queue behind what is waiting."""
        writer = self.writer
        if (writer is not None and not self.queue
                and writer.transport.get_write_buffer_size() < DIRECT_WRITE_LIMIT):
            writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
            return True
        return all(self.enqueue(f) for f in frames)

    async def run(self) -> None:
        backoff = 0.05
        attempt = 0
        while True:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            writer = None
            try:
                host, port = parse_url(url)
                reader, writer = await asyncio.open_connection(host, port)
                hello = msgpack.packb([PROTOCOL, self.transport.cluster_id,
                                       self.transport.member_id, self.peer_id])
                writer.write(frame(HELLO, hello))
                refused = asyncio.get_running_loop().create_task(self.watch_refusal(reader))
                self.connected = True
                log.info("event=peer_active peer=%x url=%s", self.peer_id, url)
                backoff = 0.05
                try:
                    await self.pump(writer, refused)
                finally:
                    self.writer = None
                    refused.cancel()
            except asyncio.CancelledError:
                if writer is not None:
                    writer.close()
                raise
            except Exception as e:  # any failure: reconnect; this task must never die
                log.debug("event=peer_send_failed peer=%x url=%s error=%r", self.peer_id, url, e)
            if writer is not None:
                writer.close()
            if self.connected:
                log.info("event=peer_inactive peer=%x", self.peer_id)
            self.connected = False
            self.fail_queued()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def pump(self, writer: asyncio.StreamWriter, refused: asyncio.Task) -> None:
        while not refused.done():
            if not self.queue:
                self.writer = writer  # caught up: writes may go straight out
                self.wakeup.clear()
                waiter = asyncio.ensure_future(self.wakeup.wait())
                await asyncio.wait([waiter, refused], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            self.writer = None
            batch = list(self.queue)
            self.queue.clear()
            writer.write(b"".join(data for data, _ in batch))
            await writer.drain()
            for _, snapshot_to in batch:
                if snapshot_to:
                    self.transport.on_snapshot_status(snapshot_to, False)
        raise ConnectionError(refused.result() or "peer closed the connection")

    async def watch_refusal(self, reader: asyncio.StreamReader) -> str:
        """The peer only ever writes a REFUSE frame on this stream, then closes it."""
        try:
            kind, body = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return ""
        if kind == REFUSE:
            reason = body.decode("utf-8", "replace")
            log.error("event=peer_refused_us peer=%x reason=%r", self.peer_id, reason)
            return reason
        return ""

    def fail_queued(self) -> None:
        lost = list(self.queue)
        self.queue.clear()
        self.transport.on_unreachable(self.peer_id)
        for _, snapshot_to in lost:
            if snapshot_to:
                self.transport.on_snapshot_status(snapshot_to, True)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


class Transport:
    """Sends the core's messages to peers and hands it theirs."""

    def __init__(self, member_id: int, cluster_id: int,
                 on_message: Callable[[Message], None],
                 on_unreachable: Callable[[int], None],
                 on_snapshot_status: Callable[[int, bool], None],
                 describe_cluster: Callable[[list[str]], tuple[int, list]] | None = None,
                 ) -> None:
        self.member_id = member_id
        self.describe_cluster = describe_cluster
        self.cluster_id = cluster_id
        self.on_message = on_message
        self.on_unreachable = on_unreachable
        self.on_snapshot_status = on_snapshot_status
        self.peers: dict[int, PeerSender] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[asyncio.StreamWriter] = set()
        self.frames_sent = 0
        self.frames_received = 0

    async def listen(self, urls: list[str]) -> None:
        for url in urls:
            host, port = parse_url(url)
            self.servers.append(await asyncio.start_server(self.serve, host, port,
                                                           reuse_address=True))

    def set_peer(self, peer_id: int, urls: list[str]) -> None:
        if peer_id == self.member_id or not urls:
            return
        sender = self.peers.get(peer_id)
        if sender is None:
            self.peers[peer_id] = PeerSender(self, peer_id, list(urls))
        else:
            sender.urls = list(urls)

    async def remove_peer(self, peer_id: int) -> None:
        sender = self.peers.pop(peer_id, None)
        if sender is not None:
            await sender.stop()

    def send(self, messages: list[Message]) -> None:
        """Send a Ready's messages: one write per peer."""
        frames: dict[int, list[bytes]] = {}
        for m in messages:
            sender = self.peers.get(m.to)
            if sender is None:
                continue
            self.frames_sent += 1
            if m.type == MessageType.SNAP and m.snapshot is not None:
                self.flush(frames, m.to)
                if not self.enqueue_snapshot(sender, m):
                    self.on_unreachable(m.to)
            else:
                frames.setdefault(m.to, []).append(frame(MESSAGE, encode_message(m)))
        for peer in list(frames):
            self.flush(frames, peer)

    def flush(self, frames: dict[int, list[bytes]], peer: int) -> None:
        pending = frames.pop(peer, None)
        if pending and not self.peers[peer].send_frames(pending):
            self.on_unreachable(peer)

    def enqueue_snapshot(self, sender: PeerSender, m: Message) -> bool:
        data = m.snapshot.data
        for start in range(0, len(data), SNAP_CHUNK_BYTES):
            if not sender.enqueue(frame(SNAP_CHUNK, data[start:start + SNAP_CHUNK_BYTES])):
                self.on_snapshot_status(m.to, True)
                return False
        head = m.copy()
        s = m.snapshot
        head.snapshot = Snapshot(s.index, s.term, s.conf_state, b"")
        if not sender.enqueue(frame(SNAP_END, encode_message(head)), snapshot_to=m.to):
            self.on_snapshot_status(m.to, True)
            return False
        return True

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        peer = writer.get_extra_info("peername")
        chunks: list[bytes] = []
        try:
            kind, body = await read_frame(reader)
            query = cluster_query(kind, body)
            if query is not None:
                await self.answer_cluster_query(writer, query)
                return
            refusal = self.check_hello(kind, body)
            if refusal:
                log.warning("event=peer_refused remote=%s reason=%r", peer, refusal)
                writer.write(frame(REFUSE, refusal.encode()))
                await writer.drain()
                return
            # A peer opening a new stream may have restarted and lost what it had not
            # synced: the core should probe it again rather than trust what it matched.
            self.on_unreachable(msgpack.unpackb(body)[2])
            async for kind, body in read_frames(reader):
                if kind == MESSAGE:
                    m = decode_message(body)
                elif kind == SNAP_CHUNK:
                    chunks.append(body)
                    continue
                elif kind == SNAP_END:
                    m = decode_message(body)
                    if m.snapshot is None:
                        raise CodecError("snapshot end without a snapshot")
                    s = m.snapshot
                    m.snapshot = Snapshot(s.index, s.term, s.conf_state, b"".join(chunks))
                    chunks = []
                else:
                    raise CodecError(f"unexpected frame kind {kind}")
                if m.to != self.member_id:
                    raise CodecError(f"message for member {m.to:x} reached {self.member_id:x}")
                self.frames_received += 1
                self.on_message(m)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (CodecError, ValueError) as e:
            log.warning("event=peer_stream_error remote=%s error=%r", peer, str(e))
        finally:
            self.connections.discard(writer)
            writer.close()

    async def answer_cluster_query(self, writer: asyncio.StreamWriter,
                                   peer_urls: list[str]) -> None:
        member, members = self.describe_cluster(peer_urls) if self.describe_cluster else (0, [])
        writer.write(frame(HELLO, msgpack.packb([PROTOCOL, self.cluster_id, self.member_id,
                                                 member, members])))
        await writer.drain()

    def check_hello(self, kind: int, body: bytes) -> str:
        if kind != HELLO:
            return "expected a hello frame first"
        try:
            version, cluster_id, from_id, to_id = msgpack.unpackb(body)
        except Exception:
            return "malformed hello"
        if version != PROTOCOL:
            return f"peer protocol {version} is not {PROTOCOL}"
        if cluster_id != self.cluster_id:
            return (f"member {from_id:x} belongs to cluster {cluster_id:x}, this is cluster"
                    f" {self.cluster_id:x} (a different --initial-cluster-token?)")
        if to_id != self.member_id:
            return f"this is member {self.member_id:x}, not {to_id:x}"
        return ""

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self.connections):
            writer.close()
        for sender in list(self.peers.values()):
            await sender.stop()
        self.peers.clear()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
