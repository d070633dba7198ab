import json

import numpy as np
import pytest
from hypothesis import given, settings

from elastic_ep.errors import PlanError
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import DISK, TransferPlan, build_plan, lower_bound_bytes, moved_bytes
from elastic_ep.core.policy import DeepSeekPolicy, MinMigrationPolicy
from elastic_ep.core.rank_mapping import RankMapping

from strategies import placement_and_change


@settings(max_examples=80, deadline=None)
@given(placement_and_change())
def test_plan_invariants(case):
    old, m, load = case
    for policy in (MinMigrationPolicy(), DeepSeekPolicy()):
        new = policy.rebalance(old, m, load)
        plan = build_plan(old, new, m, expert_bytes=7, epoch=3)
        plan.validate()
        spr = old.slots_per_rank
        live = m.live_sources
        # Experts with no replica on any live rank are exactly the missing ones.
        for layer in range(old.num_layers):
            on_live = {int(old.phy2log[layer, r * spr + i]) for r in live for i in range(spr)}
            needed = {t.logical for t in plan.layer_transfers(layer)}
            assert set(plan.missing[layer]) == needed - on_live
        for t in plan.transfers:
            ranks = [s.rank for s in t.sources]
            assert all(r in live for r in ranks[:-1]) and ranks[-1] == DISK
            assert len(set(ranks)) == len(ranks)  # each rank listed once
            assert set(m.dead).isdisjoint(ranks)
            if t.route == "disk":
                assert t.logical in plan.missing[t.layer]
        # Every changed slot has a transfer; unchanged slots have none.
        assert len(plan.transfers) == int((m.carry_over(old) != new.phy2log).sum())
        b = plan.bytes_by_route()
        assert sum(b.values()) == 7 * len(plan.transfers)
        assert moved_bytes(plan) >= lower_bound_bytes(old, m, 7)
        again = TransferPlan.from_json(plan.to_json())
        assert again.transfers == plan.transfers and again.missing == plan.missing
        assert again.new == plan.new and again.old == plan.old and again.epoch == 3


def test_peer_reads_spread_and_prefer_same_node():
    # 4 ranks x 2 slots, experts 0..3 each replicated on ranks 0 and 1 (node a) and 2 (node b)
    old = ExpertPlacement(np.array([[0, 1, 0, 1, 0, 1, 2, 3]] * 1), 2, 4)
    m = RankMapping.build(4, num_joining=2)
    new = ExpertPlacement(np.array([[0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 0, 1]]), 2, 4)
    plan = build_plan(old, new, m, 10, nodes=["a", "a", "b", "b", "b", "a"])
    by_dst = {t.dst_rank: t for t in plan.transfers if t.dst_slot == 0}
    assert by_dst[4].sources[0].rank == 2  # rank 4 is on node b: its node-mate first
    assert by_dst[5].sources[0].rank in (0, 1)  # rank 5 is on node a
    sent = plan.summary()["peer_bytes_by_src_rank"]
    assert max(sent.values()) - min(sent.values()) <= 10


def test_load_spreads_over_sources_without_nodes():
    # Expert 0 lives on 4 ranks; 8 joining slots all want it.
    old = ExpertPlacement(np.array([[0, 1, 0, 1, 0, 1, 0, 1]]), 2, 2)
    m = RankMapping.build(4, num_joining=4)
    new = ExpertPlacement(np.array([[0, 1, 0, 1, 0, 1, 0, 1] + [0, 0] * 4]), 2, 2)
    plan = build_plan(old, new, m, 1)
    sent = plan.summary()["peer_bytes_by_src_rank"]
    assert sorted(sent.values()) == [2, 2, 2, 2]


def test_leaving_rank_is_a_source_dead_rank_is_not():
    old = ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1, 2, 3]]), 4, 4)
    new = ExpertPlacement(np.array([[0, 1, 2, 3, 3, 2, 1, 0]]), 4, 4)
    leave = build_plan(old, new, RankMapping.build(2, leaving=[1], num_joining=1), 1)
    assert [t.route for t in leave.transfers] == ["peer"] * 4
    assert all({s.rank for s in t.sources[:-1]} == {0, 1} for t in leave.transfers)
    assert sorted(t.sources[0].rank for t in leave.transfers) == [0, 0, 1, 1]  # spread
    dead = build_plan(old, new, RankMapping.build(2, dead=[1], num_joining=1), 1)
    assert all([s.rank for s in t.sources] == [0, DISK] for t in dead.transfers)
    assert not dead.missing[0] and not leave.missing[0]


def test_local_copy_comes_first():
    old = ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1]]), 2, 4)
    new = ExpertPlacement(np.array([[0, 0, 2, 3, 0, 1]]), 2, 4)
    plan = build_plan(old, new, RankMapping.build(3), 1)
    (t,) = plan.transfers
    assert [(s.rank, s.slot, s.route) for s in t.sources] == [(0, 0, "local"), (2, 0, "peer"), (DISK, -1, "disk")]


def test_mismatched_inputs_are_refused():
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 2, 4)
    with pytest.raises(PlanError, match="do not match"):
        build_plan(old, ExpertPlacement(np.array([[0, 1, 2, 3]]), 4, 4), RankMapping.build(2, dead=[1]), 1)
    with pytest.raises(PlanError, match="mapping"):
        build_plan(old, old, RankMapping.build(3), 1)
    with pytest.raises(PlanError, match="expert_bytes must be positive"):
        build_plan(old, old, RankMapping.build(2), 0)
    with pytest.raises(PlanError, match="nodes lists 1 ranks"):
        build_plan(old, old, RankMapping.build(2), 1, nodes=["a"])


def test_missing_experts_go_to_disk_only():
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 2, 4)
    m = RankMapping.build(2, dead=[1], num_joining=1)
    new = ExpertPlacement(np.array([[0, 1, 2, 3]]), 2, 4)
    plan = build_plan(old, new, m, 5)
    assert plan.missing == ((2, 3),)
    assert [t.route for t in plan.transfers] == ["disk", "disk"]
    assert plan.summary()["bytes"] == {"local": 0, "peer": 0, "mirror": 0, "disk": 10}


def _plan_dict() -> dict:
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 2, 4)
    m = RankMapping.build(2, dead=[1], num_joining=1)
    return json.loads(build_plan(old, old, m, 5, epoch=4).to_json())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(schema=99), "schema 99 is not supported"),
        (lambda d: d.pop("transfers"), "malformed"),
        (lambda d: d["transfers"][0].__setitem__(4, [[1, 0], [-1, -1]]), "disk alone must be used exactly for missing|dead"),
        (lambda d: d["transfers"][0].__setitem__(4, []), "last source must be disk"),
        (lambda d: d["transfers"].pop(), "does not give the new placement"),
        (lambda d: d["mapping"].update(old_to_new=[1, 0]), "not dense"),
        (lambda d: d["transfers"][0].__setitem__(1, 7), "out of range"),
    ],
)
def test_malformed_plans_are_refused(mutate, match):
    d = _plan_dict()
    mutate(d)
    with pytest.raises(PlanError, match=match):
        TransferPlan.from_json(json.dumps(d))


def test_not_json():
    with pytest.raises(PlanError, match="not valid JSON"):
        TransferPlan.from_json(b"\xff{")
    with pytest.raises(PlanError, match="schema"):
        TransferPlan.from_json("[1, 2]")
