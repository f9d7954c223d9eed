"""Tests of grozd.client, the etcd v2 HTTP client, mostly against a real etcd."""
