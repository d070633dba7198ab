"""The invariants checker the demo, the chaos harness and the tests share, on hand-built
views: it passes a correct commit and names each broken invariant."""

from __future__ import annotations

import numpy as np
import pytest

from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_token
from controller.view import ClusterView
from elastic_ep.core.placement import ExpertPlacement, initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.tools.invariants import InvariantError, check_commit, require, slots_moved_inside_ranks

EB = 1000  # bytes per expert


def _committed_view(seed: int = 0, disk_bytes: int | None = None, mismatched: int = 0) -> ClusterView:
    """3 ranks x 4 slots, 8 experts; rank 1 died; the min_migration plan committed at epoch 2."""
    rng = np.random.default_rng(seed)
    old = initial_placement(2, 8, 3, 4)
    mapping = RankMapping.build(3, dead=[1])
    new = get_policy("min_migration").rebalance(old, mapping, rng.random((2, 8)) + 0.1)
    plan = build_plan(old, new, mapping, EB, epoch=2)
    old_members = [member_token(f"r{i}", "a") for i in range(3)]
    new_members = [old_members[0], old_members[2]]
    missing = sum(len(m) for m in plan.missing)
    acks = {}
    for m in new_members:
        disk = (missing * EB if disk_bytes is None else disk_bytes) if m == new_members[0] else 0
        acks[m] = AckRecord(2, m, True, {"disk": disk}, mismatched=mismatched if m == new_members[1] else 0)
    ranks = {f"r{i}": RankRecord(f"r{i}", "h", "cpu", "", "active", incarnation="a") for i in (0, 2)}
    return ClusterView(
        ranks=ranks, loads={"r0": LoadRecord("r0", [[0.0] * 8] * 2, 1.0, {"ok": 5}, [1, 2])}, epoch=2,
        plan=PlanRecord(2, "ctl", old_members, new_members, plan, new),
        committed=CommitRecord(2, new_members, new), acks=acks,
    )


def test_a_correct_commit_passes_every_check() -> None:
    checks = check_commit(_committed_view(), exact_disk=True, epochs_seen=[1, 2])
    assert len(checks) >= 8
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    require(checks)


@pytest.mark.parametrize(
    ("view_args", "broken"),
    [
        ({"mismatched": 2}, "bit-exact"),
        ({"disk_bytes": 1}, "bytes read from disk"),
    ],
)
def test_a_broken_invariant_is_named(view_args: dict, broken: str) -> None:
    checks = check_commit(_committed_view(**view_args), exact_disk=True)
    failed = [c.name for c in checks if not c.ok]
    assert len(failed) == 1 and broken in failed[0], failed
    with pytest.raises(InvariantError, match=broken):
        require(checks)


def test_missing_ack_epoch_order_and_wrong_bytes_are_caught() -> None:
    v = _committed_view()
    v.acks.pop(next(iter(v.acks)))
    v.loads["r2"] = LoadRecord("r2", [[0.0] * 8] * 2, 1.0, {"ok": 1, "bad": 3}, [2, 1])
    failed = " | ".join(c.name for c in check_commit(v, epochs_seen=[1, 3, 2]) if not c.ok)
    for name in ("every member acked ok", "epochs seen by each rank only increase", "only correct expert bytes",
                 "epochs only increase"):
        assert name in failed, failed


def test_an_expert_shuffled_inside_a_rank_is_counted() -> None:
    v = _committed_view()
    plan = v.plan.plan
    assert slots_moved_inside_ranks(plan) == 0
    # Swap two experts that new rank 0 keeps in layer 0: both stay on the rank, each changes slot.
    kept = np.flatnonzero(plan.mapping.carry_over(plan.old)[0, :4] == plan.new.phy2log[0, :4])
    assert len(kept) >= 2, kept
    phy = plan.new.phy2log.copy()
    phy[0, kept[:2]] = phy[0, kept[1::-1]]
    swapped = ExpertPlacement(phy, 4, 8)
    shuffled = build_plan(plan.old, swapped, plan.mapping, EB, epoch=2)
    assert slots_moved_inside_ranks(shuffled) == 2


def test_no_commit_is_a_failed_check() -> None:
    checks = check_commit(ClusterView())
    assert [c.ok for c in checks] == [False]
