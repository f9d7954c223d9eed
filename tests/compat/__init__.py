"""Scenario-by-scenario comparison of grozd's v2 API with a real etcd 3.4."""
