"""One consistent read of a deployment's keys: what the controller decides on, and what
``elastic-ep status``, the demo and the chaos harness show and check.

Every value is parsed by its record type (:mod:`controller.records`); a value that does
not parse is left out of the view and listed in ``malformed`` (the caller reports it),
so a bad key never stops a reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from controller.etcd_client import call
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_id
from elastic_ep.errors import MalformedValueError


@dataclass
class ClusterView:
    """The deployment at one etcd revision.

    ``ranks``/``loads`` by rank id; ``acks`` by member token (``id#incarnation``), only
    those of the newest plan's epoch; ``malformed``: one message per value left out.
    Example: 4 ranks after the bootstrap plan committed at epoch 1 ->
    ``ClusterView(ranks={"r0": ..., ...}, epoch=1, plan=<epoch 1>, committed=<epoch 1>, acks={...})``.
    """

    ranks: dict[str, RankRecord] = field(default_factory=dict)
    loads: dict[str, LoadRecord] = field(default_factory=dict)
    epoch: int = 0
    plan: PlanRecord | None = None
    committed: CommitRecord | None = None
    acks: dict[str, AckRecord] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    leader: str | None = None

    def is_live(self, member: str) -> bool:
        """True while ``member`` (``id#incarnation``) is registered as that incarnation."""
        r = self.ranks.get(member_id(member))
        return r is not None and r.token == member

    @property
    def in_flight(self) -> bool:
        """A plan is published and not committed yet."""
        p, c = self.plan, self.committed
        return p is not None and (c is None or p.epoch > c.epoch)

    def rank_of(self, rank_id: str) -> int | None:
        """The rank ``rank_id``'s current registration holds in the committed placement."""
        r, c = self.ranks.get(rank_id), self.committed
        if r is None or c is None or r.token not in c.members:
            return None
        return c.members.index(r.token)


def read_view(client: Any, root: str, on_malformed: Callable[[str, MalformedValueError], None] | None = None) -> ClusterView:
    """Read every key under ``root`` in one range (one revision) and parse it.

    ``on_malformed(key, error)`` is called for each value left out (for logs and metrics).
    """
    kvs = call(client.get_prefix, f"read {root}", root + "/")
    raw = {meta.key.decode(): value for value, meta in kvs}
    view = ClusterView()

    def parse(key: str, fn: Callable[[str, bytes], Any]) -> Any:
        try:
            return fn(key, raw[key])
        except MalformedValueError as e:
            view.malformed.append(str(e))
            if on_malformed is not None:
                on_malformed(key, e)
            return None

    for key in raw:
        rel = key[len(root) + 1:]
        if rel.startswith("ranks/") and (r := parse(key, RankRecord.parse)) is not None:
            view.ranks[r.id] = r
        elif rel.startswith("load/") and (ld := parse(key, LoadRecord.parse)) is not None:
            view.loads[ld.id] = ld
    if f"{root}/epoch" in raw:
        view.epoch = parse(f"{root}/epoch", _parse_epoch) or 0
    if f"{root}/plan" in raw:
        view.plan = parse(f"{root}/plan", PlanRecord.parse)
    if f"{root}/committed" in raw:
        view.committed = parse(f"{root}/committed", CommitRecord.parse)
    if (leader := raw.get(f"{root}/leader")) is not None:
        view.leader = leader.decode(errors="replace")
    if view.plan is not None:
        prefix = f"{root}/acks/"
        for key in raw:
            if key.startswith(prefix) and (a := parse(key, AckRecord.parse)) is not None and a.epoch == view.plan.epoch:
                view.acks[a.id] = a
    return view


def _parse_epoch(key: str, raw: bytes) -> int:
    try:
        epoch = int(raw)
    except ValueError:
        raise MalformedValueError(f"{key}: not an integer: {raw[:40]!r}") from None
    if epoch < 0:
        raise MalformedValueError(f"{key}: negative epoch {epoch}")
    return epoch
