"""Raft: the pure core (grozd.raft.core) and, above it, the node that does the I/O."""
