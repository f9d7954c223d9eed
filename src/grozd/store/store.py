"""The etcd v2 keyspace as a deterministic state machine.

`Store.apply` runs one committed command (see `grozd.store.commands`) and returns its
`Event`, a list of events for ``expire``, or an `EtcdError` value: a failed
compare-and-swap is still a committed entry, and every member must reach the same
verdict. Time only enters through the commands' ``now``, so members applying the same
log hold the same tree, index, TTLs and history, and `snapshot` gives the same bytes.

Semantics follow etcd 3.4's v2 store, quirks included (a set replaces the node and so
its createdIndex; an update of a directory reports a new modifiedIndex it does not keep;
a recursive watcher on a deleted directory hears of it twice when streaming).

The store is not thread-safe: use it from the event loop that awaits its watchers.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

import msgpack

from grozd.store import commands as cmds
from grozd.store.commands import Command, CommandError, decode_command
from grozd.store.errors import (
    DIR_NOT_EMPTY,
    KEY_NOT_FOUND,
    NODE_EXIST,
    NOT_DIR,
    NOT_FILE,
    RAFT_INTERNAL,
    ROOT_READ_ONLY,
    TEST_FAILED,
    EtcdError,
)
from grozd.store.event import Event, NodeDict, node_dict
from grozd.store.gojson import clean_path
from grozd.store.watch import DEFAULT_HISTORY, DEFAULT_QUEUE, Watcher, WatcherHub

log = logging.getLogger("grozd.store")

SNAPSHOT_VERSION = 1

Result = Event | list[Event] | EtcdError

STAT_NAMES = (
    "getsSuccess",
    "getsFail",
    "setsSuccess",
    "setsFail",
    "deleteSuccess",
    "deleteFail",
    "updateSuccess",
    "updateFail",
    "createSuccess",
    "createFail",
    "compareAndSwapSuccess",
    "compareAndSwapFail",
    "compareAndDeleteSuccess",
    "compareAndDeleteFail",
    "expireCount",
)

# Counter name prefix per operation, as in /v2/stats/store.
_STAT_PREFIX = {
    cmds.SET: "sets",
    cmds.CREATE: "create",
    cmds.UPDATE: "update",
    cmds.DELETE: "delete",
    cmds.COMPARE_AND_SWAP: "compareAndSwap",
    cmds.COMPARE_AND_DELETE: "compareAndDelete",
}


class Node:
    """A key (``children`` is None) or a directory (``children`` maps names to nodes)."""

    __slots__ = (
        "path",
        "created_index",
        "modified_index",
        "expire_ns",
        "value",
        "children",
        "parent",
        "alive",
        "ttl_token",
    )

    def __init__(
        self,
        path: str,
        created_index: int,
        parent: Node | None,
        *,
        value: str = "",
        is_dir: bool = False,
        expire_ns: int = 0,
    ) -> None:
        self.path = path
        self.created_index = created_index
        self.modified_index = created_index
        self.expire_ns = expire_ns  # 0: permanent
        self.value = "" if is_dir else value  # a directory has no value, whatever was sent
        self.children: dict[str, Node] | None = {} if is_dir else None
        self.parent = parent
        self.alive = True
        self.ttl_token = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def hidden(self) -> bool:
        return self.name.startswith("_")

    def repr(self, now_ns: int, recursive: bool = False, sort: bool = False) -> NodeDict:
        """etcd's JSON form of this node (``recursive``: include the subtree)."""
        if self.children is None:
            return node_dict(
                self.path,
                value=self.value,
                expire_ns=self.expire_ns,
                now_ns=now_ns,
                modified_index=self.modified_index,
                created_index=self.created_index,
            )
        nodes = self._list(now_ns, recursive, sort) if recursive else None
        return node_dict(
            self.path,
            dir=True,
            expire_ns=self.expire_ns,
            now_ns=now_ns,
            nodes=nodes,
            modified_index=self.modified_index,
            created_index=self.created_index,
        )

    def _list(self, now_ns: int, recursive: bool, sort: bool) -> list[NodeDict]:
        assert self.children is not None
        nodes = [c.repr(now_ns, recursive, sort) for c in self.children.values() if not c.hidden]
        if sort:
            nodes.sort(key=lambda n: n.get("key", ""))
        return nodes

    def load(self, now_ns: int, recursive: bool, sort: bool) -> NodeDict:
        """The node as a get answers it: a directory lists its children (one level unless
        ``recursive``); hidden children are left out."""
        if self.children is None:
            return self.repr(now_ns)
        return node_dict(
            "" if self.path == "/" else self.path,
            dir=True,
            expire_ns=self.expire_ns,
            now_ns=now_ns,
            nodes=self._list(now_ns, recursive, sort),
            modified_index=self.modified_index,
            created_index=self.created_index,
        )


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def _compare_cause(node: Node, prev_value: str, prev_index: int) -> str | None:
    """None when the node matches; otherwise etcd's "[a != b]" explanation."""
    index_ok = prev_index == 0 or node.modified_index == prev_index
    value_ok = prev_value == "" or node.value == prev_value
    if index_ok and value_ok:
        return None
    if index_ok:
        return f"[{prev_value} != {node.value}]"
    if value_ok:
        return f"[{prev_index} != {node.modified_index}]"
    return f"[{prev_value} != {node.value}] [{prev_index} != {node.modified_index}]"


class Store:
    """The keyspace: apply commands, read, watch, snapshot and restore."""

    def __init__(
        self, history_size: int = DEFAULT_HISTORY, watcher_queue: int = DEFAULT_QUEUE
    ) -> None:
        self._history_size = history_size
        self.hub = WatcherHub(history_size, watcher_queue)
        self._reset()
        self.counters: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)

    def _reset(self) -> None:
        self.root = Node("/", 0, None, is_dir=True)
        self.index = 0  # etcd's X-Etcd-Index: one more per successful write
        self.applied_index = 0  # the log index of the last applied command
        self.now_ns = 0  # the latest command time seen: the default for reads
        # (expire_ns, path, token, node); stale entries are skipped lazily.
        self._ttl_heap: list[tuple[int, str, int, Node]] = []
        self._ttl_seq = 0
        self._ttl_live = 0

    # -- applying commands -------------------------------------------------------------

    def apply(self, index: int, command: bytes) -> Result:
        """Apply one committed command at log position ``index`` (strictly increasing).

        Returns the `Event` (a list of `Event` for expire) or an `EtcdError` value.
        """
        if index <= self.applied_index:
            raise ValueError(f"log index {index} is not after {self.applied_index}")
        self.applied_index = index
        try:
            cmd = decode_command(command)
        except CommandError as exc:
            # Every member sees the same bytes, so every member refuses them alike.
            log.warning("event=bad_command index=%d error=%s", index, exc)
            return EtcdError(RAFT_INTERNAL, str(exc), self.index)
        if cmd.now_ns > self.now_ns:
            self.now_ns = cmd.now_ns
        if cmd.op == cmds.EXPIRE:
            return self._expire(cmd.now_ns)
        handler = self._HANDLERS[cmd.op]
        try:
            result = handler(self, cmd)
        except EtcdError as exc:
            result = exc
        prefix = _STAT_PREFIX[cmd.op]
        self.counters[prefix + ("Fail" if isinstance(result, EtcdError) else "Success")] += 1
        return result

    def _expire_at(self, cmd: Command) -> int:
        return 0 if cmd.ttl is None else cmd.now_ns + cmd.ttl * 1_000_000_000

    def _set(self, cmd: Command) -> Event:
        path = clean_path(cmd.key)
        try:
            existing: Node | None = self._get_node(path)
        except EtcdError as exc:
            if exc.code != KEY_NOT_FOUND:
                raise
            if cmd.refresh:
                raise
            existing = None
        value = cmd.value
        if cmd.refresh and existing is not None:
            value = existing.value
        event = self._create(
            path, cmd.dir, value, False, True, self._expire_at(cmd), cmds.SET, cmd.now_ns
        )
        if cmd.refresh:
            event.refresh = True
            self.hub.add(event)
        else:
            self.hub.notify(event)
        return event

    def _create_cmd(self, cmd: Command) -> Event:
        event = self._create(
            clean_path(cmd.key),
            cmd.dir,
            cmd.value,
            cmd.unique,
            False,
            self._expire_at(cmd),
            cmds.CREATE,
            cmd.now_ns,
        )
        self.hub.notify(event)
        return event

    def _create(
        self,
        path: str,
        is_dir: bool,
        value: str,
        unique: bool,
        replace: bool,
        expire_ns: int,
        action: str,
        now_ns: int,
    ) -> Event:
        current, nxt = self.index, self.index + 1
        if unique:
            path = clean_path(f"{path}/{nxt:020d}")
        if path == "/":
            raise EtcdError(ROOT_READ_ONLY, "/", current)
        dir_path, _, name = path.rpartition("/")
        parent = self._ensure_dir(dir_path or "/", nxt)
        assert parent.children is not None
        prev_node: NodeDict | None = None
        existing = parent.children.get(name)
        if existing is not None:
            if not replace:
                raise EtcdError(NODE_EXIST, path, current)
            if existing.is_dir:
                raise EtcdError(NOT_FILE, path, current)
            prev_node = existing.repr(now_ns)
            self._detach(existing)
        node = Node(path, nxt, parent, value=value, is_dir=is_dir, expire_ns=expire_ns)
        parent.children[name] = node
        if expire_ns:
            self._push_ttl(node)
        self.index = nxt
        return Event(action, node.repr(now_ns), prev_node, nxt)

    def _ensure_dir(self, path: str, created_index: int) -> Node:
        """The directory at ``path``, creating missing ones (permanent) on the way."""
        node = self.root
        if path == "/":
            return node
        for name in path[1:].split("/"):
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                child = Node(_join(node.path, name), created_index, node, is_dir=True)
                node.children[name] = child
            elif not child.is_dir:
                raise EtcdError(NOT_DIR, child.path, self.index)
            node = child
        return node

    def _update(self, cmd: Command) -> Event:
        path = clean_path(cmd.key)
        if path == "/":
            raise EtcdError(ROOT_READ_ONLY, "/", self.index)
        nxt = self.index + 1
        node = self._get_node(path)
        value = cmd.value
        if node.is_dir and value:
            raise EtcdError(NOT_FILE, path, self.index)
        if cmd.refresh:
            value = node.value
        prev = node.repr(cmd.now_ns)
        if not node.is_dir:
            # etcd cannot write a directory, so its modifiedIndex stays while the event
            # reports the new index; kept for fidelity.
            node.value = value
            node.modified_index = nxt
        self._set_ttl(node, self._expire_at(cmd))
        event = Event(
            cmds.UPDATE,
            node_dict(
                path,
                value=None if node.is_dir else value,
                dir=node.is_dir,
                expire_ns=node.expire_ns,
                now_ns=cmd.now_ns,
                modified_index=nxt,
                created_index=node.created_index,
            ),
            prev,
            nxt,
            refresh=cmd.refresh,
        )
        self.index = nxt
        if cmd.refresh:
            self.hub.add(event)
        else:
            self.hub.notify(event)
        return event

    def _compare_and_swap(self, cmd: Command) -> Event:
        path = clean_path(cmd.key)
        if path == "/":
            raise EtcdError(ROOT_READ_ONLY, "/", self.index)
        node = self._get_node(path)
        if node.is_dir:
            raise EtcdError(NOT_FILE, path, self.index)
        cause = _compare_cause(node, cmd.prev_value, cmd.prev_index)
        if cause is not None:
            raise EtcdError(TEST_FAILED, cause, self.index)
        value = node.value if cmd.refresh else cmd.value
        self.index += 1
        prev = node.repr(cmd.now_ns)
        node.value = value
        node.modified_index = self.index
        self._set_ttl(node, self._expire_at(cmd))
        event = Event(
            cmds.COMPARE_AND_SWAP, node.repr(cmd.now_ns), prev, self.index, refresh=cmd.refresh
        )
        if cmd.refresh:
            self.hub.add(event)
        else:
            self.hub.notify(event)
        return event

    def _delete(self, cmd: Command) -> Event:
        path = clean_path(cmd.key)
        if path == "/":
            raise EtcdError(ROOT_READ_ONLY, "/", self.index)
        is_dir = cmd.dir or cmd.recursive
        node = self._get_node(path)
        nxt = self.index + 1
        event = Event(
            cmds.DELETE,
            node_dict(path, dir=node.is_dir, modified_index=nxt, created_index=node.created_index),
            node.repr(cmd.now_ns),
            nxt,
        )
        if node.is_dir:
            if not is_dir:
                raise EtcdError(NOT_FILE, node.path, self.index)
            if node.children and not cmd.recursive:
                raise EtcdError(DIR_NOT_EMPTY, node.path, self.index)
        self._remove(node, event)
        self.index = nxt
        self.hub.notify(event)
        return event

    def _compare_and_delete(self, cmd: Command) -> Event:
        path = clean_path(cmd.key)
        node = self._get_node(path)
        if node.is_dir:
            # etcd keeps keys under an internal "/1" that its answers strip, so for the
            # root the cause comes out empty.
            raise EtcdError(NOT_FILE, "" if path == "/" else path, self.index)
        cause = _compare_cause(node, cmd.prev_value, cmd.prev_index)
        if cause is not None:
            raise EtcdError(TEST_FAILED, cause, self.index)
        self.index += 1
        event = Event(
            cmds.COMPARE_AND_DELETE,
            node_dict(path, modified_index=self.index, created_index=node.created_index),
            node.repr(cmd.now_ns),
            self.index,
        )
        self._remove(node, event)
        self.hub.notify(event)
        return event

    def _expire(self, now_ns: int) -> list[Event]:
        events: list[Event] = []
        heap = self._ttl_heap
        while heap:
            expire_ns, _, token, node = heap[0]
            if not self._ttl_valid(expire_ns, token, node):
                heapq.heappop(heap)
                continue
            if expire_ns > now_ns:
                break
            heapq.heappop(heap)
            self.index += 1
            event = Event(
                cmds.EXPIRE,
                node_dict(
                    node.path,
                    dir=node.is_dir,
                    modified_index=self.index,
                    created_index=node.created_index,
                ),
                node.repr(now_ns),
                self.index,
            )
            self._remove(node, event)
            self.counters["expireCount"] += 1
            self.hub.notify(event)
            events.append(event)
        return events

    _HANDLERS: dict[str, Callable[[Store, Command], Event]] = {
        cmds.SET: _set,
        cmds.CREATE: _create_cmd,
        cmds.UPDATE: _update,
        cmds.COMPARE_AND_SWAP: _compare_and_swap,
        cmds.DELETE: _delete,
        cmds.COMPARE_AND_DELETE: _compare_and_delete,
    }

    # -- tree helpers ------------------------------------------------------------------

    def _get_node(self, path: str) -> Node:
        node = self.root
        if path == "/":
            return node
        for name in path[1:].split("/"):
            if node.children is None:
                raise EtcdError(NOT_DIR, node.path, self.index)
            child = node.children.get(name)
            if child is None:
                raise EtcdError(KEY_NOT_FOUND, _join(node.path, name), self.index)
            node = child
        return node

    def _detach(self, node: Node) -> None:
        """Unlink one node (a key, or a directory with its subtree) without events."""
        parent = node.parent
        if parent is not None and parent.children is not None:
            if parent.children.get(node.name) is node:
                del parent.children[node.name]
        stack = [node]
        while stack:
            current = stack.pop()
            current.alive = False
            current.parent = None  # no cycle left: freed at once, never by a collection
            if current.expire_ns:
                self._ttl_live -= 1
            if current.children:
                stack.extend(current.children.values())

    def _remove(self, node: Node, event: Event) -> None:
        """Remove ``node`` and its subtree, telling watchers on every removed path.

        Children go before their directory, as in etcd. Iterative: keys may be deep.
        """
        order: list[Node] = []
        stack = [node]
        while stack:
            current = stack.pop()
            order.append(current)
            if current.children:
                stack.extend(current.children.values())
        self._detach(node)
        hub = self.hub
        for removed in reversed(order):
            hub.notify_path(event, removed.path, True)

    # -- TTLs ----------------------------------------------------------------------------

    def _push_ttl(self, node: Node) -> None:
        self._ttl_seq += 1
        node.ttl_token = self._ttl_seq
        self._ttl_live += 1
        # Ties break on the path, which every member (and a restored one) agrees on.
        heapq.heappush(self._ttl_heap, (node.expire_ns, node.path, self._ttl_seq, node))
        # Refreshing keys leaves stale entries behind; rebuild before they dominate.
        if len(self._ttl_heap) > 64 and len(self._ttl_heap) > 4 * self._ttl_live:
            self._ttl_heap = [
                e for e in self._ttl_heap if self._ttl_valid(e[0], e[2], e[3])
            ]
            heapq.heapify(self._ttl_heap)

    def _set_ttl(self, node: Node, expire_ns: int) -> None:
        if node.expire_ns:
            self._ttl_live -= 1
        node.expire_ns = expire_ns
        node.ttl_token = 0
        if expire_ns:
            self._push_ttl(node)

    @staticmethod
    def _ttl_valid(expire_ns: int, token: int, node: Node) -> bool:
        return node.alive and node.ttl_token == token and node.expire_ns == expire_ns

    def next_expiry(self) -> float | None:
        """When the next key expires (seconds since the epoch), or None if none has a TTL.

        The leader proposes ``expire`` once this is in the past.
        """
        heap = self._ttl_heap
        while heap and not self._ttl_valid(heap[0][0], heap[0][2], heap[0][3]):
            heapq.heappop(heap)
        return heap[0][0] / 1e9 if heap else None

    def has_ttl_keys(self) -> bool:
        """True when some key or directory has a TTL."""
        return self._ttl_live > 0

    # -- reads and watches -------------------------------------------------------------

    def get(
        self, key: str, recursive: bool = False, sorted: bool = False, *, now: float | None = None
    ) -> Event:
        """Read a key or directory (raises `EtcdError`, e.g. 100 Key not found).

        ``now`` (seconds) is the time TTLs are counted from; default: the latest command's.
        """
        now_ns = self.now_ns if now is None else cmds.to_ns(now)
        try:
            node = self._get_node(clean_path(key))
        except EtcdError:
            self.counters["getsFail"] += 1
            raise
        self.counters["getsSuccess"] += 1
        return Event("get", node.load(now_ns, recursive, sorted), None, self.index)

    def watch(
        self, key: str, recursive: bool = False, wait_index: int = 0, *, stream: bool = False
    ) -> Watcher:
        """Watch ``key`` (its subtree if ``recursive``) from ``wait_index`` (0: from now).

        Raises `EtcdError` 401 when ``wait_index`` is older than the event history.
        """
        since = wait_index if wait_index > 0 else self.index + 1
        return self.hub.watch(clean_path(key), recursive, stream, since, self.index)

    @property
    def watcher_count(self) -> int:
        """Watchers currently registered."""
        return self.hub.count

    def stats(self) -> dict[str, int]:
        """Operation counters as /v2/stats/store shows them."""
        out = dict(self.counters)
        out["watchers"] = self.hub.count
        return out

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as msgpack: tree, indices and event history (not the counters
        or watchers). Same commands in the same order give the same bytes."""
        records: list[list[Any]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                records.append(
                    [
                        node.path,
                        node.created_index,
                        node.modified_index,
                        node.expire_ns,
                        None if node.is_dir else node.value,
                    ]
                )
            if node.children:
                # Reversed so the pre-order walk comes out sorted by name.
                stack.extend(node.children[n] for n in sorted(node.children, reverse=True))
        state = {
            "v": SNAPSHOT_VERSION,
            "index": self.index,
            "applied": self.applied_index,
            "now": self.now_ns,
            "nodes": records,
            "history": self.hub.history.to_wire(),
        }
        return msgpack.packb(state, use_bin_type=True, unicode_errors=cmds.UNICODE_ERRORS)

    def restore(self, data: bytes) -> None:
        """Replace the state with a `snapshot` result.

        Registered long-poll watchers are checked against the restored history (and keep
        waiting if nothing matched); streaming ones are closed, since events between the
        old and new state may be lost, and their clients watch again.
        """
        state = msgpack.unpackb(data, raw=False, unicode_errors=cmds.UNICODE_ERRORS)
        if state.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported store snapshot version {state.get('v')!r}")
        self._reset()
        self.index = state["index"]
        self.applied_index = state["applied"]
        self.now_ns = state["now"]
        by_path: dict[str, Node] = {"/": self.root}
        for path, created, modified, expire_ns, value in state["nodes"]:
            dir_path, _, name = path.rpartition("/")
            parent = by_path[dir_path or "/"]
            node = Node(
                path, created, parent, value=value or "", is_dir=value is None, expire_ns=expire_ns
            )
            node.modified_index = modified
            assert parent.children is not None
            parent.children[name] = node
            if node.is_dir:
                by_path[path] = node
            if expire_ns:
                self._push_ttl(node)
        self.hub.history = type(self.hub.history)(self._history_size)
        self.hub.history.load(state["history"])
        for watcher in self.hub.watchers():
            if watcher.stream:
                watcher.remove()
                continue
            try:
                found = self.hub.history.scan(watcher.key, watcher.recursive, watcher.since_index)
            except EtcdError:
                watcher.remove()
                continue
            if found:
                watcher._deliver(found[0])
                watcher._finish()
