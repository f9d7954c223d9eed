"""flannel's control plane: network config, subnet leases, subnet.env, backends, daemon.

The store is reached only through `grozd.client`; the kernel through `Netlink`
(pyroute2 in a thread of its own). Run the daemon with ``grozd flanneld``.
"""

from grozd.flannel.config import (
    DEFAULT_PREFIX,
    BackendConfig,
    ConfigError,
    NetworkConfig,
    config_from_dict,
    parse_config,
)
from grozd.flannel.leases import (
    EventType,
    Lease,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseLostError,
    LeaseManager,
    parse_subnet_key,
    subnet_key_name,
)
from grozd.flannel.subnetenv import (
    DEFAULT_SUBNET_FILE,
    SubnetEnv,
    SubnetEnvError,
    previous_subnet,
    read_subnet_env,
    write_subnet_env,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET_FILE",
    "BackendConfig",
    "ConfigError",
    "EventType",
    "Lease",
    "LeaseAttrs",
    "LeaseError",
    "LeaseEvent",
    "LeaseLostError",
    "LeaseManager",
    "NetworkConfig",
    "SubnetEnv",
    "SubnetEnvError",
    "config_from_dict",
    "parse_config",
    "parse_subnet_key",
    "previous_subnet",
    "read_subnet_env",
    "subnet_key_name",
    "write_subnet_env",
]
