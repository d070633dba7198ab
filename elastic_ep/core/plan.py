"""Transfer planning: for every destination slot whose logical expert changes, where its
weights come from.

Ranks are numbered two ways in a plan: a transfer's *destination* is a rank of the new
numbering (``dst_rank``, ``0 .. new_ep_size-1``); a *source* is a process that exists
now, so it is named by its old rank (``Source.rank``), or :data:`DISK`. The rank
mapping in the plan translates between the two.

Each transfer lists its sources in the order to try them: a copy already on the
destination's own GPU (``local``), then live peers (``peer``: same node first, the
first choice spread so that no rank sends far more than the others), then a ready
host-memory mirror on a live rank (``mirror``), then ``disk``. A logical expert with
neither a live replica nor a ready mirror is *missing*: its transfers list only disk.
Sources are read in place from the weights each rank registered: an expert read by
several destinations is read once per destination and never staged on the source.

A source names a slot of its rank: ``0 .. slots_per_rank - 1`` are the GPU slots of the
transfer's layer, and ``slots_per_rank + i`` is row ``i`` of the rank's mirror (a host
buffer of packed experts, any layer's: :mod:`elastic_ep.core.mirrors` says which).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from elastic_ep.errors import PlacementError, PlanError, RankMappingError
from elastic_ep.core.placement import ExpertPlacement, describe, record_int, record_ints
from elastic_ep.core.rank_mapping import RankMapping

if TYPE_CHECKING:
    from elastic_ep.core.mirrors import MirrorAssignment

SCHEMA_VERSION = 1
MAX_PLAN_BYTES = 64 << 20
"""The longest plan text :meth:`TransferPlan.from_json` reads."""
MAX_EPOCH = 1 << 53
"""Epochs stay below this (exact in every JSON reader, and ``+ 1`` never overflows)."""
MAX_EXPERT_BYTES = 1 << 50
DISK = -1
"""``Source.rank`` of the safetensors checkpoint."""

Route = Literal["local", "peer", "mirror", "disk"]
ROUTES: tuple[Route, ...] = ("local", "peer", "mirror", "disk")
REMOTE: frozenset[str] = frozenset({"peer", "mirror"})
"""Routes read from another process's registered memory (or this one's mirror)."""


@dataclass(frozen=True)
class Source:
    """Where a slot's weights can be read: ``rank`` (old numbering) and its local
    ``slot`` (``slots_per_rank + i``: its mirror row ``i``), or ``rank == DISK`` (then
    ``slot == -1``). ``route`` is derived: ``mirror`` for a mirror row, else ``local``
    when the source is the destination's own process, else ``peer``."""

    rank: int
    slot: int
    route: Route


@dataclass(frozen=True)
class Transfer:
    """Fill local slot ``dst_slot`` of new rank ``dst_rank`` in MoE layer ``layer`` with
    logical expert ``logical``, trying ``sources`` in order (the last is always disk).

    Example: ``Transfer(layer=3, dst_rank=0, dst_slot=5, logical=17,
    sources=(Source(4, 2, "peer"), Source(9, 0, "peer"), Source(DISK, -1, "disk")))``.
    """

    layer: int
    dst_rank: int
    dst_slot: int
    logical: int
    sources: tuple[Source, ...]

    @property
    def route(self) -> Route:
        """The planned route: that of the first source."""
        return self.sources[0].route


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """A membership change's complete, deterministic plan.

    Attributes:
        epoch: the membership epoch the plan moves to.
        mapping: old -> new ranks.
        old, new: placements before (``old.ep_size`` ranks) and after
            (``mapping.new_ep_size`` ranks), same ``slots_per_rank``.
        expert_bytes: bytes of one expert (every tensor of it, scales included).
        transfers: sorted by ``(layer, dst_rank, dst_slot)``.
        missing: per layer, the logical experts with no live replica (disk only).
        part: ``(old_rank, new_rank)`` when this is one participant's part of a plan
            (:meth:`part_of`): its receives (``new_rank``, None for a draining rank) and
            the reads planned from it (``old_rank``, None for a joiner); None: the
            whole plan.
    """

    epoch: int
    mapping: RankMapping
    old: ExpertPlacement
    new: ExpertPlacement
    expert_bytes: int
    transfers: tuple[Transfer, ...]
    missing: tuple[tuple[int, ...], ...]
    part: tuple[int | None, int | None] | None = None
    _by_layer: dict[int, list[Transfer]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        by_layer: dict[int, list[Transfer]] = defaultdict(list)
        for t in self.transfers:
            by_layer[t.layer].append(t)
        object.__setattr__(self, "_by_layer", dict(by_layer))

    # -- views -------------------------------------------------------------------------
    def layer_transfers(self, layer: int) -> list[Transfer]:
        return self._by_layer.get(layer, [])

    def receives(self, new_rank: int, layer: int | None = None) -> list[Transfer]:
        """Transfers a destination rank carries out (all layers, or one)."""
        ts = self.transfers if layer is None else self.layer_transfers(layer)
        return [t for t in ts if t.dst_rank == new_rank]

    def peer_reads_from(self, old_rank: int, layer: int | None = None) -> list[Transfer]:
        """Transfers whose planned source is ``old_rank`` over the network (its GPU
        slots or its mirror, for another process)."""
        ts = self.transfers if layer is None else self.layer_transfers(layer)
        n2o = self.mapping.new_to_old()
        return [t for t in ts if t.route in REMOTE and t.sources[0].rank == old_rank and n2o[t.dst_rank] != old_rank]

    def part_of(self, old_rank: int | None, new_rank: int | None) -> "TransferPlan":
        """One participant's part: the transfers it receives (as new rank ``new_rank``)
        and those whose planned source it is (as old rank ``old_rank``), each once."""
        ts = [t for t in self.transfers
              if t.dst_rank == new_rank or (t.route in REMOTE and t.sources[0].rank == old_rank)]
        return self.with_transfers(tuple(ts), (old_rank, new_rank))

    def with_transfers(self, transfers: tuple[Transfer, ...], part: tuple[int | None, int | None] | None
                       ) -> "TransferPlan":
        """This plan's epoch, mapping and placements with ``transfers`` (sorted by layer,
        destination and slot); ``missing`` recounted from them (disk-only transfers)."""
        ts = tuple(sorted(transfers, key=lambda t: (t.layer, t.dst_rank, t.dst_slot)))
        missing: list[set[int]] = [set() for _ in range(self.new.num_layers)]
        for t in ts:
            if len(t.sources) == 1:
                missing[t.layer].add(t.logical)
        return TransferPlan(self.epoch, self.mapping, self.old, self.new, self.expert_bytes, ts,
                            tuple(tuple(sorted(m)) for m in missing), part)

    # -- summary -----------------------------------------------------------------------
    def bytes_by_route(self) -> dict[str, int]:
        out = dict.fromkeys(ROUTES, 0)
        for t in self.transfers:
            out[t.route] += self.expert_bytes
        return out

    def summary(self) -> dict[str, Any]:
        """Bytes by planned route, per destination rank and in total; peer bytes sent
        per source rank; missing experts per layer."""
        per_rank = {r: dict.fromkeys(ROUTES, 0) for r in range(self.mapping.new_ep_size)}
        sent: dict[int, int] = defaultdict(int)
        for t in self.transfers:
            per_rank[t.dst_rank][t.route] += self.expert_bytes
            if t.route in REMOTE:
                sent[t.sources[0].rank] += self.expert_bytes
        return {
            "epoch": self.epoch,
            "old_ep_size": self.mapping.old_ep_size,
            "new_ep_size": self.mapping.new_ep_size,
            "num_layers": self.new.num_layers,
            "transfers": len(self.transfers),
            "bytes": self.bytes_by_route(),
            "bytes_by_dst_rank": per_rank,
            "peer_bytes_by_src_rank": dict(sorted(sent.items())),
            "missing_experts": sum(len(m) for m in self.missing),
            "missing_by_layer": {i: list(m) for i, m in enumerate(self.missing) if m},
        }

    # -- invariants --------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`PlanError` unless the plan turns ``old`` into ``new`` reading
        only from live sources that hold the expert (a mirror row's content is the
        controller's record, not the plan's: it is checked against the rows the rank
        reported ready when the plan is built), with disk last and used alone exactly
        for missing experts."""
        m, old, new = self.mapping, self.old, self.new
        if old.ep_size != m.old_ep_size or new.ep_size != m.new_ep_size:
            raise PlanError(
                f"placements have {old.ep_size} -> {new.ep_size} ranks but the mapping "
                f"{m.old_ep_size} -> {m.new_ep_size}"
            )
        if old.slots_per_rank != new.slots_per_rank or old.num_layers != new.num_layers:
            raise PlanError("old and new placements differ in slots per rank or layer count")
        if len(self.missing) != new.num_layers:
            raise PlanError(f"missing lists {len(self.missing)} layers, placements have {new.num_layers}")
        new.validate()
        spr = old.slots_per_rank
        mirror_rows = max_mirror_rows(new)
        state = m.carry_over(old)
        live = m.live_sources
        new_to_old = m.new_to_old()
        for t in self.transfers:
            where = f"transfer layer {t.layer} -> rank {t.dst_rank} slot {t.dst_slot}"
            if not (0 <= t.layer < new.num_layers and 0 <= t.dst_rank < m.new_ep_size and 0 <= t.dst_slot < spr):
                raise PlanError(f"{where}: out of range")
            if not t.sources or t.sources[-1].rank != DISK:
                raise PlanError(f"{where}: the last source must be disk")
            is_missing = t.logical in self.missing[t.layer]
            if is_missing != (len(t.sources) == 1):
                raise PlanError(f"{where}: disk alone must be used exactly for missing experts")
            for s in t.sources[:-1]:
                if s.rank not in live:
                    raise PlanError(f"{where}: source rank {s.rank} is dead")
                if not 0 <= s.slot < spr + mirror_rows:
                    raise PlanError(f"{where}: source rank {s.rank} slot {s.slot} is out of range "
                                    f"0..{spr + mirror_rows - 1}")
                if s.slot < spr and old.phy2log[t.layer, s.rank * spr + s.slot] != t.logical:
                    raise PlanError(f"{where}: source rank {s.rank} slot {s.slot} does not hold expert {t.logical}")
                want = _route(s.rank, s.slot, spr, new_to_old[t.dst_rank])
                if s.route != want:
                    raise PlanError(f"{where}: source rank {s.rank} has route {s.route}, expected {want}")
            state[t.layer, t.dst_rank * spr + t.dst_slot] = t.logical
        if self.part is not None:
            self._validate_part(state)
            return
        if not np.array_equal(state, new.phy2log):
            layer = int(np.flatnonzero((state != new.phy2log).any(axis=1))[0])
            raise PlanError(f"layer {layer}: applying the transfers does not give the new placement")

    def _validate_part(self, state: np.ndarray) -> None:
        """A part holds only its participant's transfers, and its receives turn that
        rank's carried slots into its slots of the new placement."""
        assert self.part is not None
        old_rank, new_rank = self.part
        for t in self.transfers:
            if t.dst_rank != new_rank and not (t.route in REMOTE and t.sources[0].rank == old_rank):
                raise PlanError(f"transfer layer {t.layer} -> rank {t.dst_rank} slot {t.dst_slot} is not part of "
                                f"old rank {old_rank} / new rank {new_rank}'s plan")
        if new_rank is not None:
            spr = self.new.slots_per_rank
            cols = slice(new_rank * spr, (new_rank + 1) * spr)
            if not np.array_equal(state[:, cols], self.new.phy2log[:, cols]):
                raise PlanError(f"new rank {new_rank}: applying its transfers does not give its new slots")

    # -- serialisation -----------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "schema": SCHEMA_VERSION,
                "epoch": self.epoch,
                "expert_bytes": self.expert_bytes,
                "mapping": self.mapping.to_dict(),
                "old": self.old.to_dict(),
                "new": self.new.to_dict(),
                # Compact rows: [layer, dst_rank, dst_slot, logical, [[rank, slot], ...]]
                "transfers": [
                    [t.layer, t.dst_rank, t.dst_slot, t.logical, [[s.rank, s.slot] for s in t.sources]]
                    for t in self.transfers
                ],
                "missing": [list(m) for m in self.missing],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "TransferPlan":
        """Parse and validate; any defect, a hostile value included, raises :class:`PlanError`."""
        if len(text) > MAX_PLAN_BYTES:
            raise PlanError(f"plan is {len(text)} bytes, more than the {MAX_PLAN_BYTES} a plan may have")
        try:
            d = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
            raise PlanError(f"plan is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "TransferPlan":
        """The plan of a decoded record (``to_json``'s shape), validated."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA_VERSION:
            got = describe(d.get("schema")) if isinstance(d, dict) else describe(d)
            raise PlanError(f"plan schema {got} is not supported; this build reads schema {SCHEMA_VERSION}")
        absent = sorted({"epoch", "mapping", "old", "new", "expert_bytes", "transfers", "missing"} - d.keys())
        if absent:
            raise PlanError(f"plan record is malformed: fields {absent} missing")
        try:
            mapping = RankMapping.from_dict(d["mapping"])
            old, new = ExpertPlacement.from_dict(d["old"]), ExpertPlacement.from_dict(d["new"])
        except (RankMappingError, PlacementError) as e:
            raise PlanError(f"plan record is malformed: {e}") from e
        if old.ep_size != mapping.old_ep_size or new.ep_size != mapping.new_ep_size:
            raise PlanError(f"plan record is malformed: placements have {old.ep_size} -> {new.ep_size} ranks but "
                            f"the mapping {mapping.old_ep_size} -> {mapping.new_ep_size}")
        missing = d["missing"]
        if not isinstance(missing, list) or len(missing) != new.num_layers:
            raise PlanError(f"plan missing must list {new.num_layers} layers, got {describe(missing)}")
        plan = cls(
            epoch=record_int(d["epoch"], "plan epoch", 0, MAX_EPOCH, PlanError), mapping=mapping, old=old, new=new,
            expert_bytes=record_int(d["expert_bytes"], "plan expert_bytes", 1, MAX_EXPERT_BYTES, PlanError),
            transfers=_read_transfers(d["transfers"], mapping, new),
            missing=tuple(tuple(record_ints(m, f"plan missing layer {i}", 0, new.num_logical - 1, PlanError,
                                            new.num_logical)) for i, m in enumerate(missing)),
        )
        plan.validate()
        return plan


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_transfers(rows: Any, mapping: RankMapping, new: ExpertPlacement) -> tuple[Transfer, ...]:
    """The compact transfer rows of a record; at most one per new slot."""
    if not isinstance(rows, list) or len(rows) > new.num_layers * new.num_physical:
        raise PlanError(f"plan transfers must be a list of at most {new.num_layers * new.num_physical} rows "
                        f"(one per new slot), got {describe(rows)}")
    new_to_old = mapping.new_to_old()
    spr = new.slots_per_rank
    out = []
    for i, row in enumerate(rows):
        where = f"plan transfer {i}"
        if not isinstance(row, list) or len(row) != 5:
            raise PlanError(f"{where} must be [layer, dst_rank, dst_slot, logical, sources], got {describe(row)}")
        layer = record_int(row[0], f"{where} layer", 0, new.num_layers - 1, PlanError)
        dst = record_int(row[1], f"{where} dst_rank", 0, mapping.new_ep_size - 1, PlanError)
        slot = record_int(row[2], f"{where} dst_slot", 0, spr - 1, PlanError)
        logical = record_int(row[3], f"{where} logical", 0, new.num_logical - 1, PlanError)
        out.append(Transfer(layer, dst, slot, logical, _read_sources(row[4], where, mapping, new, new_to_old[dst])))
    return tuple(out)


def _read_sources(srcs: Any, where: str, mapping: RankMapping, new: ExpertPlacement, dst_old: int
                  ) -> tuple[Source, ...]:
    # A mirror source may follow every peer: one more than a peer list can hold.
    most = mapping.old_ep_size + 2
    if not isinstance(srcs, list) or len(srcs) > most:
        raise PlanError(f"{where}: sources must be a list of at most {most} [rank, slot] pairs, got {describe(srcs)}")
    spr, top = new.slots_per_rank, new.slots_per_rank + max_mirror_rows(new) - 1
    out = []
    for pair in srcs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise PlanError(f"{where}: a source must be [rank, slot], got {describe(pair)}")
        r = record_int(pair[0], f"{where} source rank", DISK, mapping.old_ep_size - 1, PlanError)
        s = record_int(pair[1], f"{where} source slot", -1 if r == DISK else 0, -1 if r == DISK else top, PlanError)
        out.append(Source(r, s, _route(r, s, spr, dst_old)))
    return tuple(out)


def max_mirror_rows(placement: ExpertPlacement) -> int:
    """The most mirror rows a source may name: one per (layer, logical expert)."""
    return placement.num_layers * placement.num_logical


def _route(src_rank: int, slot: int, spr: int, dst_old_rank: int) -> Route:
    if src_rank == DISK:
        return "disk"
    if slot >= spr:
        return "mirror"
    return "local" if src_rank == dst_old_rank else "peer"


PAD = -2
"""Fills a row of :func:`transfer_rows` past its transfer's sources."""


def transfer_rows(transfers: Sequence[Transfer]) -> np.ndarray:
    """``[n, 4 + 2 k]`` ints, one row per transfer: layer, dst_rank, dst_slot, logical,
    then (rank, slot) of each source, :data:`PAD`-filled to the most sources ``k``."""
    k = max((len(t.sources) for t in transfers), default=1)
    pad = [PAD, PAD] * k
    rows = [[t.layer, t.dst_rank, t.dst_slot, t.logical, *[x for s in t.sources for x in (s.rank, s.slot)],
             *pad[2 * len(t.sources):]] for t in transfers]
    return np.array(rows, dtype=np.int64).reshape(len(transfers), 4 + 2 * k)


def transfers_from_rows(rows: np.ndarray, mapping: RankMapping, new: ExpertPlacement) -> tuple[Transfer, ...]:
    """The transfers of :func:`transfer_rows`'s array, every field range-checked on the
    whole array at once (:class:`PlanError` names the first bad row and the field)."""
    if rows.ndim != 2 or (rows.size and (rows.shape[1] < 6 or rows.shape[1] % 2)):
        raise PlanError(f"transfer rows are shaped {list(rows.shape)}, expected [n, 4 + 2 * sources]")
    if len(rows) > new.num_layers * new.num_physical:
        raise PlanError(f"{len(rows)} transfer rows, more than one per new slot ({new.num_layers * new.num_physical})")
    if not rows.size:
        return ()
    spr = new.slots_per_rank
    src, slot = rows[:, 4::2], rows[:, 5::2]
    pad = (src == PAD) & (slot == PAD)
    real = ~pad
    checks = [
        ("layer", (rows[:, 0] < 0) | (rows[:, 0] >= new.num_layers)),
        ("dst_rank", (rows[:, 1] < 0) | (rows[:, 1] >= mapping.new_ep_size)),
        ("dst_slot", (rows[:, 2] < 0) | (rows[:, 2] >= spr)),
        ("logical", (rows[:, 3] < 0) | (rows[:, 3] >= new.num_logical)),
        ("source rank", (real & ((src < DISK) | (src >= mapping.old_ep_size))).any(axis=1)),
        ("source slot", (real & np.where(src == DISK, slot != -1, (slot < 0) | (slot >= spr + max_mirror_rows(new))))
         .any(axis=1)),
        ("sources (a gap before the last)", (pad[:, :-1] & real[:, 1:]).any(axis=1) | pad[:, 0]),
    ]
    for field_name, bad in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PlanError(f"plan transfer {i}: {field_name} out of range in row {rows[i].tolist()}")
    new_to_old = mapping.new_to_old()
    cache: dict[tuple[int, int, int], Source] = {}
    out = []
    for r in rows.tolist():
        dst_old = new_to_old[r[1]]
        srcs = []
        for a, b in zip(r[4::2], r[5::2]):
            if a == PAD:
                break
            key = (a, b, dst_old)
            srcs.append(cache.get(key) or cache.setdefault(key, Source(a, b, _route(a, b, spr, dst_old))))
        out.append(Transfer(r[0], r[1], r[2], r[3], tuple(srcs)))
    return tuple(out)


def build_plan(
    old: ExpertPlacement,
    new: ExpertPlacement,
    mapping: RankMapping,
    expert_bytes: int,
    *,
    epoch: int = 0,
    nodes: Sequence[str] | None = None,
    max_peer_sources: int = 3,
    mirrors: MirrorAssignment | None = None,
) -> TransferPlan:
    """Build the transfer plan from ``old`` (on ``mapping.old_ep_size`` ranks) to ``new``.

    Parameters:
        expert_bytes: bytes of one expert (all its tensors).
        nodes: node id per rank of the *new* layout's processes, indexed by old rank for
            existing ranks and ``old_ep_size + j`` for joining rank ``j``; ``None`` when
            unknown (then peers are ordered by load alone).
        max_peer_sources: peers listed per transfer before disk.
        mirrors: the *ready* host-memory mirrors, by old rank (``rank[layer, logical]``,
            ``row[layer, logical]``); one on a live rank is listed after the peers.

    Peers are spread greedily: each transfer's first peer is the candidate (same node
    first) that has been charged the fewest bytes so far.
    """
    if old.slots_per_rank != new.slots_per_rank or old.num_layers != new.num_layers:
        raise PlanError(
            f"old ({old.num_layers} layers x {old.slots_per_rank} slots/rank) and new "
            f"({new.num_layers} x {new.slots_per_rank}) placements do not match"
        )
    if old.num_logical != new.num_logical:
        raise PlanError(f"old has {old.num_logical} logical experts, new has {new.num_logical}")
    if old.ep_size != mapping.old_ep_size or new.ep_size != mapping.new_ep_size:
        raise PlanError(
            f"placements have {old.ep_size} -> {new.ep_size} ranks, mapping "
            f"{mapping.old_ep_size} -> {mapping.new_ep_size}"
        )
    if expert_bytes <= 0:
        raise PlanError(f"expert_bytes must be positive, got {expert_bytes}")
    if mirrors is not None and (mirrors.rank.shape != (old.num_layers, old.num_logical)
                                or mirrors.row.shape != mirrors.rank.shape):
        raise PlanError(f"mirrors are shaped {list(mirrors.rank.shape)}, the placement "
                        f"{[old.num_layers, old.num_logical]}")
    if nodes is not None and len(nodes) != mapping.old_ep_size + mapping.num_joining:
        raise PlanError(
            f"nodes lists {len(nodes)} ranks, expected old ranks + joining = "
            f"{mapping.old_ep_size + mapping.num_joining}"
        )
    new.validate()

    spr = old.slots_per_rank
    new_to_old = mapping.new_to_old()
    live = sorted(mapping.live_sources)
    dst_node = [
        (nodes[o] if o >= 0 else nodes[mapping.old_ep_size + r - mapping.num_surviving]) if nodes else None
        for r, o in enumerate(new_to_old)
    ]
    sent = [0] * mapping.old_ep_size
    on_other_node = [[nodes is not None and nodes[r] != dst_node[d] for r in range(mapping.old_ep_size)]
                     for d in range(mapping.new_ep_size)] if nodes is not None else None
    sources: dict[tuple[int, int, str], Source] = {}  # one shared object per distinct source
    disk = Source(DISK, -1, "disk")
    transfers: list[Transfer] = []
    missing: list[tuple[int, ...]] = []
    mirror_src = _mirror_sources(mirrors, set(live), spr)
    for layer in range(old.num_layers):
        old_row, new_row = old.phy2log[layer].tolist(), new.phy2log[layer].tolist()
        # holder[e][rank] = first local slot of logical e on a live old rank
        holder: dict[int, dict[int, int]] = defaultdict(dict)
        for r in live:
            for i, e in enumerate(old_row[r * spr : (r + 1) * spr]):
                holder[e].setdefault(r, i)
        layer_missing = set()
        for s, e in enumerate(new_row):
            dst, i = divmod(s, spr)
            o = new_to_old[dst]
            if o >= 0 and old_row[o * spr + i] == e:
                continue
            have = holder.get(e, {})
            srcs: list[Source] = []
            if o in have:
                srcs.append(sources.setdefault((o, have[o], "local"), Source(o, have[o], "local")))
            far = on_other_node[dst] if on_other_node is not None else None
            ranked = sorted(((far[r] if far else False, sent[r], r) for r in have if r != o))[:max_peer_sources]
            if ranked and not srcs:
                sent[ranked[0][2]] += expert_bytes
            for _, _, r in ranked:
                key = (r, have[r], "peer")
                srcs.append(sources.get(key) or sources.setdefault(key, Source(r, have[r], "peer")))
            m = mirror_src.get((layer, e))
            if m is not None:
                srcs.append(m)
            if not srcs:
                layer_missing.add(e)
            srcs.append(disk)
            transfers.append(Transfer(layer, dst, i, e, tuple(srcs)))
        missing.append(tuple(sorted(layer_missing)))
    return TransferPlan(epoch, mapping, old, new, expert_bytes, tuple(transfers), tuple(missing))


def _mirror_sources(mirrors: MirrorAssignment | None, live: set[int], spr: int) -> dict[tuple[int, int], Source]:
    """``(layer, logical) -> Source`` of each ready mirror on a live old rank."""
    if mirrors is None:
        return {}
    lay, log_ = np.nonzero(mirrors.rank >= 0)
    return {(int(a), int(b)): Source(int(r), spr + int(w), "mirror")
            for a, b, r, w in zip(lay, log_, mirrors.rank[lay, log_], mirrors.row[lay, log_]) if int(r) in live}


def moved_bytes(plan: TransferPlan) -> int:
    """Bytes that cross a GPU boundary (peer, mirror and disk routes); local moves are free."""
    b = plan.bytes_by_route()
    return b["peer"] + b["mirror"] + b["disk"]


def lower_bound_bytes(old: ExpertPlacement, mapping: RankMapping, expert_bytes: int) -> int:
    """Bytes any policy must move across GPUs, summed over layers: each logical expert
    left with no replica on a surviving rank needs a new slot, and every slot of a
    joining rank must be filled; one transfer can do both, so per layer the bound is
    the larger of the two counts."""
    carry = mapping.carry_over(old)
    have = np.zeros((old.num_layers, old.num_logical), dtype=bool)
    rows = np.broadcast_to(np.arange(old.num_layers)[:, None], carry.shape)
    kept = carry >= 0
    have[rows[kept], carry[kept]] = True
    homeless = (~have).sum(axis=1)
    joining = mapping.num_joining * old.slots_per_rank
    return int(np.maximum(homeless, joining).sum()) * expert_bytes
