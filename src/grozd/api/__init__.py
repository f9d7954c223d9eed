"""The etcd v2 HTTP API over a `grozd.store.Store` and a `Backend`.

    store = Store()
    app = make_app(store, LocalBackend(store), ApiConfig())
    await app.start("127.0.0.1", 2379)
    expiry = asyncio.create_task(expiry_loop(store, backend))

The Raft member provides its own `Backend`; `LocalBackend` runs one process alone.
"""

from grozd.api.app import ApiServer, make_app
from grozd.api.backend import (
    Backend,
    BackendError,
    LocalBackend,
    MemberError,
    MemberExists,
    MemberNotFound,
    MemberRemoved,
    NoLeader,
    ProposalTimeout,
)
from grozd.api.expiry import expire_once, expiry_loop
from grozd.http.config import ApiConfig

__all__ = [
    "ApiConfig",
    "ApiServer",
    "Backend",
    "BackendError",
    "LocalBackend",
    "MemberError",
    "MemberExists",
    "MemberNotFound",
    "MemberRemoved",
    "NoLeader",
    "ProposalTimeout",
    "expire_once",
    "expiry_loop",
    "make_app",
]
