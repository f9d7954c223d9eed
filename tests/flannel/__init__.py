"""Tests of grozd.flannel: config, leases in a real etcd, subnet.env, backends, daemon."""
