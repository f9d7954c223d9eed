"""Tests of grozd.api, the etcd v2 HTTP API, on a single process (LocalBackend)."""
