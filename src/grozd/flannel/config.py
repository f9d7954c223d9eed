"""The flannel network config: ``<prefix>/config`` in the store, as JSON.

Example (the keys and defaults are flannel's)::

    {"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}

Key names match case-insensitively, as Go's ``encoding/json`` matches them for flannel;
a key that matches nothing is an error naming the closest valid key.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any

DEFAULT_PREFIX = "/coreos.com/network"

#: backend type -> the Backend keys it takes (besides Type) and its default port.
BACKEND_KEYS: dict[str, tuple[str, ...]] = {
    "vxlan": ("VNI", "Port", "DirectRouting"),
    "udp": ("Port",),
    "host-gw": (),
    "uvxlan": ("VNI", "Port"),
}
DEFAULT_PORTS: dict[str, int] = {"vxlan": 8472, "udp": 8285, "uvxlan": 8472}
DEFAULT_BACKEND = "vxlan"
DEFAULT_VNI = 1
MAX_VNI = (1 << 24) - 1

TOP_KEYS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend")

# flannel: each host needs room for a tunnel and a bridge address, so /30 at most; a
# network with no SubnetLen must be /28 or larger to hold four /30s (the first is skipped).
MAX_SUBNET_LEN = 30
MIN_USEFUL_PREFIX = 28


class ConfigError(ValueError):
    """The network config is not valid JSON or breaks one of flannel's rules."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """The ``Backend`` object: its type and that type's options.

    ``port`` is None for host-gw, which encapsulates nothing.
    """

    type: str = DEFAULT_BACKEND
    vni: int = DEFAULT_VNI
    port: int | None = DEFAULT_PORTS[DEFAULT_BACKEND]
    direct_routing: bool = False


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A validated network config with flannel's defaults filled in."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig

    @property
    def subnet_count(self) -> int:
        """How many subnets lie in [SubnetMin, SubnetMax]."""
        return ((int(self.subnet_max) - int(self.subnet_min)) >> (32 - self.subnet_len)) + 1

    def subnet_at(self, i: int) -> IPv4Network:
        """The i-th subnet of the range (0 is SubnetMin)."""
        if not 0 <= i < self.subnet_count:
            raise IndexError(i)
        base = int(self.subnet_min) + (i << (32 - self.subnet_len))
        return IPv4Network((base, self.subnet_len))

    def subnet_index(self, subnet: IPv4Network) -> int:
        """Position of an aligned subnet of the range (inverse of `subnet_at`)."""
        return (int(subnet.network_address) - int(self.subnet_min)) >> (32 - self.subnet_len)

    def is_compatible(self, subnet: IPv4Network) -> bool:
        """Whether a lease for ``subnet`` fits this config (flannel's isSubnetConfigCompat)."""
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate the JSON stored at ``<prefix>/config``."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"network config is not valid JSON: {exc}") from None
    return config_from_dict(data)


def config_from_dict(data: Any) -> NetworkConfig:
    """Validate an already decoded config object and fill in flannel's defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"network config must be a JSON object, not {_json_type(data)}")
    top = _canonical_keys(data, TOP_KEYS, "network config")

    if "Network" not in top:
        raise ConfigError('network config has no "Network" (an IPv4 CIDR such as "10.5.0.0/16")')
    network = _cidr(top["Network"])

    raw_len = top.get("SubnetLen")
    if raw_len is not None and (not _is_int(raw_len) or raw_len < 0):
        raise ConfigError(f"SubnetLen must be a positive integer, not {raw_len!r}")
    # 0 (Go's zero value) and null both mean "not set", as in flannel.
    subnet_len: int | None = raw_len or None
    if subnet_len is not None:
        if subnet_len <= network.prefixlen:
            raise ConfigError(
                f"SubnetLen {subnet_len} must be larger than the Network prefix length"
                f" (/{network.prefixlen})"
            )
        if subnet_len > MAX_SUBNET_LEN:
            raise ConfigError(
                f"SubnetLen {subnet_len} leaves no room for host addresses; at most"
                f" {MAX_SUBNET_LEN}"
            )
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"Network {network} holds only 2 subnets of /{subnet_len}; it must hold at"
                f" least four (SubnetLen {network.prefixlen + 2} or more)"
            )
    elif network.prefixlen > MIN_USEFUL_PREFIX:
        raise ConfigError(
            f"Network {network} is too small; the minimum useful network prefix is"
            f" /{MIN_USEFUL_PREFIX}"
        )
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        # Too small to give each host a /24: split it in four, as flannel does.
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    # The first subnet is skipped by default: its .0 address is the Network's own address.
    subnet_min = _bound(top, "SubnetMin", network, subnet_len, int(network.network_address) + size)
    subnet_max = _bound(
        top, "SubnetMax", network, subnet_len, int(network.broadcast_address) + 1 - size
    )
    if subnet_min > subnet_max:
        raise ConfigError(f"SubnetMin {subnet_min} is above SubnetMax {subnet_max}")

    backend = _backend(top.get("Backend"))
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend)


def _bound(
    top: Mapping[str, Any], name: str, network: IPv4Network, subnet_len: int, default: int
) -> IPv4Address:
    value = top.get(name)
    if value is None or value == "":
        return IPv4Address(default)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an IPv4 address string, not {_json_type(value)}")
    try:
        addr = IPv4Address(value)
    except AddressValueError:
        raise ConfigError(f"{name} {value!r} is not an IPv4 address") from None
    if addr not in network:
        raise ConfigError(f"{name} {addr} is not in Network {network}")
    if int(addr) & ((1 << (32 - subnet_len)) - 1):
        raise ConfigError(f"{name} {addr} is not on a /{subnet_len} (SubnetLen) boundary")
    return addr


def _cidr(value: Any) -> IPv4Network:
    if not isinstance(value, str):
        raise ConfigError(f"Network must be an IPv4 CIDR string, not {_json_type(value)}")
    if "/" not in value:
        raise ConfigError(f"Network {value!r} is not an IPv4 CIDR (no prefix length)")
    try:
        # Host bits are dropped, as Go's net.ParseCIDR drops them for flannel.
        return IPv4Network(value, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise ConfigError(f"Network {value!r} is not an IPv4 CIDR") from None


def _backend(value: Any) -> BackendConfig:
    if value is None:
        return BackendConfig()
    if not isinstance(value, dict):
        raise ConfigError(f"Backend must be a JSON object, not {_json_type(value)}")
    btype = _canonical_keys(value, ("Type",), "Backend", lenient=True).get("Type", DEFAULT_BACKEND)
    if not isinstance(btype, str):
        raise ConfigError(f"Backend Type must be a string, not {_json_type(btype)}")
    if btype not in BACKEND_KEYS:
        known = ", ".join(BACKEND_KEYS)
        raise ConfigError(
            f"unknown backend type {btype!r}{_hint(btype, tuple(BACKEND_KEYS))} (known: {known})"
        )
    valid = ("Type", *BACKEND_KEYS[btype])
    for key in value:
        # A key of another backend type gets its own message: "did you mean" would mislead.
        if key.casefold() not in {v.casefold() for v in valid} and any(
            key.casefold() == k.casefold() for keys in BACKEND_KEYS.values() for k in keys
        ):
            raise ConfigError(f"Backend option {key!r} does not apply to the {btype} backend")
    opts = _canonical_keys(value, valid, f"Backend ({btype})")

    vni = opts.get("VNI", DEFAULT_VNI)
    if not _is_int(vni) or not 0 <= vni <= MAX_VNI:
        raise ConfigError(f"Backend VNI must be an integer from 0 to {MAX_VNI}, not {vni!r}")
    port = opts.get("Port", 0)
    if not _is_int(port) or not 0 <= port <= 65535:
        raise ConfigError(f"Backend Port must be an integer from 0 to 65535, not {port!r}")
    direct = opts.get("DirectRouting", False)
    if not isinstance(direct, bool):
        raise ConfigError(f"Backend DirectRouting must be true or false, not {direct!r}")
    default_port = DEFAULT_PORTS.get(btype)
    # Port 0 is flannel's "not set": the kernel's (vxlan) or flannel's (udp) default port.
    return BackendConfig(
        type=btype,
        vni=vni,
        port=(port or default_port) if default_port is not None else None,
        direct_routing=direct,
    )


def _canonical_keys(
    data: Mapping[str, Any], valid: tuple[str, ...], where: str, *, lenient: bool = False
) -> dict[str, Any]:
    """Map keys to their canonical spelling; unknown keys are errors unless ``lenient``."""
    by_fold = {k.casefold(): k for k in valid}
    out: dict[str, Any] = {}
    for key, value in data.items():
        canonical = by_fold.get(key.casefold())
        if canonical is None:
            if lenient:
                continue
            hint = _hint(key, valid) or f" (valid: {', '.join(valid)})"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")
        if canonical in out:
            raise ConfigError(f"{where} sets {canonical!r} twice")
        out[canonical] = value
    return out


def _hint(word: str, valid: tuple[str, ...]) -> str:
    """'; did you mean X?' for the closest valid name, or '' when nothing is close."""
    by_fold = {n.casefold(): n for n in valid}
    close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1, cutoff=0.5)
    return f"; did you mean {by_fold[close[0]]!r}?" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
