"""`expiry_loop`: the leader's job of turning passed TTLs into ``expire`` commands.

Like etcd's SYNC, the leader checks every ~500 ms; it proposes only when the store says
a key is due, so an idle cluster with no TTLs writes nothing. The command carries the
leader's clock, so every member expires the same keys at the same log position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from grozd.api.backend import Backend
from grozd.store import Store, encode_command

log = logging.getLogger("grozd.api.expiry")

EXPIRY_INTERVAL = 0.5


async def expire_once(
    store: Store, backend: Backend, clock: Callable[[], float] = time.time
) -> bool:
    """Propose one ``expire`` if a key is due now; True if one was proposed."""
    due = store.next_expiry()
    if due is None:
        return False
    now = clock()
    if due > now:
        return False
    await backend.propose(encode_command("expire", now=now))
    return True


async def expiry_loop(
    store: Store,
    backend: Backend,
    clock: Callable[[], float] = time.time,
    is_leader: Callable[[], bool] = lambda: True,
    interval: float = EXPIRY_INTERVAL,
) -> None:
    """Run until cancelled: while ``is_leader()``, propose ``expire(now)`` for due keys.

    Failed proposals (no leader, timeouts) are logged and retried on the next tick.
    """
    while True:
        await asyncio.sleep(interval)
        if not is_leader():
            continue
        try:
            await expire_once(store, backend, clock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("event=expire_propose_failed error=%r", exc)
