"""The network config: flannel's defaults, and a clear error for each mistake."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from grozd.flannel.config import BackendConfig, ConfigError, config_from_dict, parse_config


def cfg(**data: object):
    return config_from_dict(data)


def test_defaults_for_a_slash_16():
    c = parse_config('{"Network": "10.5.0.0/16"}')
    assert c.network == IPv4Network("10.5.0.0/16")
    assert c.subnet_len == 24
    # The first subnet is skipped: 10.5.0.0 is the network's own address.
    assert c.subnet_min == IPv4Address("10.5.1.0")
    assert c.subnet_max == IPv4Address("10.5.255.0")
    assert c.subnet_count == 255
    assert c.backend == BackendConfig(type="vxlan", vni=1, port=8472, direct_routing=False)


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ("10.5.0.0/22", 24, "10.5.1.0", "10.5.3.0"),
        # Smaller than /22: four subnets, two bits longer than the network.
        ("10.5.0.0/23", 25, "10.5.0.128", "10.5.1.128"),
        ("10.5.0.0/26", 28, "10.5.0.16", "10.5.0.48"),
        ("10.5.0.0/28", 30, "10.5.0.4", "10.5.0.12"),
    ],
)
def test_default_subnet_len_follows_flannel(network, subnet_len, smin, smax):
    c = cfg(Network=network)
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (subnet_len, smin, smax)


def test_explicit_range_and_helpers():
    c = cfg(Network="10.5.0.0/16", SubnetLen=26, SubnetMin="10.5.4.0", SubnetMax="10.5.5.192")
    assert c.subnet_count == 8
    assert c.subnet_at(0) == IPv4Network("10.5.4.0/26")
    assert c.subnet_at(7) == IPv4Network("10.5.5.192/26")
    assert c.subnet_index(IPv4Network("10.5.5.64/26")) == 5
    assert c.is_compatible(IPv4Network("10.5.4.64/26"))
    assert not c.is_compatible(IPv4Network("10.5.4.0/24"))  # wrong length
    assert not c.is_compatible(IPv4Network("10.5.6.0/26"))  # past SubnetMax
    with pytest.raises(IndexError):
        c.subnet_at(8)


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"Type": "vxlan", "VNI": 42, "Port": 4789, "DirectRouting": True},
         BackendConfig("vxlan", 42, 4789, True)),
        ({"Type": "vxlan", "Port": 0}, BackendConfig("vxlan", 1, 8472, False)),
        ({}, BackendConfig("vxlan", 1, 8472, False)),
        ({"Type": "udp"}, BackendConfig("udp", 1, 8285, False)),
        ({"Type": "udp", "Port": 7000}, BackendConfig("udp", 1, 7000, False)),
        ({"Type": "host-gw"}, BackendConfig("host-gw", 1, None, False)),
        ({"Type": "uvxlan", "VNI": 7}, BackendConfig("uvxlan", 7, 8472, False)),
    ],
)
def test_backends(backend, expected):
    assert cfg(Network="10.5.0.0/16", Backend=backend).backend == expected


def test_keys_match_case_insensitively_like_go():
    c = parse_config('{"network": "10.5.0.0/16", "SUBNETLEN": 26, "backend": {"type": "host-gw"}}')
    assert (c.subnet_len, c.backend.type) == (26, "host-gw")


def test_host_bits_are_dropped_like_go():
    assert cfg(Network="10.5.3.7/16").network == IPv4Network("10.5.0.0/16")


def test_zero_and_null_mean_unset_like_go():
    assert cfg(Network="10.5.0.0/16", SubnetLen=0, SubnetMin=None).subnet_len == 24


ERRORS = [
    ("{", "network config is not valid JSON: Expecting property name enclosed in double"
          " quotes: line 1 column 2 (char 1)"),
    ("[1]", "network config must be a JSON object, not an array"),
    ("{}", 'network config has no "Network" (an IPv4 CIDR such as "10.5.0.0/16")'),
    ({"Network": 5}, "Network must be an IPv4 CIDR string, not a number"),
    ({"Network": "10.5.0.0"}, "Network '10.5.0.0' is not an IPv4 CIDR (no prefix length)"),
    ({"Network": "10.5.0.0/33"}, "Network '10.5.0.0/33' is not an IPv4 CIDR"),
    ({"Network": "fd00::/64"}, "Network 'fd00::/64' is not an IPv4 CIDR"),
    ({"Netwrk": "10.5.0.0/16"}, "unknown key 'Netwrk' in network config; did you mean"
                                " 'Network'?"),
    ({"Network": "10.5.0.0/16", "SubnetLenght": 24},
     "unknown key 'SubnetLenght' in network config; did you mean 'SubnetLen'?"),
    ({"Network": "10.5.0.0/16", "Colour": "blue"},
     "unknown key 'Colour' in network config (valid: Network, SubnetLen, SubnetMin,"
     " SubnetMax, Backend)"),
    ({"Network": "10.5.0.0/16", "network": "10.6.0.0/16"}, "network config sets 'Network' twice"),
    ({"Network": "10.5.0.0/16", "SubnetLen": "24"},
     "SubnetLen must be a positive integer, not '24'"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 24.5},
     "SubnetLen must be a positive integer, not 24.5"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 16},
     "SubnetLen 16 must be larger than the Network prefix length (/16)"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 12},
     "SubnetLen 12 must be larger than the Network prefix length (/16)"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 17},
     "Network 10.5.0.0/16 holds only 2 subnets of /17; it must hold at least four"
     " (SubnetLen 18 or more)"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 31},
     "SubnetLen 31 leaves no room for host addresses; at most 30"),
    ({"Network": "10.5.0.0/29"},
     "Network 10.5.0.0/29 is too small; the minimum useful network prefix is /28"),
    ({"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"},
     "SubnetMin 10.6.0.0 is not in Network 10.5.0.0/16"),
    ({"Network": "10.5.0.0/16", "SubnetMax": "10.4.255.0"},
     "SubnetMax 10.4.255.0 is not in Network 10.5.0.0/16"),
    ({"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.3.0"},
     "SubnetMin 10.5.9.0 is above SubnetMax 10.5.3.0"),
    ({"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.7"},
     "SubnetMin 10.5.1.7 is not on a /24 (SubnetLen) boundary"),
    ({"Network": "10.5.0.0/16", "SubnetMax": "bogus"}, "SubnetMax 'bogus' is not an IPv4 address"),
    ({"Network": "10.5.0.0/16", "Backend": "vxlan"}, "Backend must be a JSON object, not a string"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlna"}},
     "unknown backend type 'vxlna'; did you mean 'vxlan'? (known: vxlan, udp, host-gw, uvxlan)"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "geneve"}},
     "unknown backend type 'geneve' (known: vxlan, udp, host-gw, uvxlan)"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "VIN": 2}},
     "unknown key 'VIN' in Backend (vxlan); did you mean 'VNI'?"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw", "Port": 1}},
     "Backend option 'Port' does not apply to the host-gw backend"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "VNI": 1}},
     "Backend option 'VNI' does not apply to the udp backend"),
    ({"Network": "10.5.0.0/16", "Backend": {"VNI": 1 << 24}},
     "Backend VNI must be an integer from 0 to 16777215, not 16777216"),
    ({"Network": "10.5.0.0/16", "Backend": {"Port": 70000}},
     "Backend Port must be an integer from 0 to 65535, not 70000"),
    ({"Network": "10.5.0.0/16", "Backend": {"DirectRouting": "yes"}},
     "Backend DirectRouting must be true or false, not 'yes'"),
]


@pytest.mark.parametrize(("config", "message"), ERRORS)
def test_errors_say_exactly_what_is_wrong(config, message):
    text = config if isinstance(config, str) else json.dumps(config)
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert str(exc.value) == message
