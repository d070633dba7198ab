"""The invariants of docs/DESIGN.md, checked on one read of a deployment after a commit.
The demo prints them, the chaos harness fails a schedule on the first one broken, and
the tests assert them; all three call :func:`check_commit`.

Example::

    view = read_view(client, root, whole_plan=True, loads=True)
    checks = check_commit(view, exact_disk=True)
    require(checks)          # raises InvariantError naming the first broken one
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.view import ClusterView
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan
from elastic_ep.errors import ElasticEPError


class InvariantError(ElasticEPError):
    """A deployment's state breaks an invariant of docs/DESIGN.md."""


@dataclass(frozen=True)
class Check:
    """One invariant's verdict: ``Check("epoch 3: epochs only increase", True, "")``."""

    name: str
    ok: bool
    detail: str = ""


def require(checks: list[Check]) -> None:
    """Raise :class:`InvariantError` for the first check that failed."""
    for c in checks:
        if not c.ok:
            raise InvariantError(f"{c.name}: {c.detail}" if c.detail else c.name)


def check_commit(view: ClusterView, exact_disk: bool = False, epochs_seen: list[int] | None = None) -> list[Check]:
    """Every invariant that one read after a commit can show.

    ``exact_disk``: also require that the bytes read from disk equal the missing
    experts' bytes (true of a plan that ran without a source dying mid-transfer).
    ``epochs_seen``: the epochs an observer saw published, which must only increase.
    """
    c = view.committed
    if c is None:
        return [Check("a placement is committed", False, "no committed record")]
    out: list[Check] = []

    def add(name: str, ok: bool, detail: str = "") -> None:
        out.append(Check(f"epoch {c.epoch}: {name}", bool(ok), "" if ok and not detail else detail))

    add(*_valid("every logical expert has a replica; every rank holds slots_per_rank slots", c.placement.validate))
    p = view.plan
    plan = p.plan if p is not None and p.epoch == c.epoch else None
    if p is not None and p.epoch == c.epoch and not p.bootstrap:
        add("the committed plan's chunks were read whole", plan is not None,
            "" if plan is not None else f"read the view with whole_plan=True; {view.plan_error or 'not read'}")
        add("the committed placement is the plan's", c.placement == p.placement and c.members == p.new_members)
    if plan is not None:
        add(*_valid("no transfer reads from a dead rank; disk only for experts with neither a live replica nor a "
                    "ready mirror", plan.validate))
        moved = slots_moved_inside_ranks(plan)
        add("an expert that stays on a rank keeps its slot", moved == 0, f"{moved} experts changed slot inside a rank")
        if exact_disk:
            disk = sum(a.bytes.get("disk", 0) for a in view.acks.values())
            missing = sum(len(m) for m in plan.missing)
            add("bytes read from disk equal the bytes of the experts with neither a live replica nor a ready mirror",
                disk == missing * plan.expert_bytes,
                f"{disk} B from disk, {missing} missing experts x {plan.expert_bytes} B")
    acks = view.acks if p is not None and p.epoch == c.epoch else {}
    unacked = [m for m in c.members if m not in acks or not acks[m].ok]
    bad = {m: acks[m].mismatched for m in c.members if m in acks and acks[m].mismatched > 0}
    add("every member acked ok", not unacked, f"no ok ack from {unacked}" if unacked else "")
    add("every slot bit-exact with the checkpoint", not bad, f"slots not exact: {bad}" if bad else "")
    out += _rank_checks(view, c.epoch)
    if epochs_seen is not None:
        add("epochs only increase", epochs_seen == sorted(set(epochs_seen)), f"seen {epochs_seen}")
    return out


def _valid(name: str, validate: object) -> tuple[str, bool, str]:
    try:
        validate()  # type: ignore[operator]
    except ElasticEPError as e:
        return name, False, str(e)
    return name, True, ""


def _rank_checks(view: ClusterView, epoch: int) -> list[Check]:
    """What ranks report in their load records: epochs seen in order, requests served
    only from correct bytes."""
    order = {rid: ld.epochs for rid, ld in view.loads.items()
             if ld.epochs != sorted(ld.epochs) or len(set(ld.epochs)) != len(ld.epochs)}
    wrong = {rid: ld.served.get("bad", 0) for rid, ld in view.loads.items() if ld.served.get("bad", 0)}
    ok = sum(ld.served.get("ok", 0) for ld in view.loads.values())
    return [
        Check(f"epoch {epoch}: epochs seen by each rank only increase", not order,
              f"out of order: {order}" if order else ""),
        Check(f"epoch {epoch}: requests saw only correct expert bytes", not wrong,
              f"wrong bytes served by {wrong}" if wrong else f"{ok} expert hits checked"),
    ]


def slots_moved_inside_ranks(plan: TransferPlan) -> int:
    """Logical experts a rank holds before and after ``plan`` whose slot changed (0 for
    a plan that keeps every expert that stays on a rank in its slot)."""
    carried = plan.mapping.carry_over(plan.old)
    return int(sum(_moved(carried[layer], plan.new, layer) for layer in range(plan.new.num_layers)))


def _moved(carried: np.ndarray, new: ExpertPlacement, layer: int) -> int:
    spr = new.slots_per_rank
    old_rows = carried.reshape(-1, spr)
    new_rows = new.phy2log[layer].reshape(-1, spr)
    moved = 0
    for row_old, row_new in zip(old_rows, new_rows):
        both = set(row_old.tolist()) & set(row_new.tolist()) - {-1}
        kept = set(row_old[row_old == row_new].tolist())
        moved += len(both - kept)
    return moved
