"""What a rank executing a plan takes for a participant's death (runtime/plan_peers.py),
against a real etcd: an absent registration, or one of another incarnation, is a death;
a value that does not parse is not (a hostile write must not end a barrier), nor is an
etcd that cannot answer. A newer epoch, or a participant's key gone, aborts the waits."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from controller.etcd_client import EtcdConfig, connect
from controller.records import MirrorRecord, PlanRecord, RankRecord
from elastic_ep.core.placement import initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime.plan_peers import PlanPeers
from elastic_ep.tools.etcd_server import EtcdServer

ROOT = "/elastic-ep/pp"


@pytest.fixture(scope="module")
def client() -> Any:
    with EtcdServer() as srv:
        yield connect(EtcdConfig(srv.endpoint, deployment="pp", timeout_s=2.0))


def plan_record() -> PlanRecord:
    """Old members r0, r1, r2; r1 dead in the plan: participants r0 (0) and r2 (1)."""
    old = initial_placement(1, 4, 3, 2)
    mapping = RankMapping.build(3, dead=[1])
    new_ = initial_placement(1, 4, 2, 2)
    plan = build_plan(old, new_, mapping, 64, epoch=2)
    return PlanRecord(2, "ctl", ["r0#a", "r1#a", "r2#a"], ["r0#a", "r2#a"], plan, new_)


def register(client: Any, rid: str, inc: str) -> None:
    client.put(f"{ROOT}/ranks/{rid}", RankRecord(rid, "h", "cpu", "", "active", incarnation=inc).to_json())


@pytest.mark.parametrize(("value", "gone"), [
    ("same incarnation", False),
    ("absent", True),
    ("another incarnation", True),
    (b"{not json", False),
    (b'{"schema": 1, "id": "r2", "state": "exploded"}', False),
    (b"[" * 100_000, False),
])
def test_only_an_absent_or_replaced_registration_is_a_death(client: Any, value: Any, gone: bool) -> None:
    client.delete_prefix(f"{ROOT}/")
    register(client, "r0", "a")
    if value == "same incarnation":
        register(client, "r2", "a")
    elif value == "another incarnation":
        register(client, "r2", "b")
    elif value != "absent":
        client.put(f"{ROOT}/ranks/r2", value)
    peers = PlanPeers(client, ROOT, plan_record(), plan_record().mapping, period_s=0.0)
    assert peers.tokens == ["r0#a", "r2#a"]
    assert peers.gone(1) is gone, value
    assert peers.gone(0) is False
    assert peers.gone(7) is False and peers.gone(-1) is False, "outside the participants: no one"


def test_a_death_is_remembered_and_a_newer_epoch_aborts(client: Any) -> None:
    client.delete_prefix(f"{ROOT}/")
    for rid in ("r0", "r2"):
        register(client, rid, "a")
    client.put(f"{ROOT}/epoch", "2")
    peers = PlanPeers(client, ROOT, plan_record(), plan_record().mapping, period_s=0.05)
    assert not peers.gone(1) and peers.abort_reason() == ""
    client.delete(f"{ROOT}/ranks/r2")
    time.sleep(0.06)
    assert peers.gone(1)
    register(client, "r2", "a")  # a registration coming back does not undo a death seen
    assert peers.gone(1)
    client.delete(f"{ROOT}/ranks/r0")
    assert "['r0#a']" in peers.abort_reason()
    register(client, "r0", "a")
    client.put(f"{ROOT}/epoch", "3")
    assert "superseded" in peers.abort_reason()
    client.put(f"{ROOT}/epoch", "garbage")
    assert peers.abort_reason() == "", "a malformed epoch is no reason to give up"


def test_an_unreachable_etcd_is_no_death() -> None:
    with EtcdServer() as srv:
        c = connect(EtcdConfig(srv.endpoint, deployment="pp", timeout_s=2.0))
    # The server is gone now.
    peers = PlanPeers(c, ROOT, plan_record(), plan_record().mapping, period_s=0.0)
    assert peers.gone(1) is False and peers.abort_reason() == ""


def test_a_mirror_report_counts_only_for_the_planned_incarnation(client: Any) -> None:
    client.delete_prefix(f"{ROOT}/")
    peers = PlanPeers(client, ROOT, plan_record(), plan_record().mapping)
    assert peers.mirror_rows(2) is None, "no report"
    client.put(f"{ROOT}/mirrors/r2", MirrorRecord("r2#a", np.array([5, -1])).to_json())
    assert peers.mirror_rows(2).tolist() == [5, -1]
    client.put(f"{ROOT}/mirrors/r2", MirrorRecord("r2#b", np.array([5, -1])).to_json())
    assert peers.mirror_rows(2) is None, "another incarnation's memory"
    client.put(f"{ROOT}/mirrors/r2", b'{"schema": 1, "token": "r2#a", "rows": [5]}')
    assert peers.mirror_rows(2) is None, "a report that does not parse"
    assert peers.mirror_rows(9) is None and peers.mirror_rows(-1) is None
