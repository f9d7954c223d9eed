"""grozd: a small-cluster stack (Raft store with the etcd v2 API, fleet, flannel, locksmith)."""

__version__ = "0.1.0"
