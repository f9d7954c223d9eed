"""Tests of grozd.store, the etcd v2 keyspace state machine."""
