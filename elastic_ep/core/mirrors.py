"""Host-memory mirrors: which rank keeps a packed copy of which expert, so that losing
any one fault domain leaves every expert a GPU replica or a mirror outside it.

Glossary (with the placement's words, :mod:`elastic_ep.core.placement`):

- fault domain: what one failure takes down. A rank's domain is its node label
  (``node_of[r]``, the registration's ``node``); an unlabeled rank (``""``) is a domain
  of its own. With no labels every rank is its own domain: coverage means any single
  rank may die.
- mirror: one (layer, logical expert) packed into one *row* of a rank's host buffer of
  ``capacity[r]`` rows (a row holds one expert of any layer).
- confined expert: all its GPU replicas sit in one domain ``d``. It *needs* a mirror
  when the ranks span two or more domains; the mirror is *valid* only on a rank outside
  ``d``. One mirror per expert is enough for any single domain lost.

Example (DeepSeek-V3 on 32 ranks x 9 slots, 4 nodes of 8 ranks, the initial
placement): 256 logical + 32 redundant experts; the 224 experts of each layer with one
replica are confined, so 58 x 224 = 12,992 experts need a mirror: 58 x 72 = 4,176 on
each of nodes 1 and 2, 58 x 40 on nodes 0 and 3 (which share experts 0..31). Each must
sit on one of the 24 ranks of the other nodes: ``min_mirror_rows`` is
``max(ceil(12992 / 32), ceil(4176 / 24)) = 406`` rows per rank.

Why the assignment is optimal (:func:`assign_mirrors`). Experts and free rows form a
bipartite graph: an expert of domain ``d`` may take any free row outside ``d``. A set of
experts from two or more domains sees every row (a rank lies outside at least one of
them), a set from one domain ``d`` sees ``C - capdom[d]`` rows (``C`` free rows in all,
``capdom[d]`` in ``d``). Hall's condition is therefore exactly: the demand ``n[d]`` per
domain fits iff ``sum(n) <= C`` and ``n[d] <= C - capdom[d]`` for every ``d``. The sets
of experts that can all be covered form a transversal matroid, so taking experts in
priority order while the condition holds covers the most (and the most important) ones.
Placing one expert of ``d`` on a rank of domain ``y != d`` lowers ``C`` and ``capdom[y]``
by one and ``n[d]`` by one: the condition still holds for ``d``, ``y`` and the total,
and for any other ``x`` unless ``x`` was *tight* (``n[x] == C - capdom[x]``); at most
one domain other than ``d`` can be tight (two would need ``capdom[x1] + capdom[x2] > C``),
so placing each expert in that domain when there is one never strands a later expert.

Timings of :func:`assign_mirrors` (one core of a shared 2-core machine, best of 3;
up to twice that under load), DeepSeek-V3 58 x 256, capacity = :func:`min_mirror_rows`:
32 ranks x 9 slots in 4 nodes of 8 (12,992 needed): 60 ms, the same unlabeled: 60 ms;
320 ranks x 9 slots in 40 nodes, every expert confined to one node (14,848 needed):
90 ms; 320 unlabeled ranks each holding one expert 9 times (11,136 needed): 70 ms. Kimi-K2 60 x 384 on 256 ranks x 2
slots in 32 nodes (15,360 needed): 80 ms. Keeping a whole previous assignment: 3 to
15 ms. :func:`needs_mirror` and :func:`worst_domain_loss`: 1 to 20 ms. Most of the time
is the per-expert placing loop (a few numpy calls over domains and ranks each).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from elastic_ep.core.fault_domains import node_ids
from elastic_ep.core.packed import describe, pack, unpack
from elastic_ep.core.placement import MAX_ELEMENTS, MAX_LOGICAL, ExpertPlacement, record_int
from elastic_ep.core.rank_mapping import MAX_RANKS
from elastic_ep.errors import ConfigError, PlacementError

MAX_ROWS = MAX_ELEMENTS
"""The most mirror rows a rank's buffer may have: a rank never needs more rows than the
model has routed experts (DeepSeek-V3: 14,848), and no record holds more experts."""

_INT32 = np.iinfo(np.int32)


def _as_int32(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise PlacementError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        raise PlacementError(f"{name} holds values outside int32")
    out = np.array(arr, dtype=np.int32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class MirrorAssignment:
    """Per (layer, logical expert), the rank whose host buffer mirrors it and the row.

    Attributes:
        rank: int32 ``[num_layers, num_logical]``, the rank holding the mirror, ``-1``
            none. Example for 2 layers of 3 experts on 2 ranks: ``[[1, -1, 0], [-1, 1, -1]]``.
        row: int32 ``[num_layers, num_logical]``, the mirror's row in that rank's buffer,
            ``-1`` none: ``[[0, -1, 0], [-1, 1, -1]]`` above (rank 1 keeps layer 0's
            expert 0 in row 0, layer 1's expert 1 in row 1).

    The constructor checks only the shapes; call :meth:`validate` at the boundaries.
    """

    rank: np.ndarray
    row: np.ndarray

    def __post_init__(self) -> None:
        rank, row = _as_int32(self.rank, "mirror rank"), _as_int32(self.row, "mirror row")
        if rank.ndim != 2 or rank.shape != row.shape:
            raise PlacementError(f"mirror rank and row must both be [num_layers, num_logical], got shapes "
                                 f"{tuple(rank.shape)} and {tuple(row.shape)}")
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "row", row)

    @classmethod
    def empty(cls, num_layers: int, num_logical: int) -> "MirrorAssignment":
        """No mirror at all: ``rank`` and ``row`` ``[num_layers, num_logical]`` of ``-1``."""
        none = np.full((num_layers, num_logical), -1, dtype=np.int32)
        return cls(none, none)

    @property
    def num_layers(self) -> int:
        return int(self.rank.shape[0])

    @property
    def num_logical(self) -> int:
        return int(self.rank.shape[1])

    def count(self) -> int:
        """How many experts have a mirror."""
        return int((self.rank >= 0).sum())

    def per_rank(self, ep_size: int) -> np.ndarray:
        """int64 ``[ep_size]``: rows used on each rank."""
        self._refuse(self.rank >= ep_size, f"is on a rank outside 0..{ep_size - 1}")
        held = self.rank[self.rank >= 0]
        return np.bincount(held, minlength=ep_size).astype(np.int64)

    def rows_of(self, rank: int, capacity: int) -> np.ndarray:
        """int64 ``[capacity]``: what each row of ``rank``'s buffer holds, as the flat id
        ``layer * num_logical + logical``, ``-1`` empty. Example: ``rows_of(1, 3)`` of the
        class example is ``[0, 4, -1]``."""
        flat = np.flatnonzero(self.rank.ravel() == rank)
        rows = self.row.ravel()[flat].astype(np.int64)
        bad = flat[(rows < 0) | (rows >= capacity)]
        if bad.size:
            raise self._error(int(bad[0]), f"is in a row outside 0..{capacity - 1} of rank {rank}")
        out = np.full(capacity, -1, dtype=np.int64)
        out[rows] = flat
        lost = out[rows] != flat  # overwritten by another expert of the same row
        if lost.any():
            b = int(out[rows[lost][0]])
            raise self._error(int(flat[lost][0]), f"shares its row with layer {b // self.num_logical} "
                                                  f"logical {b % self.num_logical}")
        return out

    def renumbered(self, old_to_new: Sequence[int]) -> "MirrorAssignment":
        """The mirrors after a membership change: each rank mapped through ``old_to_new``
        (a :class:`~elastic_ep.core.rank_mapping.RankMapping`'s), a mirror on a rank
        mapped to ``-1`` dropped; rows stay (a surviving rank keeps its buffer)."""
        m = np.asarray(list(old_to_new), dtype=np.int64)
        self._refuse(self.rank >= m.size, f"is on a rank the mapping of {m.size} ranks does not cover")
        has = self.rank >= 0
        new = np.append(m, -1)[np.where(has, self.rank, m.size)]
        new = np.where(new >= 0, new, -1)
        return MirrorAssignment(new, np.where(new >= 0, self.row, -1))

    def validate(self, ep_size: int, capacity: Sequence[int], shape: tuple[int, int] | None = None) -> None:
        """Raise :class:`PlacementError` naming the first (layer, logical) whose mirror is
        on a rank outside ``0..ep_size-1``, has a rank without a row or a row without a
        rank, a row outside ``0..capacity[rank]-1``, or shares its (rank, row) with
        another. ``capacity``: ``[ep_size]`` rows per rank; ``shape``: the expected
        ``(num_layers, num_logical)``, when known."""
        if shape is not None and tuple(self.rank.shape) != tuple(shape):
            raise PlacementError(f"mirrors are shaped {tuple(self.rank.shape)}, the placement {tuple(shape)}")
        cap = _check_capacity(capacity, ep_size, PlacementError)
        rank, row = self.rank.astype(np.int64), self.row.astype(np.int64)
        self._refuse((rank < -1) | (rank >= ep_size), f"is on a rank outside 0..{ep_size - 1}")
        self._refuse(((rank >= 0) != (row >= 0)) | (row < -1), "has a rank without a row or a row without a rank")
        held = rank >= 0
        self._refuse(held & (row >= cap[np.maximum(rank, 0)]), "is in a row past its rank's capacity")
        flat = np.flatnonzero(held.ravel())
        key = row.ravel()[flat] * ep_size + rank.ravel()[flat]  # rows < 2**31, ranks < ep_size: no overflow
        order = np.argsort(key, kind="stable")
        dup = np.flatnonzero(key[order][1:] == key[order][:-1])
        if dup.size:
            a, b = flat[order[dup[0]]], flat[order[dup[0] + 1]]
            E = self.num_logical
            raise PlacementError(f"mirrors of layer {a // E} logical {a % E} and layer {b // E} logical {b % E} "
                                 f"share row {row.ravel()[a]} of rank {rank.ravel()[a]}")

    def _refuse(self, bad: np.ndarray, what: str) -> None:
        """Raise naming the first ``True`` (layer, logical) of ``bad`` ``[L, E]``, if any."""
        hits = np.flatnonzero(bad.ravel())
        if hits.size:
            raise self._error(int(hits[0]), what)

    def _error(self, flat: int, what: str) -> PlacementError:
        layer, logical = divmod(flat, self.num_logical)
        return PlacementError(f"mirror of layer {layer} logical {logical} (rank {self.rank[layer, logical]}, "
                              f"row {self.row[layer, logical]}) {what}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MirrorAssignment):
            return NotImplemented
        return np.array_equal(self.rank, other.rank) and np.array_equal(self.row, other.row)

    def to_dict(self) -> dict[str, Any]:
        """The record form: ``rank`` and ``row`` packed (:mod:`elastic_ep.core.packed`)."""
        return {"rank": pack(self.rank), "row": pack(self.row)}

    @classmethod
    def from_dict(cls, d: Any, num_layers: int, num_logical: int, ep_size: int, max_rows: int
                  ) -> "MirrorAssignment":
        """The mirrors of a record (``to_dict``'s shape) for a placement of ``num_layers``
        x ``num_logical`` on ``ep_size`` ranks of at most ``max_rows`` rows each,
        validated. Anything else, a hostile value included, raises
        :class:`PlacementError`; sizes are bounded before anything is allocated."""
        L = record_int(num_layers, "mirror num_layers", 1, MAX_ELEMENTS)
        E = record_int(num_logical, "mirror num_logical", 1, MAX_LOGICAL)
        R = record_int(ep_size, "mirror ep_size", 1, MAX_RANKS)
        rows = record_int(max_rows, "mirror max_rows", 0, MAX_ROWS)
        if L * E > MAX_ELEMENTS:
            raise PlacementError(f"mirrors of {L} x {E} experts exceed the {MAX_ELEMENTS} entries a record may hold")
        if not isinstance(d, dict) or set(d) != {"rank", "row"}:
            raise PlacementError(f"mirror record is malformed ({describe(d)}); expected keys rank, row")
        arrays = []
        for name, hi in (("rank", R - 1), ("row", rows - 1)):
            a = unpack(d[name], f"mirror {name}", L * E, ndim=2)
            if a.shape != (L, E):
                raise PlacementError(f"mirror {name} is shaped {list(a.shape)}, expected [{L}, {E}]")
            if a.size and (a.min() < -1 or a.max() > hi):
                raise PlacementError(f"mirror {name} holds {int(a.min() if a.min() < -1 else a.max())}, "
                                     f"outside -1..{hi}")
            arrays.append(a)
        mirrors = cls(*arrays)
        mirrors.validate(R, [rows] * R)
        return mirrors


# -- fault domains -----------------------------------------------------------------------
def _domains(node_of: Sequence[str], ranks: int) -> tuple[np.ndarray, list[str]]:
    """(int64 ``[ranks]`` dense domain ids, each domain's label): a node label, or
    ``rank <r>`` for an unlabeled rank. ``_domains(["a", "", "a"], 3) -> ([0, 1, 0],
    ["a", "rank 1"])``."""
    labels = list(node_of)
    node_ids(labels, ranks)  # one string per rank, else ConfigError
    ids: dict[str, int] = {}
    names: list[str] = []
    out = np.empty(ranks, dtype=np.int64)
    for r, x in enumerate(labels):
        key = x if x else f"\0{r}"  # a key no label can be: each unlabeled rank apart
        if key not in ids:
            ids[key] = len(names)
            names.append(x if x else f"rank {r}")
        out[r] = ids[key]
    return out, names


def domains(node_of: Sequence[str]) -> np.ndarray:
    """int64 ``[ranks]``: dense fault-domain ids, in order of first appearance; ranks of
    one node share one, each unlabeled rank has its own.
    ``domains(["a", "", "b", "a", ""]) -> [0, 1, 2, 0, 3]``."""
    labels = list(node_of)
    return _domains(labels, len(labels))[0]


def _replica_domains(placement: ExpertPlacement, dom: np.ndarray, num_domains: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int64 ``[L, E]``: the smallest and largest domain among each expert's
    replicas; ``lo == num_domains`` and ``hi == -1`` for an expert with none."""
    L, E = placement.num_layers, placement.num_logical
    p = placement.phy2log
    lay, slot = np.nonzero((p >= 0) & (p < E))
    key = lay * E + p[lay, slot]
    d = dom[slot // placement.slots_per_rank]
    lo = np.full(L * E, num_domains, dtype=np.int64)
    hi = np.full(L * E, -1, dtype=np.int64)
    np.minimum.at(lo, key, d)
    np.maximum.at(hi, key, d)
    return lo.reshape(L, E), hi.reshape(L, E)


def _needs(placement: ExpertPlacement, dom: np.ndarray, num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _replica_domains(placement, dom, num_domains)
    confined = lo == hi
    return confined & (num_domains >= 2), np.where(confined, lo, -1)


def needs_mirror(placement: ExpertPlacement, node_of: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(need bool ``[L, E]``, confining int64 ``[L, E]``): ``need`` marks the experts
    whose replicas all sit in one domain while the ranks span two or more;
    ``confining`` is that domain (:func:`domains`' ids) for every expert whose replicas
    share one, ``-1`` otherwise. An expert with no replica (a masked placement) needs
    nothing: there is no GPU copy to mirror. ``node_of``: one label per rank.

    Example: 2 ranks x 2 slots, ``phy2log [[0, 1, 0, 2]]`` on ``["a", "b"]``: experts 1
    and 2 (one replica each) need one, expert 0 (on both nodes) does not."""
    dom, names = _domains(node_of, placement.ep_size)
    return _needs(placement, dom, len(names))


def min_mirror_rows(placement: ExpertPlacement, node_of: Sequence[str]) -> int:
    """The fewest rows per rank (the same on every rank) with which every expert that
    needs a mirror gets one: ``max(ceil(total / R), max_d ceil(n_d / (R - R_d)))``, with
    ``n_d`` the experts confined to domain ``d`` and ``R_d`` its ranks (Hall's condition,
    see the module docstring). 0 when none needs one."""
    dom, names = _domains(node_of, placement.ep_size)
    need, conf = _needs(placement, dom, len(names))
    n = np.bincount(conf[need], minlength=len(names))
    total, R = int(n.sum()), placement.ep_size
    if total == 0:
        return 0
    outside = R - np.bincount(dom, minlength=len(names))
    if (outside[n > 0] == 0).any():  # cannot happen: a need implies a second domain
        raise ConfigError("experts confined to the only fault domain cannot be mirrored outside it")
    return int(max(-(-total // R), (-(-n[n > 0] // outside[n > 0])).max()))


# -- assignment --------------------------------------------------------------------------
def _check_capacity(capacity: Sequence[int], ranks: int,
                    error: Callable[[str], Exception] = ConfigError) -> np.ndarray:
    """int64 ``[ranks]``: ``capacity`` when it is ``ranks`` integers in ``0..MAX_ROWS``."""
    try:
        cap = np.array([operator.index(c) for c in capacity], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise error(f"capacity must be one integer per rank, got {describe(capacity)}") from None
    if cap.shape != (ranks,) or (cap < 0).any() or (cap > MAX_ROWS).any():
        raise error(f"capacity must give 0..{MAX_ROWS} rows for each of {ranks} ranks, got {describe(capacity)}")
    return cap


def _priority(placement: ExpertPlacement, need: np.ndarray, load: np.ndarray | None) -> np.ndarray:
    """int64 ``[n]``: the flat ids of the needed experts, fewest replicas first (a lost
    domain strands them soonest), then most load, then (layer, logical)."""
    idx = np.flatnonzero(need.ravel())
    if load is None:
        w = np.zeros(idx.size)
    else:
        w = np.asarray(load, dtype=np.float64)
        if w.shape != need.shape or not np.isfinite(w).all() or (w < 0).any():
            raise ConfigError(f"load must be finite, non-negative and shaped {list(need.shape)}, "
                              f"got shape {list(w.shape)}")
        w = w.ravel()[idx]
    return idx[np.lexsort((idx, -w, placement.logcnt.ravel()[idx]))]


def _kept(previous: MirrorAssignment | None, need: np.ndarray, conf: np.ndarray, dom: np.ndarray,
          cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank, row) int64 ``[L * E]``: the mirrors of ``previous`` still needed and valid
    (outside the confining domain, within capacity); of two sharing a (rank, row) the
    first in (layer, logical) order stays."""
    none = np.full(need.size, -1, dtype=np.int64)
    if previous is None:
        return none, none.copy()
    if previous.rank.shape != need.shape:
        raise PlacementError(f"previous mirrors are shaped {tuple(previous.rank.shape)}, "
                             f"the placement {tuple(need.shape)}: renumber them first")
    rank, row = previous.rank.ravel().astype(np.int64), previous.row.ravel().astype(np.int64)
    ok = need.ravel() & (rank >= 0) & (rank < dom.size)
    r = np.where(ok, rank, 0)
    ok &= (dom[r] != conf.ravel()) & (row >= 0) & (row < cap[r])
    flat = np.flatnonzero(ok)
    _, first = np.unique(rank[flat] * (int(cap.max(initial=0)) + 1) + row[flat], return_index=True)
    keep = flat[first]
    out_rank, out_row = none, none.copy()
    out_rank[keep], out_row[keep] = rank[keep], row[keep]
    return out_rank, out_row


def _select(d_of: np.ndarray, free: np.ndarray, dom: np.ndarray, num_domains: int) -> np.ndarray:
    """bool ``[n]``: which experts (confined to domains ``d_of`` ``[n]``, in priority
    order) the greedy takes with ``free`` ``[R]`` rows left. The greedy adds an expert
    while ``sum(n) <= C`` and ``n[d] <= C - capdom[d]`` hold; adding one of ``d`` changes
    only those two, so an expert is taken iff it is among the first ``C - capdom[d]`` of
    its domain and among the first ``C`` such candidates."""
    C = int(free.sum())
    slack = C - np.bincount(dom, weights=free, minlength=num_domains).astype(np.int64)
    order = np.argsort(d_of, kind="stable")
    sd = d_of[order]
    starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]]) if sd.size else np.zeros(0, dtype=np.int64)
    nth = np.empty(d_of.size, dtype=np.int64)
    nth[order] = np.arange(d_of.size) - np.repeat(starts, np.diff(np.r_[starts, d_of.size]))
    cand = nth < slack[d_of]
    return cand & (np.cumsum(cand) <= C)


def _place(d_of: np.ndarray, free: np.ndarray, dom: np.ndarray, num_domains: int) -> np.ndarray:
    """int64 ``[n]``: a rank for each selected expert (domains ``d_of`` ``[n]``, a set
    Hall's condition admits): in the tight domain other than its own if there is one,
    else the rank outside its domain with the most free rows (lowest on ties). See the
    module docstring for why this never strands a later expert."""
    free = free.copy()
    # base[x] - t is domain x's slack C - capdom[x] - n[x] after t placements: a step
    # lowers every slack by one but those of the expert's and the chosen rank's domains.
    base = int(free.sum()) - np.bincount(dom, weights=free, minlength=num_domains).astype(np.int64)
    base -= np.bincount(d_of, minlength=num_domains)
    inside = dom[None, :] == np.arange(num_domains)[:, None]  # [D, R]
    big = 1 << 62  # past any slack: lifts the expert's own domain out of the argmin
    out = np.empty(d_of.size, dtype=np.int64)
    for t, d in enumerate(d_of.tolist()):
        base[d] += big  # its own domain cannot take it
        x = int(base.argmin())
        base[d] -= big
        allowed = inside[x] if base[x] == t else ~inside[d]
        r = int(np.where(allowed, free, -1).argmax())
        free[r] -= 1
        base[d] += 1
        base[dom[r]] += 1
        out[t] = r
    return out


def _lowest_rows(ranks: np.ndarray, kept_rank: np.ndarray, kept_row: np.ndarray) -> np.ndarray:
    """int64 ``[n]``: for each new mirror on ``ranks`` ``[n]`` (in order), the lowest row
    of its rank that no kept mirror (``kept_rank``/``kept_row``, ``-1`` none) holds."""
    out = np.empty(ranks.size, dtype=np.int64)
    for r in np.unique(ranks).tolist():
        mine = np.flatnonzero(ranks == r)
        taken = kept_row[kept_rank == r]
        span = np.arange(mine.size + taken.size)
        out[mine] = span[~np.isin(span, taken)][: mine.size]
    return out


def _fill(kept: tuple[np.ndarray, np.ndarray], order: np.ndarray, conf: np.ndarray, dom: np.ndarray,
          cap: np.ndarray) -> MirrorAssignment:
    """``kept`` plus mirrors for the most of the uncovered experts of ``order`` (flat
    ids in priority order) that the rows left can take."""
    rank, row = kept[0].copy(), kept[1].copy()
    num_domains = int(dom.max()) + 1
    todo = order[rank[order] < 0]
    free = cap - np.bincount(rank[rank >= 0], minlength=dom.size)
    d_of = conf.ravel()[todo]
    todo = todo[_select(d_of, free, dom, num_domains)]
    ranks = _place(conf.ravel()[todo], free, dom, num_domains)
    rank[todo], row[todo] = ranks, _lowest_rows(ranks, *kept)
    return MirrorAssignment(rank.reshape(conf.shape), row.reshape(conf.shape))


def assign_mirrors(placement: ExpertPlacement, node_of: Sequence[str], capacity: Sequence[int],
                   load: np.ndarray | None = None, previous: MirrorAssignment | None = None) -> MirrorAssignment:
    """Mirrors so that losing any one fault domain leaves every expert a GPU replica or
    a mirror outside it, as far as the rows allow.

    ``node_of``: ``[R]`` node labels (``""`` unknown: the rank is its own domain);
    ``capacity``: ``[R]`` rows of each rank's buffer; ``load``: ``[L, E]`` (None: uniform);
    ``previous``: the last assignment, in this placement's rank numbering
    (:meth:`MirrorAssignment.renumbered`). Returns mirrors only for the experts that
    need one (:func:`needs_mirror`).

    Every previous mirror still needed and valid stays (no bytes move for it). The
    other needed experts are taken by priority (fewest GPU replicas, then most load,
    then (layer, logical)) while Hall's condition holds, which covers the most that fit
    (module docstring); each goes to the rank that keeps the rest feasible, else the
    one with the most free rows, at its lowest free row. If kept mirrors block rows a
    fresh assignment would use, the fresh one is returned when it covers more."""
    dom, names = _domains(node_of, placement.ep_size)
    cap = _check_capacity(capacity, placement.ep_size)
    need, conf = _needs(placement, dom, len(names))
    order = _priority(placement, need, load)
    out = _fill(_kept(previous, need, conf, dom, cap), order, conf, dom, cap)
    if previous is not None and out.count() < order.size:
        fresh = _fill(_kept(None, need, conf, dom, cap), order, conf, dom, cap)
        if fresh.count() > out.count():
            return fresh
    return out


# -- what a domain's loss costs ----------------------------------------------------------
@dataclass(frozen=True)
class DomainLoss:
    """What losing one fault domain strands: experts with neither a GPU replica nor a
    (ready) mirror outside it, read back from disk.

    Attributes:
        label: the worst domain: its node label, or ``rank <r>`` for an unlabeled rank.
        experts: how many (layer, logical) pairs its loss strands (times the expert's
            bytes: what the disk must read).
        per_domain: every domain's count, by label: ``{"n0": 0, "n1": 3, "rank 9": 1}``.
    """

    label: str
    experts: int
    per_domain: dict[str, int]


def worst_domain_loss(placement: ExpertPlacement, node_of: Sequence[str], mirrors: MirrorAssignment | None,
                      ready: np.ndarray | None = None) -> DomainLoss:
    """The domain whose loss strands the most experts (the first on ties). ``ready``:
    bool ``[L, E]``, the mirrors whose bytes are in place (None: all of them). An
    expert whose replicas all sit in the lost domain counts unless its mirror lies
    outside it; one with no replica at all counts for every domain but its mirror's.
    With a single domain, its loss strands every expert."""
    dom, names = _domains(node_of, placement.ep_size)
    D, shape = len(names), (placement.num_layers, placement.num_logical)
    lo, hi = _replica_domains(placement, dom, D)
    md = np.full(shape, -1, dtype=np.int64)
    if mirrors is not None:
        mirrors.validate(placement.ep_size, [MAX_ROWS] * placement.ep_size, shape)
        md = np.where(mirrors.rank >= 0, dom[np.maximum(mirrors.rank, 0)], -1)
    if ready is not None:
        ready = np.asarray(ready)
        if ready.shape != shape or ready.dtype != np.bool_:
            raise PlacementError(f"ready must be bool {list(shape)}, got {ready.dtype} {list(ready.shape)}")
        md = np.where(ready, md, -1)
    stranded = (lo == hi) & ~((md >= 0) & (md != lo))
    counts = np.bincount(lo[stranded], minlength=D)
    orphans = lo > hi  # no replica anywhere
    counts += int(orphans.sum()) - np.bincount(md[orphans & (md >= 0)], minlength=D)
    worst = int(counts.argmax())
    return DomainLoss(names[worst], int(counts[worst]), dict(zip(names, counts.tolist())))
