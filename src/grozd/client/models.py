"""Typed results of the etcd v2 API: `Node`, `Response`, `Member`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        # etcd sends RFC 3339 with nanoseconds; Python 3.11 reads it (to the microsecond).
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Node:
    """One key or directory of the v2 store."""

    key: str
    value: str | None = None
    dir: bool = False
    nodes: tuple[Node, ...] = ()
    created_index: int = 0
    modified_index: int = 0
    expiration: datetime | None = None
    ttl: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Node:
        """Build a node from etcd's JSON object (``createdIndex``, ``nodes``, ...)."""
        return cls(
            key=data.get("key", "/"),
            value=data.get("value"),
            dir=bool(data.get("dir", False)),
            nodes=tuple(cls.from_json(n) for n in data.get("nodes") or ()),
            created_index=int(data.get("createdIndex", 0)),
            modified_index=int(data.get("modifiedIndex", 0)),
            expiration=_parse_time(data.get("expiration")),
            ttl=data.get("ttl"),
        )

    @property
    def name(self) -> str:
        """Last path component of the key."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def walk(self) -> Iterator[Node]:
        """This node and every descendant returned by the server, depth first."""
        yield self
        for child in self.nodes:
            yield from child.walk()

    def leaves(self) -> Iterator[Node]:
        """Every non-directory node under (and including) this one."""
        return (n for n in self.walk() if not n.dir)


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to a keys-API request (or one watch event).

    ``node`` is None only for the synthetic "get" that `Client.watch_iter` yields when
    it resynchronises on a key that no longer exists.
    """

    action: str
    node: Node | None
    prev_node: Node | None = None
    etcd_index: int | None = None
    raft_index: int | None = None
    raft_term: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], headers: Mapping[str, str]) -> Response:
        """Build from the JSON body and the (lower-cased) response headers."""
        node = data.get("node")
        prev = data.get("prevNode")
        return cls(
            action=data.get("action", ""),
            node=Node.from_json(node) if node is not None else None,
            prev_node=Node.from_json(prev) if prev is not None else None,
            etcd_index=_int_header(headers, "x-etcd-index"),
            raft_index=_int_header(headers, "x-raft-index"),
            raft_term=_int_header(headers, "x-raft-term"),
        )

    @property
    def value(self) -> str | None:
        """Shortcut for ``node.value``."""
        return self.node.value if self.node is not None else None


@dataclass(frozen=True, slots=True)
class Member:
    """A cluster member as listed by ``/v2/members``."""

    id: str
    name: str
    peer_urls: tuple[str, ...] = field(default=())
    client_urls: tuple[str, ...] = field(default=())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Member:
        """Build from one entry of the ``members`` list."""
        return cls(
            id=data.get("id", ""),
            name=data.get("name", ""),
            peer_urls=tuple(data.get("peerURLs") or ()),
            client_urls=tuple(data.get("clientURLs") or ()),
        )
