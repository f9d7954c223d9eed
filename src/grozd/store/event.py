"""`Event`: the result of a keys operation, and what watchers receive."""

from __future__ import annotations

from typing import Any

from grozd.store.gojson import go_dumps, rfc3339nano, ttl_seconds

GET = "get"
SET = "set"
CREATE = "create"
UPDATE = "update"
DELETE = "delete"
COMPARE_AND_SWAP = "compareAndSwap"
COMPARE_AND_DELETE = "compareAndDelete"
EXPIRE = "expire"

# Actions whose node and prevNode are dropped by noValueOnSuccess=true.
VALUE_ACTIONS = frozenset({SET, COMPARE_AND_SWAP, CREATE, UPDATE})

NodeDict = dict[str, Any]


def node_dict(
    key: str,
    *,
    value: str | None = None,
    dir: bool = False,
    expire_ns: int = 0,
    now_ns: int = 0,
    nodes: list[NodeDict] | None = None,
    modified_index: int = 0,
    created_index: int = 0,
) -> NodeDict:
    """etcd's JSON node: fields in Go's struct order, empty ones left out (omitempty)."""
    node: NodeDict = {}
    if key:
        node["key"] = key
    if value is not None:
        node["value"] = value
    if dir:
        node["dir"] = True
    if expire_ns:
        node["expiration"] = rfc3339nano(expire_ns)
        ttl = ttl_seconds(expire_ns, now_ns)
        if ttl:
            node["ttl"] = ttl
    if nodes:
        node["nodes"] = nodes
    if modified_index:
        node["modifiedIndex"] = modified_index
    if created_index:
        node["createdIndex"] = created_index
    return node


class Event:
    """One keys-API result: ``action``, ``node``, ``prev_node`` and the store index after it.

    ``node`` and ``prev_node`` are etcd's JSON objects as dicts (``key``, ``value``,
    ``dir``, ``expiration``, ``ttl``, ``nodes``, ``modifiedIndex``, ``createdIndex``).
    ``refresh`` marks a TTL refresh, which is kept in the history but never sent to
    watchers. Events are shared between the history and every watcher: treat as frozen.
    """

    __slots__ = ("action", "node", "prev_node", "etcd_index", "refresh", "_json")

    def __init__(
        self,
        action: str,
        node: NodeDict | None,
        prev_node: NodeDict | None = None,
        etcd_index: int = 0,
        refresh: bool = False,
    ) -> None:
        self.action = action
        self.node = node
        self.prev_node = prev_node
        self.etcd_index = etcd_index
        self.refresh = refresh
        self._json: bytes | None = None

    @property
    def index(self) -> int:
        """The index the event happened at (its node's modifiedIndex)."""
        return self.node.get("modifiedIndex", 0) if self.node else 0

    @property
    def key(self) -> str:
        """The key the event is about ("/" for the root)."""
        return self.node.get("key", "/") if self.node else "/"

    @property
    def is_created(self) -> bool:
        """True when etcd answers 201 Created: a create, or a set of a new key."""
        return self.action == CREATE or (self.action == SET and self.prev_node is None)

    def to_dict(self, no_value: bool = False) -> dict[str, Any]:
        """The JSON object etcd answers with (``no_value``: noValueOnSuccess applied)."""
        out: dict[str, Any] = {"action": self.action}
        if no_value and self.action in VALUE_ACTIONS:
            return out
        if self.node is not None:
            out["node"] = self.node
        if self.prev_node is not None:
            out["prevNode"] = self.prev_node
        return out

    def to_json(self, no_value: bool = False) -> bytes:
        """The response body as etcd writes it, trailing newline included.

        Cached, since one event may go to thousands of watchers.
        """
        if no_value and self.action in VALUE_ACTIONS:
            return go_dumps(self.to_dict(True)).encode() + b"\n"
        if self._json is None:
            self._json = go_dumps(self.to_dict()).encode() + b"\n"
        return self._json

    def to_wire(self) -> list[Any]:
        """Compact form for snapshots."""
        return [self.action, self.node, self.prev_node, self.refresh]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Event:
        """Inverse of `to_wire`."""
        action, node, prev, refresh = data
        event = cls(action, node, prev, refresh=bool(refresh))
        event.etcd_index = event.index
        return event

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.action, self.node, self.prev_node, self.etcd_index, self.refresh) == (
            other.action,
            other.node,
            other.prev_node,
            other.etcd_index,
            other.refresh,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Event({self.action!r}, {self.node!r}, prev_node={self.prev_node!r}, "
            f"etcd_index={self.etcd_index})"
        )
