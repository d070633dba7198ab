"""What the host-memory mirrors of a deployment cover: which mirror rows are ready to be
read, each rank's mirror memory, and the single node (or rank) whose loss would still
read the most experts from disk. The controller plans from :func:`ready_mirrors`;
``elastic-ep status``, the metrics and the demo show :func:`mirror_coverage`.

A mirror row counts as ready only when the rank that the committed assignment gives it
to reports, under its live registration, that very row holding that very expert: a row
reported with another expert (stale, being rewritten) or not reported is never planned.
Ranks fill and keep the committed assignment only (a plan's assignment takes effect at
its commit), so no row planned this way is rewritten before the plan ends, but for the
one being written when the plan arrived: the executor keeps a slot read from a mirror
only if its row is still reported with that expert after the read.

Example::

    view = read_view(client, root)
    cov = mirror_coverage(view)     # Coverage(ready=96, pending=0, worst_label="node-1", worst_experts=0, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from elastic_ep.core.mirrors import MirrorAssignment, worst_domain_loss

from controller.records import member_id
from controller.view import ClusterView


def ready_mirrors(view: ClusterView, members: list[str]) -> MirrorAssignment | None:
    """The mirror rows a plan from a placement of ``members`` (``members[r]``: the token
    of rank ``r``) may read, in that numbering: those the *committed* assignment gives a
    rank (the one every rank fills and keeps until the next commit) whose live
    registration reports the row ready with that very expert. None without mirrors."""
    c = view.committed
    if c is None or c.mirrors is None:
        return None
    reports = view.read_mirrors()
    rank, row = c.mirrors.rank.copy(), c.mirrors.row.copy()
    num_logical = rank.shape[1]
    where = {t: i for i, t in enumerate(members)}
    renumber = np.full(len(c.members) + 1, -1, dtype=np.int64)  # the last entry maps -1
    for r, m in enumerate(c.members):
        rep = reports.get(member_id(m))
        mine = rank == r
        if rep is None or rep.token != m or m not in where:
            rank[mine] = -1
            continue
        renumber[r] = where[m]
        lay, log_ = np.nonzero(mine)
        reported = np.append(rep.rows, -1)  # a row past the report's end reads -1
        held = reported[np.minimum(row[lay, log_], len(rep.rows))]
        stale = held != lay * num_logical + log_
        rank[lay[stale], log_[stale]] = -1
    rank = renumber[np.where(rank >= 0, rank, len(c.members))]
    row[rank < 0] = -1
    return MirrorAssignment(rank.astype(np.int32), row.astype(np.int32))


@dataclass(frozen=True)
class RankMirror:
    """One rank's mirror: ``rows`` offered (its registration), ``assigned`` by the
    committed record, ``ready`` of those reported ready.
    Example: ``RankMirror("rank-3", "node-0", rows=24, assigned=16, ready=16)``."""

    id: str
    node: str
    rows: int
    assigned: int
    ready: int


@dataclass(frozen=True)
class Coverage:
    """The committed placement's mirrors: ``assigned``/``ready``/``pending`` rows over
    every rank; ``worst_label`` (a node label, or a rank id where ranks carry none), the
    fault domain whose loss leaves the most experts with neither a GPU replica nor a
    ready mirror elsewhere: ``worst_experts`` of them; ``per_domain``: that count for
    every domain. ``domain_kind`` is ``node`` or ``rank``.
    Example: ``Coverage(ranks=[...], assigned=96, ready=96, pending=0, domain_kind="node",
    worst_label="node-1", worst_experts=0, per_domain={"node-0": 0, "node-1": 0})``."""

    ranks: list[RankMirror] = field(default_factory=list)
    assigned: int = 0
    ready: int = 0
    pending: int = 0
    domain_kind: str = "node"
    worst_label: str = ""
    worst_experts: int = 0
    per_domain: dict[str, int] = field(default_factory=dict)

    def to_dict(self, expert_bytes: int) -> dict[str, object]:
        return {
            "ranks": [{"id": r.id, "node": r.node, "rows": r.rows, "bytes": r.rows * expert_bytes,
                       "assigned": r.assigned, "ready": r.ready} for r in self.ranks],
            "assigned": self.assigned, "ready": self.ready, "pending": self.pending,
            "worst_loss": {"kind": self.domain_kind, "label": self.worst_label, "experts": self.worst_experts,
                           "bytes": self.worst_experts * expert_bytes},
            "per_domain": self.per_domain,
        }


def mirror_coverage(view: ClusterView) -> Coverage:
    """The coverage of the committed placement (an empty one before any commit)."""
    c = view.committed
    if c is None:
        return Coverage()
    members = list(c.members)
    ids = [member_id(m) for m in members]
    labels = [view.ranks[i].node if i in view.ranks else "" for i in ids]
    ready = ready_mirrors(view, members)
    none = np.zeros(len(ids), dtype=np.int64)
    assigned = c.mirrors.per_rank(len(ids)) if c.mirrors is not None else none
    got = ready.per_rank(len(ids)) if ready is not None else none
    ranks = [RankMirror(rid, labels[r], view.ranks[rid].mirror_rows if rid in view.ranks else 0,
                        int(assigned[r]), int(got[r])) for r, rid in enumerate(ids)]
    loss = worst_domain_loss(c.placement, labels, ready)
    # An unlabeled rank is a domain of its own: name it by its id.
    per_domain = {(_domain_name(k, ids)): int(v) for k, v in loss.per_domain.items()}
    return Coverage(ranks, sum(x.assigned for x in ranks), sum(x.ready for x in ranks),
                    sum(x.assigned - x.ready for x in ranks), "node" if any(labels) else "rank",
                    _domain_name(loss.label, ids), int(loss.experts), per_domain)


def mirrors_filled(view: ClusterView) -> Coverage | None:
    """The coverage once every mirror row the commit assigns is ready, else None: what
    a tool waits for before it takes a node down."""
    cov = mirror_coverage(view)
    return cov if cov.pending == 0 else None


def _domain_name(label: str, ids: list[str]) -> str:
    """``rank <r>`` (the core's name of an unlabeled rank's domain) as that rank's id."""
    if label.startswith("rank "):
        r = int(label.split()[1])
        return ids[r] if 0 <= r < len(ids) else label
    return label
