"""The corpus (corpus.py) run four ways, each on a fresh single-member server:

(a) the real etcdctl against real etcd -- the reference;
(b) `grozd etcdctl` against real etcd;
(c) the real etcdctl against a `grozd etcd` member;
(d) `grozd etcdctl` against a `grozd etcd` member.

Every step of (b), (c) and (d) must print the same stdout and stderr and exit with the
same code as (a), after normalising indices, IDs, URLs and times.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.etcdctl.corpus import STEPS, Step, normalise
from tests.etcdctl.servers import (
    Result,
    Server,
    etcd_index,
    etcdctl_or_skip,
    modified_index,
    run_grozd,
    run_real,
    start_server,
)
from tests.realetcd import etcd_or_skip, free_port

REFERENCE = ("etcdctl", "etcd")
COMBOS = [("grozd", "etcd"), ("etcdctl", "grozd"), ("grozd", "grozd")]

# (tool, server, step name) -> why the step differs from the reference; each is an xfail
# (strict) so that a fix shows up as XPASS.
KNOWN: dict[tuple[str, str, str], str] = {}

_results: dict[tuple[str, str], list[Result]] = {}


def _fill(text: str, server: Server, base: int, dead: str) -> str:
    text = text.replace("{EP}", server.client_url).replace("{DEAD}", dead)
    text = re.sub(r"\{i\+(\d+)\}", lambda m: str(base + int(m.group(1))), text)
    return re.sub(r"\{mi:([^}]+)\}",
                  lambda m: str(modified_index(server.client_url, m.group(1))), text)


def run_corpus(tool: str, kind: str, tmp_path: Path) -> list[Result]:
    """Every step in order on a fresh server; normalised results."""
    etcdctl_or_skip()
    etcd_or_skip()
    dead = f"http://127.0.0.1:{free_port()}"
    results = []
    with start_server(kind, tmp_path) as server:
        base = etcd_index(server.client_url)
        urls = {server.client_url: "<client>", server.peer_url: "<peer>", dead: "<dead>"}
        for step in STEPS:
            args = [_fill(a, server, base, dead) for a in step.args]
            if step.endpoints:
                args = ["--endpoints", server.client_url, *args]
            env = {k: _fill(v, server, base, dead) for k, v in step.env} if step.env else None
            if tool == "etcdctl":
                r = run_real(args, step.stdin, env)
            else:
                r = run_grozd(args, step.stdin, env)
            results.append(Result(normalise(r.stdout, base, urls, step.unordered),
                                  normalise(r.stderr, base, urls, step.unordered), r.code))
    return results


def results_for(combo: tuple[str, str], factory: pytest.TempPathFactory) -> list[Result]:
    if combo not in _results:
        _results[combo] = run_corpus(*combo, factory.mktemp(f"{combo[0]}-on-{combo[1]}"))
    return _results[combo]


def _params() -> list[object]:
    params = []
    for tool, kind in COMBOS:
        for i, step in enumerate(STEPS):
            reason = KNOWN.get((tool, kind, step.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(tool, kind, i, step, marks=marks,
                                       id=f"{tool}-on-{kind}-{i:03d}-{step.name[:40]}"))
    return params


@pytest.mark.parametrize(("tool", "kind", "i", "step"), _params())
def test_step_matches_real_etcdctl_on_real_etcd(
    tool: str, kind: str, i: int, step: Step, tmp_path_factory: pytest.TempPathFactory
) -> None:
    want = results_for(REFERENCE, tmp_path_factory)[i]
    got = results_for((tool, kind), tmp_path_factory)[i]
    assert (got.stdout, got.stderr, got.code) == (want.stdout, want.stderr, want.code)
