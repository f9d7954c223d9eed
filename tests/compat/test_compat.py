"""Every scenario of the corpus gives the same answers from grozd as from real etcd 3.4."""

from __future__ import annotations

import pprint
from typing import Any

import pytest

from .harness import Runner
from .scenarios import SCENARIOS

# etcd's answers per scenario, for the coverage check at the end.
SEEN: dict[str, list[Any]] = {}

# Every v2 error etcd 3.4 can give on the keys API (the others are unreachable there:
# 103, 106, 109, 110, 200, 204-208 are legacy; 300/301/400 need a failing cluster).
REACHABLE_ERRORS = {100, 101, 102, 104, 105, 107, 108, 201, 202, 203, 209, 210, 211, 212, 401}
STATUSES = {200, 201, 301, 400, 403, 404, 405, 412, 415}
ACTIONS = {"get", "set", "create", "update", "delete", "compareAndSwap", "compareAndDelete",
           "expire"}


def first_difference(ours: list[Any], theirs: list[Any]) -> str:
    for mine, real in zip(ours, theirs, strict=False):
        if mine != real:
            return (
                f"step {real[0]} ({real[2]} {real[3]}) differs:\n"
                f"etcd:  {pprint.pformat(real[4], width=100)}\n"
                f"grozd: {pprint.pformat(mine[4], width=100)}"
            )
    return f"step counts differ: etcd {len(theirs)}, grozd {len(ours)}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_matches_etcd(scenario, etcd_url, grozd_url):
    prefix = f"/compat/{scenario.name}"
    expected = Runner(etcd_url, prefix).run(scenario.steps)
    actual = Runner(grozd_url, prefix).run(scenario.steps)
    SEEN[scenario.name] = expected
    assert actual == expected, first_difference(actual, expected)


def _walk(obj: Any, found: dict[str, set[Any]]) -> None:
    if isinstance(obj, dict):
        if "status" in obj:
            found["status"].add(obj["status"])
        for value in obj.values():
            _walk(value, found)
    elif isinstance(obj, list | tuple):
        if len(obj) == 2 and obj[0] == "errorCode":
            found["errors"].add(obj[1])
        if len(obj) == 2 and obj[0] == "action":
            found["actions"].add(obj[1])
        for value in obj:
            _walk(value, found)


def test_corpus_covers_every_error_status_and_action():
    """The corpus really exercises what it claims (guards against a lenient harness)."""
    if len(SEEN) != len(SCENARIOS):
        pytest.skip("needs the whole corpus to have run")
    found: dict[str, set[Any]] = {"status": set(), "errors": set(), "actions": set()}
    _walk(list(SEEN.values()), found)
    assert REACHABLE_ERRORS <= found["errors"], REACHABLE_ERRORS - found["errors"]
    assert STATUSES <= found["status"], STATUSES - found["status"]
    assert ACTIONS <= found["actions"], ACTIONS - found["actions"]
