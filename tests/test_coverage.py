"""Which mirror rows a plan may read (controller/coverage.py): only a row the committed
assignment gives its rank, reported ready with that very expert by that rank's live
registration. Stale rows, unready rows, rows past a report's end, reports of another
incarnation or of a dead rank are never sources; the worst node loss counts only what
is ready."""

from __future__ import annotations

import numpy as np

from controller.coverage import mirror_coverage, ready_mirrors
from controller.records import CommitRecord, MirrorRecord, RankRecord
from controller.view import ClusterView
from elastic_ep.core.mirrors import MirrorAssignment
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.rank_mapping import RankMapping

# 4 ranks x 2 slots, one layer of 4 experts; r0, r1 on node a, r2, r3 on node b.
PLACEMENT = ExpertPlacement(np.array([[0, 1, 0, 1, 2, 3, 2, 3]]), 2, 4)
MEMBERS = ["r0#a", "r1#a", "r2#a", "r3#a"]
NODES = ["a", "a", "b", "b"]
# Experts 0 and 1 live on node a only: mirrored on r2 rows 0 and 1; 2 and 3 on r0.
ASSIGNED = MirrorAssignment(np.array([[2, 2, 0, 0]], dtype=np.int32), np.array([[0, 1, 0, 1]], dtype=np.int32))
R0 = MirrorRecord("r0#a", np.array([2, 3]))
# Node a lost: r2 and r3 keep experts 2 and 3 and take 0 and 1.
AFTER = ExpertPlacement(np.array([[2, 0, 1, 3]]), 2, 4)


def view(reports: dict[str, MirrorRecord], live: list[str] = MEMBERS) -> ClusterView:
    reports = {"r0": R0, **reports}
    v = ClusterView()
    for tok, node in zip(MEMBERS, NODES):
        if tok in live:
            rid, inc = tok.split("#")
            v.ranks[rid] = RankRecord(rid, "h", "cpu", node, "active", incarnation=inc, mirror_rows=2)
    v.mirrors = dict(reports)
    v.committed = CommitRecord(1, MEMBERS, PLACEMENT, mirrors=ASSIGNED, expert_bytes=100)
    return v


def ready_of(v: ClusterView) -> list[int]:
    r = ready_mirrors(v, MEMBERS)
    assert r is not None
    return r.rank[0].tolist()


def test_a_row_reported_ready_with_its_expert_is_a_source() -> None:
    v = view({"r2": MirrorRecord("r2#a", np.array([0, 1]))})
    assert ready_of(v) == [2, 2, 0, 0]
    cov = mirror_coverage(v)
    assert (cov.ready, cov.pending, cov.worst_experts, cov.domain_kind) == (4, 0, 0, "node")
    # Node a lost: both its experts come from r2's mirror (r2's own, then r3's read of it).
    plan = build_plan(PLACEMENT, AFTER, RankMapping.build(4, dead=[0, 1]), 100,
                      mirrors=ready_mirrors(v, MEMBERS))
    assert [(t.logical, t.route, t.sources[0].rank) for t in plan.transfers] == [(0, "mirror", 2), (1, "mirror", 2)]
    assert plan.bytes_by_route()["disk"] == 0 and not any(plan.missing)


def test_stale_unready_and_foreign_rows_are_never_sources() -> None:
    cases = {
        "not reported": {},
        "row holds another expert (stale)": {"r2": MirrorRecord("r2#a", np.array([3, 2]))},
        "rows empty (being written)": {"r2": MirrorRecord("r2#a", np.array([-1, -1]))},
        "report shorter than the rows": {"r2": MirrorRecord("r2#a", np.array([], dtype=np.int64))},
        "another incarnation's report": {"r2": MirrorRecord("r2#old", np.array([0, 1]))},
    }
    for what, reports in cases.items():
        v = view(reports)
        assert ready_of(v) == [-1, -1, 0, 0], what
        cov = mirror_coverage(v)
        assert (cov.ready, cov.pending, cov.worst_label, cov.worst_experts) == (2, 2, "a", 2), what
        plan = build_plan(PLACEMENT, AFTER, RankMapping.build(4, dead=[0, 1]), 100,
                          mirrors=ready_mirrors(v, MEMBERS))
        assert plan.missing == ((0, 1),) and plan.bytes_by_route()["mirror"] == 0, what


def test_one_ready_row_of_two_covers_one_expert() -> None:
    v = view({"r2": MirrorRecord("r2#a", np.array([-1, 1]))})
    assert ready_of(v) == [-1, 2, 0, 0]
    cov = mirror_coverage(v)
    assert (cov.ready, cov.pending, cov.worst_experts, cov.per_domain) == (3, 1, 1, {"a": 1, "b": 0})


def test_a_dead_ranks_mirror_is_not_a_source() -> None:
    v = view({"r2": MirrorRecord("r2#a", np.array([0, 1]))})
    # r0 dies with node b alive: experts 0 and 1 still have r1; r0's mirrors of 2, 3 are gone with it.
    plan = build_plan(PLACEMENT, ExpertPlacement(np.array([[2, 3, 0, 1, 2, 3]]), 2, 4),
                      RankMapping.build(4, dead=[0]), 100, mirrors=ready_mirrors(v, MEMBERS))
    assert plan.transfers and all(s.rank != 0 for t in plan.transfers for s in t.sources[:-1])


def test_ready_rows_follow_their_tokens_into_another_numbering() -> None:
    # A plan built on a finished, uncommitted plan: its members r2, r3, j9 (a joiner).
    v = view({"r2": MirrorRecord("r2#a", np.array([0, 1]))})
    r = ready_mirrors(v, ["r2#a", "r3#a", "j9#b"])
    assert r is not None and r.rank[0].tolist() == [0, 0, -1, -1] and r.row[0].tolist() == [0, 1, -1, -1]
    # The ranks fill the committed assignment only: a member it does not name has nothing ready.
    assert ready_mirrors(v, ["j9#b"]).count() == 0
