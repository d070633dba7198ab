"""The controller's decisions, driven through every branch with hand-built views: no
etcd, no clock (``now`` is given), no metrics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from controller.decide import Action, DecideConfig, Kind, Memory, ModelShape, decide
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_token
from controller.view import ClusterView
from elastic_ep.core.placement import ExpertPlacement, balance, initial_placement
from elastic_ep.core.plan import DISK, build_plan
from elastic_ep.core.policy import MinMigrationPolicy, RebalancePolicy
from elastic_ep.core.rank_mapping import RankMapping

# 2 MoE layers, 8 experts, 4 slots a rank: 2 ranks hold every expert, 1 rank does not.
MODEL = ModelShape(num_layers=2, num_logical=8, slots_per_rank=4, expert_bytes=1024)
SETTLE = 1.0
CFG = DecideConfig(MODEL, leader="ctl-a", min_ranks=3, settle_s=SETTLE, ack_timeout_s=30.0)
T0 = 100.0


# -- building views ----------------------------------------------------------------------
def rank(rid: str, inc: str = "a", state: str = "active", node: str = "n0") -> RankRecord:
    return RankRecord(rid, host="h", device="cpu", node=node, state=state, incarnation=inc)


def tok(rid: str, inc: str = "a") -> str:
    return member_token(rid, inc)


def ranks(*records: RankRecord) -> dict[str, RankRecord]:
    return {r.id: r for r in records}


def committed(members: list[str], epoch: int = 1) -> tuple[PlanRecord, CommitRecord]:
    """The bootstrap plan of ``members`` and its commit, at ``epoch``."""
    placement = initial_placement(MODEL.num_layers, MODEL.num_logical, len(members), MODEL.slots_per_rank)
    plan = PlanRecord(epoch, "ctl-a", [], list(members), None, placement, "bootstrap")
    return plan, CommitRecord(epoch, list(members), placement)


def steady_view(*records: RankRecord, members: list[str] | None = None, **kw: object) -> ClusterView:
    """Ranks ``records`` and a commit at epoch 1 of ``members`` (default: the records' tokens)."""
    plan, commit = committed(members if members is not None else [r.token for r in records])
    return ClusterView(ranks=ranks(*records), epoch=1, plan=plan, committed=commit, **kw)


def in_flight_view(old: list[str], new_ranks: list[RankRecord], joining: int, *records: RankRecord,
                   acks: dict[str, bool]) -> ClusterView:
    """Committed ``old`` at epoch 1; the plan of epoch 2 out, adding ``joining`` ranks
    (the last of ``new_ranks``); ``acks`` by member token; ranks registered: ``records``."""
    _, commit = committed(old)
    mapping = RankMapping.build(len(old), num_joining=joining)
    new = initial_placement(MODEL.num_layers, MODEL.num_logical, mapping.new_ep_size, MODEL.slots_per_rank)
    plan = build_plan(commit.placement, new, mapping, MODEL.expert_bytes, epoch=2)
    rec = PlanRecord(2, "ctl-a", list(old), list(old) + [r.token for r in new_ranks[len(old):]], plan, new, "join")
    return ClusterView(ranks=ranks(*records), epoch=2, plan=rec, committed=commit,
                       acks={m: AckRecord(2, m, ok) for m, ok in acks.items()})


def skewed_loads(ids: list[str], hot: int = 0) -> dict[str, LoadRecord]:
    load = np.ones((MODEL.num_layers, MODEL.num_logical))
    load[:, hot] = 100.0
    return {i: LoadRecord(i, load.tolist(), 10.0) for i in ids}


def check_plan(action: Action, view: ClusterView) -> PlanRecord:
    """The invariants of a published plan: epoch e+1, its leader, a valid placement on
    its new members, no source on a dead rank; returns the record."""
    rec = action.record
    assert action.kind is Kind.PUBLISH and rec is not None
    assert action.epoch == rec.epoch == view.epoch + 1 and rec.leader == CFG.leader
    rec.placement.validate()
    assert rec.placement.ep_size == len(rec.new_members) and rec.plan is not None
    rec.plan.validate()
    m = rec.plan.mapping
    for t in rec.plan.transfers:
        assert all(s.rank == DISK or s.rank not in m.dead for s in t.sources), t
    return rec


# -- bootstrap ---------------------------------------------------------------------------
def test_bootstrap_waits_for_min_ranks() -> None:
    view = ClusterView(ranks=ranks(rank("r0"), rank("r1")))
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.WAIT_BOOTSTRAP and a.ranks == ("r0", "r1") and a.record is None
    assert a.memory.seen is None, "too few ranks: no settle window opens"


def test_bootstrap_settles_then_publishes() -> None:
    view = ClusterView(ranks=ranks(rank("r2", "c"), rank("r0", "a"), rank("r1", "b")))
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.WAIT_BOOTSTRAP and a.memory.seen == (("boot", ("r0", "r1", "r2")), T0)
    a = decide(view, a.memory, CFG, T0 + SETTLE / 2)
    assert a.kind is Kind.WAIT_BOOTSTRAP
    a = decide(view, a.memory, CFG, T0 + SETTLE)
    assert a.kind is Kind.BOOTSTRAP and a.epoch == 1 and a.record is not None
    rec = a.record
    assert rec.epoch == 1 and rec.leader == "ctl-a" and rec.plan is None and rec.old_members == []
    assert rec.new_members == [tok("r0", "a"), tok("r1", "b"), tok("r2", "c")]
    rec.placement.validate()
    assert rec.placement.ep_size == 3 and rec.placement.slots_per_rank == MODEL.slots_per_rank


def test_bootstrap_window_restarts_when_ranks_change_and_skips_draining() -> None:
    three = ClusterView(ranks=ranks(rank("r0"), rank("r1"), rank("r2")))
    a = decide(three, Memory(last_rebalance=0.0), CFG, T0)
    four = ClusterView(ranks=ranks(rank("r0"), rank("r1"), rank("r2"), rank("r3"), rank("r4", state="draining")))
    a = decide(four, a.memory, CFG, T0 + SETTLE)
    assert a.kind is Kind.WAIT_BOOTSTRAP and a.memory.seen == (("boot", ("r0", "r1", "r2", "r3")), T0 + SETTLE)
    a = decide(four, a.memory, CFG, T0 + 2 * SETTLE)
    assert a.kind is Kind.BOOTSTRAP and a.record is not None
    assert [m.split("#")[0] for m in a.record.new_members] == ["r0", "r1", "r2", "r3"]


def test_bootstrap_spreads_a_hot_expert() -> None:
    view = ClusterView(ranks=ranks(rank("r0"), rank("r1"), rank("r2")), loads=skewed_loads(["r0"], hot=5))
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    assert a.kind is Kind.BOOTSTRAP and a.record is not None
    p = a.record.placement
    p.validate()
    assert (p.logcnt[:, 5] >= 2).all(), p.logcnt


def test_bootstrap_spreads_replicas_over_nodes() -> None:
    from elastic_ep.core.fault_domains import shared_node_experts

    labels = ["n0", "n0", "n1", "n1"]
    view = ClusterView(ranks=ranks(*(rank(f"r{i}", node=n) for i, n in enumerate(labels))))
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, min_ranks=4, settle_s=0.0), T0)
    assert a.kind is Kind.BOOTSTRAP and a.record is not None
    p = a.record.placement
    p.validate()
    assert (p.logcnt == 2).all() and shared_node_experts(p, labels) == 0, p.phy2log


def test_bootstrap_with_too_few_slots_raises_typed() -> None:
    from elastic_ep.errors import ElasticEPError

    view = ClusterView(ranks=ranks(rank("r0")))
    with pytest.raises(ElasticEPError, match="cannot hold"):
        decide(view, Memory(last_rebalance=0.0), replace(CFG, min_ranks=1, settle_s=0.0), T0)


# -- a plan in flight -------------------------------------------------------------------
OLD = [tok("r0"), tok("r1"), tok("r2")]
R = [rank("r0"), rank("r1"), rank("r2"), rank("r3", state="joining")]


def test_waits_for_acks_and_times_them_from_takeover() -> None:
    view = in_flight_view(OLD, R, 1, *R, acks={tok("r0"): True, tok("r1"): True})
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.WAIT_ACKS and a.epoch == 2 and set(a.ranks) == {tok("r2"), tok("r3")}
    assert a.memory.sent == {2: T0} and a.dead == () and a.failed == ()
    a = decide(view, a.memory, CFG, T0 + CFG.ack_timeout_s)
    assert a.kind is Kind.WAIT_ACKS
    a = decide(view, a.memory, CFG, T0 + CFG.ack_timeout_s + 1)
    assert a.kind is Kind.ACK_TIMEOUT and set(a.ranks) == {tok("r2"), tok("r3")} and a.record is None


def test_commits_when_every_live_participant_acked_ok() -> None:
    view = in_flight_view(OLD, R, 1, *R, acks={m: True for m in OLD + [tok("r3")]})
    mem = Memory(last_rebalance=0.0, sent={2: T0 - 5.0}, phases={2: {"detect": 1.0, "plan": 0.25}})
    a = decide(view, mem, CFG, T0)
    assert a.kind is Kind.COMMIT and a.record is view.plan and a.epoch == 2
    assert a.phases == {"detect": 1.0, "plan": 0.25, "transfer": 5.0}
    assert a.memory.sent == {} and a.memory.phases == {} and a.memory.last_rebalance == T0
    assert mem.sent == {2: T0 - 5.0}, "decide must not change the memory it was given"


def test_dead_participant_replans_from_the_finished_plan_at_once() -> None:
    alive = [R[0], R[2], R[3]]  # r1 died during the join
    view = in_flight_view(OLD, R, 1, *alive, acks={tok("r0"): True, tok("r2"): True, tok("r3"): True})
    a = decide(view, Memory(last_rebalance=0.0, detected_at=None), CFG, T0)
    rec = check_plan(a, view)  # no settle window: ranks are waiting on this plan
    assert a.dead == (tok("r1"),) and a.failed == ()
    assert rec.old_members == [tok("r0"), tok("r1"), tok("r2"), tok("r3")]
    assert rec.new_members == [tok("r0"), tok("r2"), tok("r3")]
    assert rec.plan.mapping.dead == {1} and rec.plan.mapping.num_joining == 0
    assert "dead ['r1#a']" in rec.reason


def test_failed_ack_waits_then_replans_when_it_registers_again() -> None:
    view = in_flight_view(OLD, R, 1, *R, acks={tok("r0"): True, tok("r1"): True, tok("r2"): True, tok("r3"): False})
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.WAIT_FAILED and a.failed == (tok("r3"),) and a.record is None and a.epoch == 2
    # r3 fences itself and registers again: its old member is dead, the new one joins.
    again = rank("r3", "b", state="joining")
    view = replace(view, ranks=ranks(R[0], R[1], R[2], again), acks={m: AckRecord(2, m, True) for m in OLD})
    a = decide(view, a.memory, CFG, T0 + 1)
    rec = check_plan(a, view)
    assert a.dead == (tok("r3"),)
    assert rec.new_members == OLD + [tok("r3", "b")] and rec.plan.mapping.dead == {3}
    assert rec.plan.mapping.num_joining == 1


def dead_draining_source_view() -> ClusterView:
    """Epoch 2 drains r2 out of 3 ranks; r2 died before its ack, r0 and r1 finished."""
    old = [tok("r0"), tok("r1"), tok("r2")]
    _, commit = committed(old)
    mapping = RankMapping.build(3, leaving=[2])
    new = initial_placement(MODEL.num_layers, MODEL.num_logical, 2, MODEL.slots_per_rank)
    rec = PlanRecord(2, "ctl-a", old, old[:2], build_plan(commit.placement, new, mapping, 1024, epoch=2), new, "drain")
    return ClusterView(ranks=ranks(rank("r0"), rank("r1")), epoch=2, plan=rec, committed=commit,
                       acks={m: AckRecord(2, m, True) for m in old[:2]})


def test_dead_draining_source_does_not_block_the_commit() -> None:
    """Every new member finished; the draining source died before its ack: commit."""
    a = decide(dead_draining_source_view(), Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.COMMIT and a.epoch == 2 and a.dead == (tok("r2"),) and a.record is not None


# -- membership changes against the committed placement --------------------------------
def test_dead_rank_settles_then_publishes() -> None:
    view = steady_view(rank("r0"), rank("r2"), members=OLD)  # r1's lease expired
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.SETTLING and a.record is None and "dead ['r1#a']" in a.reason
    assert a.memory.seen == (("change", (1,), (), ()), T0) and a.memory.detected_at == T0
    a = decide(view, a.memory, CFG, T0 + SETTLE / 2)
    assert a.kind is Kind.SETTLING
    a = decide(view, a.memory, CFG, T0 + SETTLE)
    rec = check_plan(a, view)
    assert rec.old_members == OLD and rec.new_members == [tok("r0"), tok("r2")]
    assert rec.plan.mapping.dead == {1} and rec.plan.mapping.leaving == frozenset()
    assert a.memory.phases == {2: {"detect": SETTLE}}
    assert a.memory.seen is None and a.memory.detected_at is None and a.dead == ()


def test_second_failure_restarts_the_window_and_joins_the_plan() -> None:
    four = OLD + [tok("r3")]
    a = decide(steady_view(rank("r0"), rank("r2"), rank("r3"), members=four), Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.SETTLING
    both = steady_view(rank("r0"), rank("r3"), members=four)
    a = decide(both, a.memory, CFG, T0 + 0.5)
    assert a.kind is Kind.SETTLING and a.memory.seen == (("change", (1, 2), (), ()), T0 + 0.5)
    assert decide(both, a.memory, CFG, T0 + SETTLE).kind is Kind.SETTLING
    a = decide(both, a.memory, CFG, T0 + 0.5 + SETTLE)
    rec = check_plan(a, both)
    assert rec.new_members == [tok("r0"), tok("r3")] and rec.plan.mapping.dead == {1, 2}
    assert a.memory.phases[2]["detect"] == pytest.approx(0.5 + SETTLE), "detect counts from the first failure"


def test_drain_keeps_the_leaving_rank_as_a_source() -> None:
    view = steady_view(rank("r0"), rank("r1"), rank("r2", state="draining"))
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    rec = check_plan(a, view)
    assert rec.plan.mapping.leaving == {2} and rec.plan.mapping.dead == frozenset()
    assert rec.new_members == [tok("r0"), tok("r1")] and tok("r2") in rec.participants()
    assert rec.plan.bytes_by_route().get("disk", 0) == 0, "a draining rank's experts come from it"


def test_join_fills_the_new_rank_from_peers() -> None:
    view = steady_view(rank("r0"), rank("r1"), rank("r2"), rank("r3", "z", state="joining", node="n1"),
                       members=OLD)
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    rec = check_plan(a, view)
    assert rec.new_members == OLD + [tok("r3", "z")] and rec.plan.mapping.num_joining == 1
    assert "joining ['r3']" in rec.reason
    assert all(len(m) == 0 for m in rec.plan.missing) and rec.plan.bytes_by_route().get("disk", 0) == 0
    assert any(t.dst_rank == 3 for t in rec.plan.transfers), "the joiner receives slots"


def test_rank_registered_again_is_dead_and_joining() -> None:
    view = steady_view(rank("r0"), rank("r1", "b", state="joining"), rank("r2"), members=OLD)
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    rec = check_plan(a, view)
    assert rec.plan.mapping.dead == {1} and rec.plan.mapping.num_joining == 1
    assert rec.new_members == [tok("r0"), tok("r2"), tok("r1", "b")]


def test_too_few_ranks_is_reported_once() -> None:
    two = [tok("r0"), tok("r1")]
    view = steady_view(rank("r0"), members=two)
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.SETTLING
    a = decide(view, a.memory, CFG, T0 + SETTLE)
    assert a.kind is Kind.TOO_FEW_RANKS and a.report and a.record is None
    assert a.memory.shortage == 1 and "1 ranks x 4 slots cannot hold 8 experts" in a.reason
    a = decide(view, a.memory, CFG, T0 + SETTLE + 0.5)
    assert a.kind is Kind.TOO_FEW_RANKS and not a.report
    # A rank joins: a new change, a new window, then a plan.
    grown = steady_view(rank("r0"), rank("r2", state="joining"), members=two)
    a = decide(grown, a.memory, CFG, T0 + 2 * SETTLE)
    assert a.kind is Kind.SETTLING
    a = decide(grown, a.memory, CFG, T0 + 3 * SETTLE)
    assert check_plan(a, grown).new_members == [tok("r0"), tok("r2")] and a.memory.shortage is None


# -- no membership change ----------------------------------------------------------------
def test_steady_forgets_a_change_that_went_away() -> None:
    view = steady_view(rank("r0"), rank("r1"), rank("r2"))
    mem = Memory(last_rebalance=0.0, seen=(("change", (1,), (), ()), T0 - 0.1))
    a = decide(view, mem, CFG, T0)
    assert a.kind is Kind.STEADY and a.memory.seen is None and a.record is None and a.epoch == 1


IMBALANCED = replace(CFG, imbalance_threshold=0.99, rebalance_cooldown_s=60.0)


def test_imbalance_rebalances_in_place() -> None:
    # 3 ranks x 4 slots: 4 redundant slots for the policy to give the hot expert.
    view = steady_view(rank("r0"), rank("r1"), rank("r2"), loads=skewed_loads(["r0", "r1"], hot=5))
    assert view.committed is not None
    a = decide(view, Memory(last_rebalance=T0 - 61.0), IMBALANCED, T0)
    rec = check_plan(a, view)
    assert rec.plan.mapping.is_identity and rec.new_members == rec.old_members == view.committed.members
    assert rec.reason.startswith("load imbalance")
    load = np.ones((2, 8))
    load[:, 5] = 100.0
    assert balance(rec.placement, load) > balance(view.committed.placement, load)
    assert a.memory.phases == {2: {"detect": 0.0}}


def test_imbalance_waits_for_the_cooldown() -> None:
    view = steady_view(rank("r0"), rank("r1"), loads=skewed_loads(["r0", "r1"], hot=5))
    a = decide(view, Memory(last_rebalance=T0 - 59.0), IMBALANCED, T0)
    assert a.kind is Kind.STEADY and a.record is None


def test_balanced_as_well_as_the_policy_can() -> None:
    # 2 ranks x 4 slots hold 8 experts once each: nothing for the policy to move.
    view = steady_view(rank("r0"), rank("r1"))
    a = decide(view, Memory(last_rebalance=0.0), replace(IMBALANCED, imbalance_threshold=1.01), T0)
    assert a.kind is Kind.BALANCED and a.record is None and a.memory.last_rebalance == T0
    assert decide(view, a.memory, replace(IMBALANCED, imbalance_threshold=1.01), T0 + 1).kind is Kind.STEADY


# -- memory --------------------------------------------------------------------------------
def test_plan_sent_records_the_plan_phase_and_drops_older_epochs() -> None:
    mem = Memory(last_rebalance=0.0, sent={1: 5.0}, phases={1: {"detect": 0.1}, 2: {"detect": 0.4}})
    after = mem.plan_sent(2, at=9.0, plan_s=0.05)
    assert after.sent == {2: 9.0} and after.phases == {2: {"detect": 0.4, "plan": 0.05}}
    assert mem.plan_sent(3, at=9.0).phases == {} and mem.phases[2] == {"detect": 0.4}


def test_action_prints_kind_epoch_and_reason() -> None:
    a = Action(Kind.SETTLING, Memory(last_rebalance=0.0), epoch=4, reason="dead ['r1#a']")
    assert str(a) == "settling (epoch 4): dead ['r1#a']"


def test_published_placement_keeps_experts_in_their_slots() -> None:
    """Placement invariant on a published plan: an expert that stays on a surviving
    rank keeps its slot there."""
    view = steady_view(rank("r0"), rank("r2"), members=OLD)
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    rec = check_plan(a, view)
    old: ExpertPlacement = view.committed.placement  # type: ignore[union-attr]
    spr = MODEL.slots_per_rank
    for new_rank, old_rank in enumerate(rec.plan.mapping.new_to_old()):
        before = old.phy2log[:, old_rank * spr:(old_rank + 1) * spr]
        after = rec.placement.phy2log[:, new_rank * spr:(new_rank + 1) * spr]
        kept = [(layer, i) for layer in range(MODEL.num_layers) for i in range(spr)
                if before[layer, i] in after[layer]]
        assert all(after[layer, i] == before[layer, i] for layer, i in kept)


# -- bit-exactness, ack deadlines, bounded plans ------------------------------------------
def test_mismatched_ack_is_a_failure_never_committed() -> None:
    """r3 acked ok but found 2 slots not bit-exact: no commit; once it registers again
    its old member is dead, and the next plan reads nothing from it."""
    view = in_flight_view(OLD, R, 1, *R, acks={m: True for m in OLD + [tok("r3")]})
    view.acks[tok("r3")] = AckRecord(2, tok("r3"), True, mismatched=2)
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    assert a.kind is Kind.WAIT_FAILED and a.failed == (tok("r3"),) and a.record is None
    again = replace(view, ranks=ranks(R[0], R[1], R[2], rank("r3", "b", state="joining")))
    a = decide(again, a.memory, CFG, T0 + 1)
    rec = check_plan(a, again)
    assert a.kind is Kind.PUBLISH and a.dead == (tok("r3"),) and rec.plan.mapping.dead == {3}
    assert all(s.rank != 3 for t in rec.plan.transfers for s in t.sources), "a mismatched rank is never a source"


def test_a_mismatched_old_member_is_not_a_source_of_the_next_plan() -> None:
    """Old member r1 reported mismatches; after it registers again the plan refills its
    slots from the others (or disk) and never names old rank 1."""
    view = in_flight_view(OLD, R, 1, *R, acks={m: True for m in OLD + [tok("r3")]})
    view.acks[tok("r1")] = AckRecord(2, tok("r1"), True, mismatched=1)
    assert decide(view, Memory(last_rebalance=0.0), CFG, T0).kind is Kind.WAIT_FAILED
    again = replace(view, ranks=ranks(R[0], rank("r1", "b", state="joining"), R[2], R[3]))
    a = decide(again, Memory(last_rebalance=0.0), CFG, T0)
    rec = check_plan(a, again)
    assert rec.plan.mapping.dead == {1} and tok("r1", "b") in rec.new_members
    assert all(s.rank != 1 for t in rec.plan.transfers for s in t.sources)


def with_leases(view: ClusterView) -> ClusterView:
    return replace(view, leases={rid: 1000 + i for i, rid in enumerate(sorted(view.ranks))})


def test_ack_timeout_fences_the_silent_then_plans_without_them() -> None:
    view = with_leases(in_flight_view(OLD, R, 1, *R, acks={tok("r0"): True, tok("r1"): True, tok("r3"): True}))
    mem = Memory(last_rebalance=0.0, sent={2: T0})
    a = decide(view, mem, CFG, T0 + CFG.ack_timeout_s + 1)
    assert a.kind is Kind.ACK_TIMEOUT and a.ranks == (tok("r2"),) and a.leases == (view.leases["r2"],)
    assert "no ack within" in a.reason and a.record is None
    # The lease is revoked: r2's key is gone. The next pass plans without it, at once.
    fenced = replace(view, ranks=ranks(R[0], R[1], R[3]), leases={k: v for k, v in view.leases.items() if k != "r2"})
    a = decide(fenced, a.memory, CFG, T0 + CFG.ack_timeout_s + 2)
    rec = check_plan(a, fenced)
    assert a.dead == (tok("r2"),) and rec.plan.mapping.dead == {2}
    assert rec.new_members == [tok("r0"), tok("r1"), tok("r3")]


def test_a_failed_participant_that_never_registers_again_is_fenced() -> None:
    view = with_leases(in_flight_view(OLD, R, 1, *R, acks={m: True for m in OLD} | {tok("r3"): False}))
    mem = Memory(last_rebalance=0.0, sent={2: T0})
    assert decide(view, mem, CFG, T0 + 1).kind is Kind.WAIT_FAILED
    a = decide(view, mem, CFG, T0 + CFG.ack_timeout_s + 1)
    assert a.kind is Kind.ACK_TIMEOUT and a.ranks == (tok("r3"),) and a.leases == (view.leases["r3"],)


def test_joiners_are_capped_per_plan_oldest_registration_first() -> None:
    joiners = [rank(f"j{i:02d}", "z", state="joining") for i in range(20)]
    view = steady_view(rank("r0"), rank("r1"), rank("r2"), *joiners, members=OLD)
    # j19 registered first, then j18, ...: registration order, not id order, decides.
    view = replace(view, registered={r.id: 100 - i for i, r in enumerate(joiners)})
    cfg = replace(CFG, settle_s=0.0, max_joiners_per_plan=4)
    a = decide(view, Memory(last_rebalance=0.0), cfg, T0)
    rec = check_plan(a, view)
    assert rec.plan.mapping.num_joining == 4
    assert rec.new_members == OLD + [tok(f"j{i}", "z") for i in (16, 17, 18, 19)]


def test_bootstrap_takes_at_most_min_ranks_or_the_joiner_cap() -> None:
    view = ClusterView(ranks=ranks(*[rank(f"r{i:02d}") for i in range(40)]))
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0, max_joiners_per_plan=5), T0)
    assert a.kind is Kind.BOOTSTRAP and len(a.record.new_members) == 5
    a = decide(view, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0, min_ranks=8, max_joiners_per_plan=5), T0)
    assert a.kind is Kind.BOOTSTRAP and len(a.record.new_members) == 8


def test_the_joiner_cap_must_be_positive() -> None:
    from elastic_ep.errors import ConfigError

    with pytest.raises(ConfigError, match="max_joiners_per_plan"):
        replace(CFG, max_joiners_per_plan=0)


def test_load_of_a_rank_that_is_not_registered_is_not_counted() -> None:
    """A hot expert reported only by a rank that is not registered changes nothing."""
    ghost = ClusterView(ranks=ranks(rank("r0"), rank("r1"), rank("r2")), loads=skewed_loads(["ghost"], hot=5))
    a = decide(ghost, Memory(last_rebalance=0.0), replace(CFG, settle_s=0.0), T0)
    assert a.kind is Kind.BOOTSTRAP and (a.record.placement.logcnt[:, 5] == 1).all()


class _NodeSpy(RebalancePolicy):
    """min_migration, recording the node count ``decide`` passes."""

    name = "node_spy"

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    def place(self, old, mapping, load, carry, nodes=None):
        self.seen.append(nodes)
        return MinMigrationPolicy().place(old, mapping, load, carry, nodes)


def test_the_policy_gets_the_node_count_of_the_ranks_left() -> None:
    spy = _NodeSpy()
    cfg = replace(CFG, policy=spy, settle_s=0.0)
    four = [tok(r) for r in ("r0", "r1", "r2", "r3")]
    view = steady_view(rank("r0"), rank("r1", node="n1"), rank("r2", node="n1"), members=four)  # r3 (n2) died
    assert decide(view, Memory(last_rebalance=0.0), cfg, T0).kind is Kind.PUBLISH
    unlabeled = steady_view(rank("r0", node=""), rank("r1", node=""), rank("r2", node=""), members=four)
    decide(unlabeled, Memory(last_rebalance=0.0), cfg, T0)
    assert spy.seen == [2, None]
