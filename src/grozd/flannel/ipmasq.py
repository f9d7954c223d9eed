"""``--ip-masq``: masquerade traffic that leaves the overlay network, as flannel does.

The rules live in a chain of their own in the nat table, jumped to first from POSTROUTING, each
commented ``flanneld masq`` (flannel's layout), for the network ``N`` and this host's subnet ``S``:

1. ``-s N -d N -j RETURN``: pod to pod keeps its addresses;
2. ``! -s N -d S -j RETURN``: outside traffic to this host's pods keeps its source;
3. ``-s N ! -d 224.0.0.0/4 -j MASQUERADE``: pods reaching out of the overlay are masqueraded
   (multicast is left alone);
4. ``! -s N -d N -j MASQUERADE``: the host reaching remote pods takes its overlay address, so
   the answers come back through the overlay.

MASQUERADE gets ``--random-fully`` where iptables supports it. `IpMasq.remove` deletes the jump
and the chain, which the daemon does on exit. iptables runs in the daemon's network namespace
(``ip netns exec``) when it programs one.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

CHAIN = "FLANNEL-POSTRTG"
COMMENT = ("-m", "comment", "--comment", "flanneld masq")


class IpMasqError(Exception):
    """iptables is missing or refused a rule."""


def masq_rules(network: IPv4Network, subnet: IPv4Network) -> list[list[str]]:
    """The chain's rules (iptables arguments after ``-A <chain>``), in order."""
    n, s = str(network), str(subnet)
    return [
        ["-s", n, "-d", n, *COMMENT, "-j", "RETURN"],
        ["!", "-s", n, "-d", s, *COMMENT, "-j", "RETURN"],
        ["-s", n, "!", "-d", "224.0.0.0/4", *COMMENT, "-j", "MASQUERADE"],
        ["!", "-s", n, "-d", n, *COMMENT, "-j", "MASQUERADE"],
    ]


class IpMasq:
    """flannel's masquerading rules in namespace ``netns`` (None: this process's)."""

    def __init__(self, netns: str | None = None, iptables: str = "iptables") -> None:
        self.netns = netns
        self.iptables = iptables

    async def _run(self, *args: str, check: bool = True) -> tuple[int, str]:
        exe = shutil.which(self.iptables)
        if exe is None:
            raise IpMasqError(f"--ip-masq needs {self.iptables}, which is not installed")
        argv = [exe, "-w", "5", "-t", "nat", *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        text = err.decode(errors="replace").strip()
        if check and proc.returncode != 0:
            raise IpMasqError(f"iptables -t nat {' '.join(args)}: {text}")
        return proc.returncode or 0, text

    async def install(self, network: IPv4Network, subnet: IPv4Network) -> None:
        """Create (or refill) the chain and jump to it first from POSTROUTING (idempotent)."""
        code, _ = await self._run("-N", CHAIN, check=False)
        if code != 0:
            await self._run("-F", CHAIN)  # it was there: refill it from scratch
        random_fully = True
        for rule in masq_rules(network, subnet):
            if rule[-1] == "MASQUERADE" and random_fully:
                code, err = await self._run("-A", CHAIN, *rule, "--random-fully", check=False)
                if code == 0:
                    continue
                # An iptables or kernel without it: plain MASQUERADE still does the job.
                log.warning("MASQUERADE --random-fully refused (%s); using plain MASQUERADE", err)
                random_fully = False
            await self._run("-A", CHAIN, *rule)
        jump = ("POSTROUTING", *COMMENT, "-j", CHAIN)
        code, _ = await self._run("-C", *jump, check=False)
        if code != 0:
            await self._run("-I", jump[0], "1", *jump[1:])
        log.info("masquerading traffic from %s leaving the overlay (chain %s)", network, CHAIN)

    async def remove(self) -> None:
        """Delete the jump(s) and the chain; missing ones are fine."""
        jump = ("POSTROUTING", *COMMENT, "-j", CHAIN)
        for _ in range(16):  # one per earlier install that was not cleaned up
            code, _ = await self._run("-D", *jump, check=False)
            if code != 0:
                break
        code, _ = await self._run("-F", CHAIN, check=False)
        if code == 0:
            await self._run("-X", CHAIN, check=False)
            log.info("masquerading rules removed")


__all__ = ["CHAIN", "IpMasq", "IpMasqError", "masq_rules"]
