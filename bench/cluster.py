"""A minimal in-process cluster for benchmarks: messages delivered in memory, no I/O, no codec."""

from __future__ import annotations

import random

from grozd.raft.codec import decode_message, encode_message
from grozd.raft.core import ConfState, MemoryStorage, Raft, Role


class MemoryCluster:
    def __init__(self, size: int = 3, *, max_inflight: int = 256, codec: bool = False) -> None:
        self.codec = codec  # every message through the wire format, as between processes
        ids = list(range(1, size + 1))
        self.storages = {i: MemoryStorage() for i in ids}
        for s in self.storages.values():
            s.set_conf_state(ConfState(ids))
        self.nodes = {
            i: Raft(i, self.storages[i], random.Random(i), max_inflight=max_inflight) for i in ids
        }
        self.inbox: list = []
        self.applied = dict.fromkeys(ids, 0)
        self.nodes[1].campaign_now()
        self.settle()
        assert self.nodes[1].role == Role.LEADER

    @property
    def leader(self) -> Raft:
        return self.nodes[1]

    def settle(self) -> None:
        """Process readies and deliver messages until nothing moves."""
        nodes, storages, applied = self.nodes, self.storages, self.applied
        while True:
            moved = False
            for i, node in nodes.items():
                if node.has_ready():
                    moved = True
                    rd = node.ready()
                    st = storages[i]
                    if rd.hard_state is not None:
                        st.set_hard_state(rd.hard_state)
                    if rd.entries:
                        st.append(rd.entries)
                    self.inbox.extend(rd.messages)
                    if rd.committed_entries:
                        applied[i] += len(rd.committed_entries)
                    node.advance()
            if self.inbox:
                moved = True
                batch, self.inbox = self.inbox, []
                if self.codec:
                    batch = [decode_message(encode_message(m)) for m in batch]
                for m in batch:
                    nodes[m.to].step(m)
            if not moved:
                return
