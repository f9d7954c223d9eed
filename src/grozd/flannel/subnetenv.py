"""``/run/flannel/subnet.env``: what the host's lease means for docker and CNI.

flannel writes it as shell assignments, which docker's systemd drop-ins read::

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.34.1/24
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false

and reads FLANNEL_SUBNET back after a restart to take the same subnet again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

DEFAULT_SUBNET_FILE = Path("/run/flannel/subnet.env")

log = logging.getLogger(__name__)


class SubnetEnvError(ValueError):
    """subnet.env exists but cannot be understood."""


@dataclass(frozen=True, slots=True)
class SubnetEnv:
    """The four values of subnet.env.

    ``subnet`` is the host's first address with the subnet's length (``10.5.34.1/24``),
    the address docker gives its bridge.
    """

    network: IPv4Network
    subnet: IPv4Interface
    mtu: int
    ipmasq: bool

    @classmethod
    def for_lease(
        cls, network: IPv4Network, lease_subnet: IPv4Network, mtu: int, ipmasq: bool
    ) -> SubnetEnv:
        """The values flannel writes for a lease of ``lease_subnet``."""
        first = IPv4Interface((int(lease_subnet.network_address) + 1, lease_subnet.prefixlen))
        return cls(network, first, mtu, ipmasq)

    @property
    def lease_subnet(self) -> IPv4Network:
        """The leased subnet itself (``10.5.34.0/24``)."""
        return self.subnet.network

    def render(self) -> str:
        """The file's text."""
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.subnet}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def write_subnet_env(path: str | os.PathLike[str], env: SubnetEnv) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            # Durable before the rename, or a crash could leave an empty file in its place.
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_subnet_env(path: str | os.PathLike[str]) -> SubnetEnv | None:
    """Read subnet.env; None when there is none. Malformed content raises `SubnetEnvError`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"{path}:{number}: not a KEY=VALUE line: {raw!r}")
        values[key.strip()] = value.strip().strip("'\"")
    try:
        network = IPv4Network(values["FLANNEL_NETWORK"], strict=False)
        subnet = IPv4Interface(values["FLANNEL_SUBNET"])
        mtu = int(values.get("FLANNEL_MTU", "0"))
        ipmasq = values.get("FLANNEL_IPMASQ", "false").lower() == "true"
    except KeyError as exc:
        raise SubnetEnvError(f"{path}: no {exc.args[0]}") from None
    except ValueError as exc:
        raise SubnetEnvError(f"{path}: {exc}") from None
    return SubnetEnv(network, subnet, mtu, ipmasq)


def previous_subnet(path: str | os.PathLike[str]) -> IPv4Network | None:
    """The subnet recorded by a previous run, if its file is there and readable."""
    try:
        env = read_subnet_env(path)
    except (SubnetEnvError, OSError) as exc:
        # A damaged file only costs the host its old subnet, not its start.
        log.warning("ignoring previous subnet file: %s", exc)
        return None
    return env.lease_subnet if env is not None else None
