"""subnet.env: written atomically in flannel's format, read back after a restart."""

from __future__ import annotations

import os
from ipaddress import IPv4Interface, IPv4Network

import pytest

from grozd.flannel.subnetenv import (
    SubnetEnv,
    SubnetEnvError,
    previous_subnet,
    read_subnet_env,
    write_subnet_env,
)

ENV = SubnetEnv.for_lease(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.34.0/24"), 1450, True)


def test_for_lease_uses_the_first_address():
    assert ENV.subnet == IPv4Interface("10.5.34.1/24")
    assert ENV.lease_subnet == IPv4Network("10.5.34.0/24")


def test_round_trip_in_flannels_format(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"  # missing directories are created
    write_subnet_env(path, ENV)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.34.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert read_subnet_env(path) == ENV
    assert previous_subnet(path) == IPv4Network("10.5.34.0/24")


def test_rewrite_is_atomic(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, ENV)
    with open(path) as reader:  # a reader of the old file keeps reading the old file
        other = SubnetEnv.for_lease(ENV.network, IPv4Network("10.5.7.0/24"), 1500, False)
        write_subnet_env(path, other)
        assert "10.5.34.1/24" in reader.read()
    assert read_subnet_env(path) == other
    assert os.listdir(tmp_path) == ["subnet.env"]  # no temporary file left behind


def test_missing_file_reads_as_none(tmp_path):
    assert read_subnet_env(tmp_path / "nope") is None
    assert previous_subnet(tmp_path / "nope") is None


def test_reads_shell_quoting_and_comments(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text('# written by hand\nFLANNEL_NETWORK="10.5.0.0/16"\n\n'
                    "FLANNEL_SUBNET='10.5.9.1/24'\nFLANNEL_MTU=1400\n")
    env = read_subnet_env(path)
    assert env == SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Interface("10.5.9.1/24"), 1400, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FLANNEL_NETWORK=10.5.0.0/16\n", "{path}: no FLANNEL_SUBNET"),
        ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=banana\n",
         "{path}: Expected 4 octets in 'banana'"),
        ("this is not an env file\n", "{path}:1: not a KEY=VALUE line: 'this is not an env file'"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "subnet.env"
    path.write_text(text)
    with pytest.raises(SubnetEnvError) as exc:
        read_subnet_env(path)
    assert str(exc.value) == message.format(path=path)
    # A damaged file costs the host its old subnet, not its start.
    assert previous_subnet(path) is None
