"""Hypothesis throws values at every key a rank may write (``ranks/``, ``load/``,
``acks/``: its own and made-up ids, with a lease and without) of a live deployment: two
controller processes and five rank processes on a real etcd. No process may die of
them, and afterwards a SIGKILLed rank must still be replaced by a committed plan that
keeps every invariant of docs/DESIGN.md (the chaos harness checks them).

``tests/test_records.py`` fuzzes each record's parser in-process; this one fuzzes the
deployment."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_ep.tools.chaos import ChaosCluster

SEED = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or 20261130

# JSON documents of any shape, numbers included that JSON cannot hold exactly.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                          st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                         max_leaves=40)
FIELDS = {
    "acks": {"schema": 1, "id": "r1#x", "epoch": 1, "ok": True, "bytes": {"peer": 1}, "phases": {"transfer": 0.1},
             "error": "", "mismatched": 0},
    "load": {"schema": 1, "id": "r1", "load": [[1.0] * 8] * 2, "window_s": 1.0, "served": {"ok": 1}, "epochs": [1]},
}


def _encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _record_with(kind: str, rid: str) -> st.SearchStrategy[bytes]:
    """A well-formed record of ``kind`` for rank ``rid`` with one field replaced by any
    document."""
    base = {**FIELDS[kind], "id": f"{rid}#x" if kind == "acks" else rid}
    return st.tuples(st.sampled_from(sorted(base)), documents).map(
        lambda fv: _encode({**base, fv[0]: fv[1]}))


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


garbage = st.one_of(st.binary(max_size=2048), documents.map(_encode),
                    st.integers(min_value=1_000, max_value=200_000).map(_deep))
# Ids no live rank has: a rank that breaks its own keys breaks only itself (the agent's
# own tests cover a rank's key overwritten under it).
ids = st.sampled_from(["ghost", "r99", "x" * 200, "a#b", "../plan", ""])


@st.composite
def hostile_write(draw: Any) -> tuple[str, bytes, bool]:
    """(key relative to the root, value, under a lease). A leased registration never
    holds a well-formed record: that would be a real joining rank, not a hostile value."""
    kind = draw(st.sampled_from(["ranks", "load", "acks"]))
    rid = draw(ids)
    if kind == "ranks":
        return f"ranks/{rid}", draw(garbage), draw(st.booleans())
    value = draw(st.one_of(garbage, _record_with(kind, rid)))
    return f"{kind}/{rid}", value, draw(st.booleans())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    print(f"seed={SEED}")
    with ChaosCluster(str(tmp_path_factory.mktemp("hostile-live")), seed=SEED) as c:
        try:
            yield c
        except BaseException:
            print(c.logs())
            raise


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(writes=st.lists(hostile_write(), min_size=1, max_size=8))
def test_no_value_a_rank_may_write_stops_a_process(cluster: ChaosCluster, writes: list[tuple[str, bytes, bool]]) -> None:
    client = cluster._client()
    lease = client.lease(30)
    for key, value, leased in writes:
        client.put(f"{cluster.cfg.root}/{key}", value, lease=lease if leased else None)
    time.sleep(0.2)  # the controllers' watch wakes them: let a pass read the values
    # Every process still runs; the leader still answers from the same revision on.
    dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
    assert not dead, f"processes exited after {[(k, v[:60]) for k, v, _ in writes]}: {dead}"
    view = cluster.read()
    assert view.committed is not None and view.leader in cluster.live_controllers()


def test_after_the_values_a_killed_rank_is_replaced_correctly(cluster: ChaosCluster) -> None:
    before = cluster.read().committed
    result = cluster.step("kill_one")  # kills, waits for the commit, checks every invariant
    assert result.killed and result.epoch > before.epoch
    assert len(cluster.live_controllers()) == 2
