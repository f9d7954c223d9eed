"""fleet's state in the etcd v2 store, all under one prefix (default ``/_grozd/fleet/``).

Key layout (``<p>`` is the prefix)::

    <p>/unit/<sha1>                  unit file text, named by the SHA-1 of its bytes; immutable
    <p>/job/<name>/object            {"Name": name, "UnitHash": sha1}: a submitted unit
    <p>/job/<name>/target-state      desired state: "inactive" | "loaded" | "launched"
    <p>/job/<name>/target            machine ID the engine placed the unit on (absent: unplaced)
    <p>/job/<name>/reason            why the engine could not place a wanted unit
    <p>/machines/<id>/object         {"ID", "PublicIP", "Metadata", "Version", "Endpoint"};
                                     TTL, refreshed by the machine's agent (presence)
    <p>/state/<name>/<machine-id>    {"Name", "MachineID", "UnitHash", "LoadState",
                                     "ActiveState", "SubState", "AgentState"}: reported by the
                                     agent of that machine
    <p>/engine/leader                "<machine-id> <token>" of the active engine; TTL lease

Who writes what: fleetctl and the API write ``unit/``, ``job/<name>/object`` and
``target-state`` (and delete ``job/<name>`` on destroy); only the engine holding the lease
writes ``target`` and ``reason``; each agent writes its own ``machines/<id>`` and
``state/*/<id>``. Global units (``Global=true``) never get a ``target``: every agent whose
metadata matches runs them.

The *current* state of a unit (as fleetctl shows it) is derived, not stored: ``inactive``
unless the unit is placed on a machine that is present and whose agent reports it, then
whatever that agent reports having done (``loaded`` or ``launched``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

from grozd.client import (
    Client,
    EtcdError,
    KeyNotFoundError,
    Node,
    NodeExistError,
    NotFileError,
    TestFailedError,
)
from grozd.fleet.unit import UnitName, content_hash

DEFAULT_PREFIX = "/_grozd/fleet/"
VERSION = "0.1.0"

INACTIVE = "inactive"
LOADED = "loaded"
LAUNCHED = "launched"
JOB_STATES = (INACTIVE, LOADED, LAUNCHED)


class RegistryError(Exception):
    """A registry operation that cannot be done as asked."""


class UnitExistsError(RegistryError):
    """A unit of that name has already been submitted."""


class NoSuchUnitError(RegistryError):
    """No unit of that name has been submitted."""


def short_id(machine_id: str) -> str:
    """The 8-character form fleetctl shows without ``--full``."""
    return machine_id[:8]


@dataclass(frozen=True)
class MachineState:
    """A machine as its agent announces it."""

    id: str
    public_ip: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: str = VERSION
    # Where this machine's fleetd API answers (status and journal of its units).
    endpoint: str = ""

    def to_json(self) -> str:
        """The stored JSON (fleet's field names)."""
        return json.dumps(
            {
                "ID": self.id,
                "PublicIP": self.public_ip,
                "Metadata": dict(self.metadata),
                "Version": self.version,
                "Endpoint": self.endpoint,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> MachineState:
        """Parse the stored JSON; raises ValueError if it is not a machine object."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("ID"), str):
            raise ValueError("not a machine object")
        meta = data.get("Metadata") or {}
        return cls(
            id=data["ID"],
            public_ip=str(data.get("PublicIP") or ""),
            metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
            version=str(data.get("Version") or ""),
            endpoint=str(data.get("Endpoint") or ""),
        )

    @property
    def short_id(self) -> str:
        """First 8 characters of the ID."""
        return short_id(self.id)


@dataclass
class JobRecord:
    """A submitted unit as the registry holds it."""

    name: str
    hash: str | None = None
    desired_state: str = INACTIVE
    target: str | None = None
    reason: str | None = None

    @property
    def submitted(self) -> bool:
        """True once the unit's object key exists (a bare directory is debris)."""
        return self.hash is not None


@dataclass(frozen=True)
class UnitStateRecord:
    """What an agent reports about one unit on its machine."""

    name: str
    machine_id: str
    unit_hash: str = ""
    load_state: str = ""
    active_state: str = ""
    sub_state: str = ""
    # What the agent has done with the unit: "loaded" or "launched".
    agent_state: str = LOADED

    def to_json(self) -> str:
        """The stored JSON."""
        return json.dumps(
            {
                "Name": self.name,
                "MachineID": self.machine_id,
                "UnitHash": self.unit_hash,
                "LoadState": self.load_state,
                "ActiveState": self.active_state,
                "SubState": self.sub_state,
                "AgentState": self.agent_state,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> UnitStateRecord:
        """Parse the stored JSON; raises ValueError if malformed."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("Name"), str):
            raise ValueError("not a unit state object")
        return cls(
            name=data["Name"],
            machine_id=str(data.get("MachineID") or ""),
            unit_hash=str(data.get("UnitHash") or ""),
            load_state=str(data.get("LoadState") or ""),
            active_state=str(data.get("ActiveState") or ""),
            sub_state=str(data.get("SubState") or ""),
            agent_state=str(data.get("AgentState") or LOADED),
        )


def check_unit_name(name: str) -> UnitName:
    """The parsed name; ValueError unless fleet could store a unit under it."""
    unit = UnitName.parse(name)
    return unit


def current_state(
    job: JobRecord,
    states: Mapping[tuple[str, str], UnitStateRecord],
    machines: Mapping[str, MachineState],
) -> str:
    """The derived current state of a non-global unit (see the module docstring).

    A unit the agent has been told to stop counts as launched until it has stopped, so
    ``fleetctl stop`` returns once the unit is really down.
    """
    if job.target is None or job.target not in machines:
        return INACTIVE
    st = states.get((job.name, job.target))
    if st is None:
        return INACTIVE
    if st.agent_state == LAUNCHED:
        return LAUNCHED
    if st.active_state in ("active", "activating", "deactivating", "reloading"):
        return LAUNCHED
    return LOADED


def parse_jobs(root: Node | None, base: str) -> dict[str, JobRecord]:
    """The jobs under a ``job/`` directory node (``base`` is that directory's key)."""
    jobs: dict[str, JobRecord] = {}
    if root is None:
        return jobs
    for leaf in root.leaves():
        parts = posixpath.relpath(leaf.key, base).split("/")
        if len(parts) != 2:
            continue
        apply_job_leaf(jobs, parts[0], parts[1], leaf.value)
    # A directory with only target/reason left is debris of a destroy race: keep it so the
    # engine can clean it, but mark it unsubmitted (hash None).
    for child in root.nodes:
        if child.dir:
            jobs.setdefault(child.name, JobRecord(child.name))
    return jobs


def apply_job_leaf(jobs: dict[str, JobRecord], name: str, leaf: str, value: str | None) -> None:
    """Set (``value`` given) or clear (None) one leaf of a job."""
    job = jobs.get(name)
    if job is None:
        if value is None:
            return
        job = jobs[name] = JobRecord(name)
    if leaf == "object":
        job.hash = _object_hash(value) if value is not None else None
    elif leaf == "target-state":
        job.desired_state = value if value in JOB_STATES else INACTIVE
    elif leaf == "target":
        job.target = value or None
    elif leaf == "reason":
        job.reason = value or None


def _object_hash(value: str) -> str | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    h = data.get("UnitHash") if isinstance(data, dict) else None
    return h if isinstance(h, str) and h else None


def parse_machines(root: Node | None, base: str) -> dict[str, MachineState]:
    """Machines under a ``machines/`` directory node; malformed entries are skipped."""
    machines: dict[str, MachineState] = {}
    if root is None:
        return machines
    for leaf in root.leaves():
        parts = posixpath.relpath(leaf.key, base).split("/")
        if len(parts) == 2 and parts[1] == "object" and leaf.value is not None:
            try:
                m = MachineState.from_json(leaf.value)
            except ValueError:
                continue
            machines[m.id] = m
    return machines


class Registry:
    """Typed access to fleet's keys through an etcd v2 `Client`."""

    def __init__(self, client: Client, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = "/" + prefix.strip("/")

    # -- keys -----------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """The full key of ``parts`` under the prefix."""
        return posixpath.join(self.prefix, *parts)

    @property
    def jobs_dir(self) -> str:
        return self.key("job")

    @property
    def machines_dir(self) -> str:
        return self.key("machines")

    @property
    def states_dir(self) -> str:
        return self.key("state")

    @property
    def units_dir(self) -> str:
        return self.key("unit")

    @property
    def lease_key(self) -> str:
        return self.key("engine", "leader")

    async def _get_dir(self, key: str) -> tuple[Node | None, int]:
        """(node, etcd index); a missing directory is (None, index)."""
        try:
            resp = await self.client.get(key, recursive=True)
        except KeyNotFoundError as exc:
            return None, exc.index or 0
        return resp.node, resp.etcd_index or 0

    # -- unit contents ------------------------------------------------------------------

    async def put_unit_text(self, text: str) -> str:
        """Store unit file text by hash (idempotent); returns the hash."""
        digest = content_hash(text)
        try:
            await self.client.create(self.key("unit", digest), text)
        except NodeExistError:
            pass
        return digest

    async def unit_text(self, digest: str) -> str | None:
        """The unit file text stored under ``digest``, or None."""
        try:
            return (await self.client.get(self.key("unit", digest))).value
        except KeyNotFoundError:
            return None

    async def unit_hashes(self) -> dict[str, int]:
        """Every stored content hash with its modified index."""
        node, _ = await self._get_dir(self.units_dir)
        if node is None:
            return {}
        return {n.name: n.modified_index for n in node.nodes if not n.dir}

    async def delete_unit_text(self, digest: str, modified_index: int) -> None:
        """Delete stored content unless it was rewritten since ``modified_index``."""
        try:
            await self.client.delete(self.key("unit", digest), prev_index=modified_index)
        except (KeyNotFoundError, TestFailedError):
            pass

    # -- jobs ---------------------------------------------------------------------------

    async def submit(self, name: str, text: str, desired_state: str = INACTIVE) -> str:
        """Create unit ``name`` from ``text``; raises `UnitExistsError` if it exists."""
        check_unit_name(name)
        if desired_state not in JOB_STATES:
            raise ValueError(f"invalid desired state {desired_state!r}")
        digest = await self.put_unit_text(text)
        obj = json.dumps({"Name": name, "UnitHash": digest}, sort_keys=True)
        try:
            await self.client.create(self.key("job", name, "object"), obj)
        except NodeExistError:
            raise UnitExistsError(f"unit {name} already exists") from None
        await self.client.set(self.key("job", name, "target-state"), desired_state)
        return digest

    async def replace(self, name: str, text: str) -> str:
        """Point an existing unit at new content (fleetctl's --replace)."""
        digest = await self.put_unit_text(text)
        obj = json.dumps({"Name": name, "UnitHash": digest}, sort_keys=True)
        try:
            await self.client.update(self.key("job", name, "object"), obj)
        except KeyNotFoundError:
            raise NoSuchUnitError(f"unit {name} does not exist") from None
        return digest

    async def jobs(self) -> tuple[dict[str, JobRecord], int]:
        """All jobs (submitted units and debris) and the etcd index of the read."""
        node, index = await self._get_dir(self.jobs_dir)
        return parse_jobs(node, self.jobs_dir), index

    async def job(self, name: str) -> JobRecord | None:
        """One submitted unit, or None."""
        try:
            resp = await self.client.get(self.key("job", name), recursive=True)
        except (KeyNotFoundError, NotFileError):
            return None
        jobs = parse_jobs(
            Node(key=self.jobs_dir, dir=True, nodes=(resp.node,)) if resp.node else None,
            self.jobs_dir,
        )
        job = jobs.get(name)
        return job if job is not None and job.submitted else None

    async def set_desired_state(self, name: str, state: str) -> None:
        """Set what should happen to a submitted unit."""
        if state not in JOB_STATES:
            raise ValueError(f"invalid desired state {state!r}")
        if await self.job(name) is None:
            raise NoSuchUnitError(f"unit {name} does not exist")
        await self.client.set(self.key("job", name, "target-state"), state)

    async def destroy(self, name: str) -> bool:
        """Remove a unit entirely; False if there was none."""
        try:
            await self.client.delete(self.key("job", name), recursive=True)
        except KeyNotFoundError:
            return False
        return True

    async def set_target(self, name: str, machine_id: str, clear_reason: bool = True) -> None:
        """Engine: place ``name`` on ``machine_id`` (and drop the reason, if asked)."""
        await self.client.set(self.key("job", name, "target"), machine_id)
        if clear_reason:
            await self._delete_quiet(self.key("job", name, "reason"))

    async def clear_target(self, name: str, reason: str | None = None) -> None:
        """Engine: unplace ``name``, recording ``reason`` when it is wanted but unplaceable."""
        if reason is not None:
            await self.client.set(self.key("job", name, "reason"), reason)
        else:
            await self._delete_quiet(self.key("job", name, "reason"))
        await self._delete_quiet(self.key("job", name, "target"))

    async def delete_job_dir(self, name: str) -> None:
        """Engine: remove debris left by a destroy racing a placement."""
        await self._delete_quiet(self.key("job", name), recursive=True)

    async def _delete_quiet(self, key: str, recursive: bool = False) -> None:
        try:
            await self.client.delete(key, recursive=recursive)
        except KeyNotFoundError:
            pass

    # -- machines -----------------------------------------------------------------------

    async def machines(self) -> tuple[dict[str, MachineState], int]:
        """Present machines and the etcd index of the read."""
        node, index = await self._get_dir(self.machines_dir)
        return parse_machines(node, self.machines_dir), index

    async def announce(self, machine: MachineState, ttl: int) -> None:
        """Agent: publish this machine's presence for ``ttl`` seconds."""
        key = self.key("machines", machine.id, "object")
        await self.client.set(key, machine.to_json(), ttl=ttl)

    async def refresh_presence(self, machine_id: str, ttl: int) -> None:
        """Agent: extend presence; raises `KeyNotFoundError` once it has expired."""
        await self.client.set(
            self.key("machines", machine_id, "object"), ttl=ttl, refresh=True, prev_exist=True
        )

    async def withdraw(self, machine_id: str) -> None:
        """Agent: remove this machine's presence now (graceful shutdown)."""
        await self._delete_quiet(self.key("machines", machine_id), recursive=True)

    # -- unit states --------------------------------------------------------------------

    async def unit_states(self) -> dict[tuple[str, str], UnitStateRecord]:
        """Every reported state, by (unit name, machine ID)."""
        node, _ = await self._get_dir(self.states_dir)
        states: dict[tuple[str, str], UnitStateRecord] = {}
        if node is None:
            return states
        for leaf in node.leaves():
            parts = posixpath.relpath(leaf.key, self.states_dir).split("/")
            if len(parts) != 2 or leaf.value is None:
                continue
            try:
                rec = UnitStateRecord.from_json(leaf.value)
            except ValueError:
                continue
            states[(parts[0], parts[1])] = rec
        return states

    async def report_state(self, rec: UnitStateRecord) -> None:
        """Agent: publish the state of one unit on its machine."""
        await self.client.set(self.key("state", rec.name, rec.machine_id), rec.to_json())

    async def clear_state(self, name: str, machine_id: str) -> None:
        """Agent or engine: drop one reported state (and the unit's dir when empty)."""
        await self._delete_quiet(self.key("state", name, machine_id))
        try:
            await self.client.delete(self.key("state", name), dir=True)
        except EtcdError:  # not empty (other machines report it) or already gone
            pass

    # -- engine lease -------------------------------------------------------------------

    async def acquire_lease(self, holder: str, ttl: int) -> bool:
        """Try to become the engine; True on success."""
        try:
            await self.client.create(self.lease_key, holder, ttl=ttl)
        except NodeExistError:
            return False
        return True

    async def renew_lease(self, holder: str, ttl: int) -> bool:
        """Extend our lease; False if it is no longer ours (expired or taken)."""
        try:
            await self.client.set(self.lease_key, ttl=ttl, refresh=True, prev_value=holder)
        except (KeyNotFoundError, TestFailedError):
            return False
        return True

    async def release_lease(self, holder: str) -> None:
        """Give the lease up so another engine can take over at once."""
        try:
            await self.client.compare_and_delete(self.lease_key, prev_value=holder)
        except (KeyNotFoundError, TestFailedError):
            pass

    async def lease_holder(self) -> str | None:
        """``"<machine-id> <token>"`` of the current engine, or None."""
        try:
            return (await self.client.get(self.lease_key)).value
        except KeyNotFoundError:
            return None
