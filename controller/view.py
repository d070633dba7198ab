"""One consistent read of a deployment's keys: what the controller decides on, and what
``elastic-ep status``, the demo and the chaos harness show and check.

Every value is parsed by its record type (:mod:`controller.records`); a value that does
not parse, a rank registered without a lease, or a key where no record belongs is left
out of the view and listed in ``malformed`` (the caller reports it), so no value stops
a reader: :func:`read_view` raises only when etcd cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from controller.etcd_client import read_ranges
from controller.records import (
    AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_id, parse_epoch, parse_leader,
)
from elastic_ep.errors import MalformedValueError


@dataclass
class ClusterView:
    """The deployment at one etcd revision.

    ``ranks``/``loads`` by rank id; ``acks`` by member token (``id#incarnation``), only
    those of the newest plan's epoch; ``malformed``: one message per value left out.
    ``epoch``: the newest epoch known, the largest of the ``epoch`` key's value and the
    plan's and commit's epochs (a malformed ``epoch`` value counts as absent).
    Example: 4 ranks after the bootstrap plan committed at epoch 1 ->
    ``ClusterView(ranks={"r0": ..., ...}, epoch=1, plan=<epoch 1>, committed=<epoch 1>, acks={...},
    leases={"r0": 7587..., ...}, registered={"r0": 12, ...}, epoch_revision=31)``.
    """

    ranks: dict[str, RankRecord] = field(default_factory=dict)
    loads: dict[str, LoadRecord] = field(default_factory=dict)
    epoch: int = 0
    plan: PlanRecord | None = None
    committed: CommitRecord | None = None
    acks: dict[str, AckRecord] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    leader: str | None = None
    leases: dict[str, int] = field(default_factory=dict)
    """Rank id -> the lease its key is held under (revoking it fences the rank)."""
    registered: dict[str, int] = field(default_factory=dict)
    """Rank id -> its key's create revision: the order in which ranks registered."""
    epoch_revision: int = 0
    """The ``epoch`` key's mod revision as read (0: absent), whatever its value: every
    fenced write of the leader requires it unchanged."""

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


OnMalformed = Callable[[str, MalformedValueError], None]
ParseCache = dict[tuple[str, int], Any]
"""(key, mod revision) -> its record, or the MalformedValueError it raised: a value at a
mod revision never changes, so a reader that keeps the cache parses each value once."""
_PREFIXES = ("ranks", "load", "acks")
_KEYS = ("epoch", "plan", "committed", "leader")


class _Reader:
    """Parses the values of one read into a view; every failure becomes an entry of
    ``view.malformed`` and a call of ``on_malformed``, never an exception."""

    def __init__(self, view: ClusterView, on_malformed: OnMalformed | None, cache: ParseCache | None) -> None:
        self.view, self.on_malformed, self.cache = view, on_malformed, cache
        self.used: ParseCache = {}

    def report(self, e: MalformedValueError) -> None:
        self.view.malformed.append(str(e))
        if self.on_malformed is not None:
            self.on_malformed(e.key, e)

    def parse(self, fn: Callable[..., Any], value: bytes, meta: Any) -> Any:
        key, rev = meta.key.decode("utf-8", "replace"), meta.mod_revision
        out = self.cache.get((key, rev)) if self.cache is not None else None
        if out is None:
            out = parse_value(fn, key, value, rev)
        self.used[(key, rev)] = out
        if isinstance(out, MalformedValueError):
            self.report(out)
            return None
        return out

    def refuse(self, meta: Any, what: str) -> None:
        key = meta.key.decode("utf-8", "replace")
        self.report(MalformedValueError(f"{key}: {what}", key, meta.mod_revision))

    def owned(self, fn: Callable[..., Any], prefix: str, value: bytes, meta: Any, owner: Callable[[Any], str]) -> Any:
        """The record of a rank's own key ``<prefix><id>``; a record below a longer key
        (``ranks/x/r0``) would shadow the real one, so it is refused."""
        rec = self.parse(fn, value, meta)
        if rec is not None and meta.key.decode("utf-8", "replace") != prefix + owner(rec):
            self.refuse(meta, f"a record of rank {owner(rec)!r} below its key; it belongs at {prefix}{owner(rec)}")
            return None
        return rec


def parse_value(fn: Callable[..., Any], key: str, value: bytes, rev: int) -> Any:
    """``fn(key, value, rev)``, or the MalformedValueError that says why not (whatever
    the parser raised): the one step every reader of etcd values goes through."""
    try:
        return fn(key, value, rev)
    except MalformedValueError as e:
        e.key, e.revision = key, rev
        return e
    except Exception as e:  # last resort: no value may stop a reader
        return MalformedValueError(f"{key}: {type(e).__name__}: {str(e)[:200]}", key, rev)


def read_view(client: Any, root: str, on_malformed: OnMalformed | None = None,
              cache: ParseCache | None = None) -> ClusterView:
    """Read the deployment's keys under ``root`` at one revision and parse them.

    ``on_malformed(key, error)`` is called for each value left out (for logs and
    metrics); ``error.revision`` is the value's mod revision. ``cache``, kept by a
    caller that reads again and again, spares parsing values that did not change (it
    is left holding this read's values). Scratch keys (``store/``) are not read.
    Raises only :class:`~elastic_ep.errors.EtcdUnavailableError` (or ``PermissionError``)
    when etcd cannot be read.
    """
    ranges = read_ranges(client, f"read {root}", [f"{root}/{p}/" for p in _PREFIXES], [f"{root}/{k}" for k in _KEYS])
    ranks, loads, acks, epoch, plan, committed, leader = ranges
    view = ClusterView()
    r = _Reader(view, on_malformed, cache)
    _read_ranks(r, f"{root}/ranks/", ranks)
    for value, meta in loads:
        if (ld := r.owned(LoadRecord.parse, f"{root}/load/", value, meta, lambda x: x.id)) is not None:
            view.loads[ld.id] = ld
    for value, meta in epoch:
        view.epoch_revision = meta.mod_revision
        view.epoch = r.parse(parse_epoch, value, meta) or 0
    for value, meta in plan:
        view.plan = r.parse(PlanRecord.parse, value, meta)
    for value, meta in committed:
        view.committed = r.parse(CommitRecord.parse, value, meta)
    for value, meta in leader:
        view.leader = r.parse(parse_leader, value, meta)
    view.epoch = max([view.epoch] + [rec.epoch for rec in (view.plan, view.committed) if rec is not None])
    if view.plan is not None:
        for value, meta in acks:
            a = r.owned(AckRecord.parse, f"{root}/acks/", value, meta, lambda x: member_id(x.id))
            if a is not None and a.epoch == view.plan.epoch:
                view.acks[a.id] = a
    if cache is not None:
        cache.clear()
        cache.update(r.used)
    return view


def _read_ranks(r: _Reader, prefix: str, kvs: list[tuple[bytes, Any]]) -> None:
    """Registrations: a record under the rank's own key, held by a lease."""
    for value, meta in kvs:
        rec = r.owned(RankRecord.parse, prefix, value, meta, lambda x: x.id)
        if rec is None:
            continue
        if not meta.lease_id:
            r.refuse(meta, "registered without a lease; a rank puts its key under its own lease, so that the key "
                           "goes when the rank does (it is ignored until then)")
        else:
            r.view.ranks[rec.id] = rec
            r.view.leases[rec.id] = meta.lease_id
            r.view.registered[rec.id] = meta.create_revision
