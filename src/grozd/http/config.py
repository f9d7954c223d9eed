"""`ApiConfig`: limits, timeouts and identity of the HTTP API."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_MAX_BODY = 1536 * 1024  # 1.5 MiB, etcd's --max-request-bytes default


@dataclass
class ApiConfig:
    """Everything `make_app` can be told; the defaults suit a production member.

    Sizes are bytes, times seconds. ``clock`` stamps the time into write commands (and
    counts TTLs down for reads): injectable so tests control time.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY
    # Request line plus headers; Go's default is 1 MiB, 64 KiB is plenty for etcd clients.
    max_header_bytes: int = 64 * 1024
    # A keep-alive connection with nothing in flight is closed after this long.
    idle_timeout: float = 120.0
    # From a request's first byte until its headers are complete (slow-loris guard).
    header_timeout: float = 10.0
    # From the headers until the body is complete.
    body_timeout: float = 30.0
    # How long a client may leave our output unread (full socket buffers) before we drop it.
    write_timeout: float = 30.0
    # Watches (long-poll or streaming) waiting at once on one connection.
    max_watchers_per_connection: int = 64
    # Requests read ahead of their responses on one connection (pipelining depth).
    max_pipeline: int = 64
    # Open client connections; beyond this new ones are answered 503 and closed.
    max_connections: int = 10000
    # Bound on one proposal or quorum read before answering etcd's "request timed out".
    request_timeout: float = 7.0
    clock: Callable[[], float] = field(default=time.time)
    # What /version reports: the etcd release whose v2 API this speaks.
    server_version: str = "3.4.23"
    cluster_version: str = "3.4.0"
    # etcd 3.4 answers every client request with permissive CORS headers.
    cors: bool = True
