"""One consistent read of a deployment's keys: what the controller decides on, and what
``elastic-ep status``, the demo and the chaos harness show and check.

Every value is parsed by its record type (:mod:`controller.records`); a value that does
not parse, a rank registered without a lease, or a key where no record belongs is left
out of the view and listed in ``malformed`` (the caller reports it), so no value stops
a reader: :func:`read_view` raises only when etcd cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from controller import plan_chunks
from controller.etcd_client import KeptMeta, call, read_ranges_since
from controller.records import (
    AckRecord, CommitRecord, LoadRecord, MirrorRecord, PlanRecord, RankRecord, RoutingRecord, SuspectRecord, member_id, parse_epoch,
    parse_leader,
)
from elastic_ep.errors import ElasticEPError, MalformedValueError


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
    """Load windows by rank id, once read: :func:`read_view` leaves them to
    :meth:`read_loads` (at 256 ranks they are megabytes, needed only to plan)."""
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
    routing: RoutingRecord | None = None
    """Members of the committed epoch that serving routes around until the next commit."""
    suspects: list[SuspectRecord] = field(default_factory=list)
    """Reports that a live member may be dead, by live reporters (see :mod:`controller.suspicion`)."""
    plan_error: str = ""
    """Why the plan's chunks could not be read whole, when that was asked and failed."""
    load_reader: Callable[[], dict[str, LoadRecord]] | None = field(default=None, repr=False, compare=False)
    mirrors: dict[str, MirrorRecord] = field(default_factory=dict)
    """Host-memory mirror reports by rank id, once read (:meth:`read_mirrors`): only
    those of live registrations, under their current leases."""
    mirror_reader: Callable[[], dict[str, MirrorRecord]] | None = field(default=None, repr=False, compare=False)

    def read_loads(self) -> dict[str, LoadRecord]:
        """The load windows: read now (in pages) if this view has not read them yet."""
        if self.load_reader is not None:
            reader, self.load_reader = self.load_reader, None
            self.loads.update(reader())
        return self.loads

    def read_mirrors(self) -> dict[str, MirrorRecord]:
        """The mirror reports: read now (in pages) if this view has not read them yet."""
        if self.mirror_reader is not None:
            reader, self.mirror_reader = self.mirror_reader, None
            self.mirrors.update(reader())
        return self.mirrors

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
_PREFIXES = ("ranks", "acks", "suspects")
LOAD_PAGE = 8
"""Load windows per ranged read: 8 DeepSeek-V3 or Kimi-K2 windows stay well under 1 MiB."""
_KEYS = ("epoch", "plan", "committed", "leader", "routing")


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
              cache: ParseCache | None = None, whole_plan: bool = False, loads: bool = False) -> ClusterView:
    """Read the deployment's keys under ``root`` at one revision and parse them.

    ``on_malformed(key, error)`` is called for each value left out (for logs and
    metrics); ``error.revision`` is the value's mod revision. ``cache``, kept by a
    caller that reads again and again, spares parsing values that did not change (it
    is left holding this read's values). Scratch keys (``store/``) are not read.
    Load windows are read by :meth:`ClusterView.read_loads` when first asked for (in
    pages of :data:`LOAD_PAGE`, at the revision of the first page), or now with ``loads``.
    ``whole_plan``: also read the plan's chunks (every participant's part, for tools
    that check a plan; the controller and the agents never need them all); a chunk
    that cannot be read leaves ``view.plan.plan`` None and says why in ``plan_error``.
    Raises only :class:`~elastic_ep.errors.EtcdUnavailableError` (or ``PermissionError``)
    when etcd cannot be read.
    """
    ranks, acks, suspects, epoch, plan, committed, leader, routing = _read(client, root, cache)
    view = ClusterView()
    r = _Reader(view, on_malformed, cache)
    _read_ranks(r, f"{root}/ranks/", ranks)
    view.load_reader = lambda: _read_loads(r, client, f"{root}/load/")
    view.mirror_reader = lambda: _read_mirrors(r, client, f"{root}/mirrors/")
    for value, meta in epoch:
        view.epoch_revision = meta.mod_revision
        view.epoch = r.parse(parse_epoch, value, meta) or 0
    for value, meta in plan:
        view.plan = r.parse(PlanRecord.parse, value, meta)
    for value, meta in committed:
        view.committed = r.parse(CommitRecord.parse, value, meta)
    for value, meta in leader:
        view.leader = r.parse(parse_leader, value, meta)
    for value, meta in routing:
        view.routing = r.parse(RoutingRecord.parse, value, meta)
    view.epoch = max([view.epoch] + [rec.epoch for rec in (view.plan, view.committed) if rec is not None])
    if view.plan is not None:
        for value, meta in acks:
            a = r.owned(AckRecord.parse, f"{root}/acks/", value, meta, lambda x: member_id(x.id))
            if a is not None and a.epoch == view.plan.epoch:
                view.acks[a.id] = a
    _read_suspects(r, f"{root}/suspects/", suspects)
    if cache is not None:
        cache.clear()
        cache.update(r.used)
    if loads:
        view.read_loads()
    if whole_plan and view.plan is not None:
        try:
            view.plan = plan_chunks.load_plan(client, root, view.plan)
        except ElasticEPError as e:
            view.plan_error = str(e)
    return view


def _read(client: Any, root: str, cache: ParseCache | None) -> list[list[tuple[bytes, Any]]]:
    """ranks, acks, suspects, epoch, plan, committed, leader, routing: read in one
    transaction. The plan head and the commit (the large values) come back only when
    their mod revisions differ from the ones parsed in ``cache``."""
    known = {k: max((rev for key, rev in cache if key == k), default=0) if cache else 0
             for k in (f"{root}/plan", f"{root}/committed")}
    held = {k: (b"", KeptMeta(k.encode(), rev)) for k, rev in known.items() if rev}
    return read_ranges_since(client, f"read {root}", [f"{root}/{p}/" for p in _PREFIXES],
                             [f"{root}/{k}" for k in _KEYS], held)


def _read_loads(r: _Reader, client: Any, prefix: str) -> dict[str, LoadRecord]:
    """Every load window under ``prefix``, :data:`LOAD_PAGE` keys per read, all at the
    revision of the first read."""
    out: dict[str, LoadRecord] = {}
    for kv in _pages(client, prefix, LOAD_PAGE):
        if (ld := r.owned(LoadRecord.parse, prefix, kv.value, kv, lambda x: x.id)) is not None:
            out[ld.id] = ld
    return out


MIRROR_PAGE = 64
"""Mirror reports per ranged read: a report is at most a few KiB for DeepSeek-V3."""


def _read_mirrors(r: _Reader, client: Any, prefix: str) -> dict[str, MirrorRecord]:
    """The mirror report of each live registration, under its current lease (a report
    outlives neither the rank's lease nor its incarnation)."""
    out: dict[str, MirrorRecord] = {}
    view = r.view
    for kv in _pages(client, prefix, MIRROR_PAGE):
        rec = r.owned(MirrorRecord.parse, prefix, kv.value, kv, lambda x: member_id(x.token))
        if rec is not None and view.is_live(rec.token) and kv.lease == view.leases.get(member_id(rec.token)):
            out[member_id(rec.token)] = rec
    return out


def _pages(client: Any, prefix: str, page: int) -> Iterator[Any]:
    """Every key-value under ``prefix``, ``page`` keys per read, all at the revision of
    the first read."""
    from etcd3.utils import prefix_range_end, to_bytes

    start, end, revision = to_bytes(prefix), prefix_range_end(to_bytes(prefix)), None
    while True:
        resp = call(client.get_range_response, f"read {prefix}", start, end, limit=page, revision=revision)
        revision = revision or resp.header.revision
        yield from resp.kvs
        if not resp.more or not resp.kvs:
            return
        start = resp.kvs[-1].key + b"\0"


def _read_suspects(r: _Reader, prefix: str, kvs: list[tuple[bytes, Any]]) -> None:
    """Suspicions between live members, each under its reporter's current lease (a
    report outlives neither its reporter nor the target's incarnation)."""
    view = r.view
    for value, meta in kvs:
        rec = r.parse(SuspectRecord.parse, value, meta)
        if rec is None:
            continue
        reporter = member_id(rec.reporter)
        if not view.is_live(rec.reporter) or meta.lease_id != view.leases.get(reporter):
            continue  # its reporter is gone or registered again: the report went with it
        if view.is_live(rec.target):
            view.suspects.append(rec)


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
