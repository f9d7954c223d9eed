"""The placement rules as a pure function: every [X-Fleet] option, load, stability."""

from __future__ import annotations

from grozd.fleet.registry import INACTIVE, LAUNCHED, LOADED, MachineState
from grozd.fleet.scheduler import Placement, SchedUnit, schedule
from grozd.fleet.spec import parse_spec

M1, M2, M3 = "a" * 32, "b" * 32, "c" * 32


def machines(**meta: dict[str, str]) -> dict[str, MachineState]:
    ids = {"m1": M1, "m2": M2, "m3": M3}
    return {ids[k]: MachineState(ids[k], metadata=v) for k, v in meta.items()}


def unit(name: str, fleet: str = "", desired: str = LAUNCHED, target: str | None = None
         ) -> SchedUnit:  # fmt: skip
    text = "[Service]\nExecStart=/bin/true\n" + (f"[X-Fleet]\n{fleet}\n" if fleet else "")
    return SchedUnit(name, desired, target, parse_spec(name, text).options)


def plan(units: list[SchedUnit], ms: dict[str, MachineState]) -> dict[str, Placement]:
    return schedule({u.name: u for u in units}, ms)


def test_least_loaded_machine_wins_ties_by_id():
    ms = machines(m1={}, m2={}, m3={})
    result = plan([unit(f"u{i}.service") for i in range(6)], ms)
    counts = {m: sum(p.machine == m for p in result.values()) for m in ms}
    assert counts == {M1: 2, M2: 2, M3: 2}
    assert result["u0.service"].machine == M1


def test_valid_placements_are_kept_not_rebalanced():
    ms = machines(m1={}, m2={})
    units = [unit(f"u{i}.service", target=M1) for i in range(3)]
    assert all(p.machine == M1 for p in plan(units, ms).values())


def test_machine_id_pins_and_reports_a_missing_machine():
    ms = machines(m1={}, m2={})
    result = plan([unit("a.service", f"MachineID={M2}"), unit("b.service", "MachineID=ffff")], ms)
    assert result["a.service"] == Placement(M2)
    assert result["b.service"] == Placement(None, "MachineID ffff is not in the cluster")


def test_machine_metadata_any_listed_value_per_key():
    ms = machines(m1={"region": "eu", "disk": "hdd"}, m2={"region": "us", "disk": "ssd"},
                  m3={"region": "eu", "disk": "ssd"})  # fmt: skip
    result = plan([
        unit("a.service", "MachineMetadata=region=eu\nMachineMetadata=disk=ssd"),
        unit("b.service", "MachineMetadata=region=us region=asia"),
        unit("c.service", "MachineMetadata=region=mars"),
    ], ms)  # fmt: skip
    assert result["a.service"].machine == M3
    assert result["b.service"].machine == M2
    assert result["c.service"].machine is None
    assert "metadata does not match region=mars" in (result["c.service"].reason or "")


def test_machine_of_follows_its_leader_and_waits_for_it():
    ms = machines(m1={}, m2={})
    result = plan([unit("db.service", target=M2), unit("app.service", "MachineOf=db.service")], ms)
    assert result["app.service"].machine == M2
    result = plan([unit("app.service", "MachineOf=db.service")], ms)
    assert result["app.service"] == Placement(None, "MachineOf db.service: db.service is not"
                                                    " scheduled")  # fmt: skip


def test_follower_moves_with_its_leader():
    ms = machines(m1={}, m2={})
    # The leader's machine is gone: the leader moves, and the follower goes with it.
    gone = "d" * 32
    result = plan([unit("app.service", "MachineOf=db.service", target=gone),
                   unit("db.service", target=gone)], ms)  # fmt: skip
    assert result["app.service"].machine == result["db.service"].machine is not None


def test_conflicts_either_side_with_globs():
    ms = machines(m1={}, m2={})
    result = plan([unit("web1.service", "Conflicts=web*"), unit("web2.service"),
                   unit("web3.service")], ms)  # fmt: skip
    placed = {n: p.machine for n, p in result.items()}
    assert placed["web1.service"] != placed["web2.service"]
    assert placed["web1.service"] != placed["web3.service"]
    # web2 and web3 do not conflict with each other.
    assert placed["web2.service"] == placed["web3.service"]


def test_conflicting_units_already_together_are_separated():
    ms = machines(m1={}, m2={})
    result = plan([unit("a.service", "Conflicts=b.service", target=M1),
                   unit("b.service", target=M1)], ms)  # fmt: skip
    assert result["a.service"].machine == M1
    assert result["b.service"].machine == M2


def test_unschedulable_reason_lists_each_machine():
    ms = machines(m1={"disk": "ssd"}, m2={})
    result = plan([unit("a.service", "Conflicts=*", target=M1),
                   unit("c.service", "MachineMetadata=disk=ssd")], ms)  # fmt: skip
    assert result["c.service"] == Placement(
        None,
        "no eligible machine (aaaaaaaa: conflicts with a.service;"
        " bbbbbbbb: metadata does not match disk=ssd)",
    )


def test_global_units_are_not_placed_but_count_for_conflicts():
    ms = machines(m1={"role": "edge"}, m2={})
    result = plan([unit("g.service", "Global=true\nMachineMetadata=role=edge"),
                   unit("x.service", "Conflicts=g.service")], ms)  # fmt: skip
    assert "g.service" not in result
    assert result["x.service"].machine == M2


def test_replaces_takes_over_the_machine_and_moves_the_replaced_unit():
    ms = machines(m1={}, m2={})
    result = plan([unit("old.service", target=M1), unit("filler.service", target=M2),
                   unit("new.service", "Replaces=old.service")], ms)  # fmt: skip
    assert result["new.service"].machine == M1
    assert result["old.service"].machine == M2


def test_replaced_unit_with_nowhere_to_go_gets_a_reason():
    ms = machines(m1={})
    result = plan([unit("old.service", target=M1), unit("new.service", "Replaces=old.service")], ms)
    assert result["new.service"].machine == M1
    assert result["old.service"].machine is None
    assert "conflicts with new.service" in (result["old.service"].reason or "")


def test_inactive_units_and_broken_units():
    ms = machines(m1={})
    result = schedule({
        "i.service": SchedUnit("i.service", INACTIVE, M1),
        "bad.service": SchedUnit("bad.service", LOADED, None, None, "invalid unit file: x"),
    }, ms)  # fmt: skip
    assert result["i.service"] == Placement(None)
    assert result["bad.service"] == Placement(None, "invalid unit file: x")


def test_no_machines():
    assert plan([unit("a.service")], {})["a.service"] == Placement(None,
                                                                   "no machines in the cluster")
