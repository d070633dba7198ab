"""Fault domains: the node each rank runs on, and how an expert's replicas spread over
nodes, so that losing one node leaves a GPU replica of every expert that had two or more.

A node label is one string per rank (the registration's ``node``). ``""`` is *no
information*: a replica on an unlabeled rank never makes an expert count as confined
to one node, and :func:`spread_over_nodes` never moves a replica to or from an
unlabeled rank (it cannot tell whether that helps). With no label, or one distinct
label, a placement is left exactly as it is.

Example: 2 ranks x 2 slots, ``phy2log [[0, 1, 0, 2]]``: on nodes ``["a", "a"]`` expert 0
(two replicas) is confined to node ``a``; on ``["a", "b"]`` it is not; on ``["a", ""]``
nothing is known, so it is not counted either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.errors import ConfigError

SLOT_COST = 0.02
"""What one more changed slot weighs against balance when the spreading pass picks a
swap: this fraction of the layer's mean rank load in excess load (the sum over ranks
of load above the mean), as min_migration's default ``min_gain``."""

_CHUNK = 1 << 20
"""Candidate swaps scored per batch of layers (``n x confined experts x partners``)."""

_WINDOW = 64
"""Partners first looked for per confined expert, by closest load (see ``_SCAN``)."""

_SCAN = 1 << 14
"""A layer whose confined experts x slots is at most this searches all slots at once
(and always once no confined expert finds a partner in its window)."""


def node_ids(node_of: Sequence[str], ranks: int) -> np.ndarray:
    """int64 ``[ranks]``: a dense id per distinct non-empty label, in order of first
    appearance, ``-1`` for ``""``. ``node_ids(["a", "", "b", "a"], 4) -> [0, -1, 1, 0]``."""
    labels = list(node_of)
    if len(labels) != ranks or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"node_of must hold one node label (a string) per new rank, {ranks} in all, "
                          f"got {len(labels)}")
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(x, len(ids)) if x else -1 for x in labels], dtype=np.int64)


def _counts(row: np.ndarray, spr: int, num_logical: int, ranks: int) -> np.ndarray:
    """int16 ``[L, E, ranks]``: replicas of each expert on each rank (``-1`` slots skipped)."""
    L, P = row.shape
    lay, slot = np.nonzero(row >= 0)
    key = (lay * num_logical + row[lay, slot]) * ranks + slot // spr
    return np.bincount(key, minlength=L * num_logical * ranks).astype(np.int16).reshape(L, num_logical, ranks)


def _per_node(held: np.ndarray, nid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``held`` ``[L, E, ranks]`` summed per node: ``[L, E, nodes]``, and ``[L, E]`` on
    unlabeled ranks."""
    known = np.flatnonzero(nid >= 0)
    by_node = known[np.argsort(nid[known], kind="stable")]  # ids are dense: every node has a rank
    starts = np.flatnonzero(np.diff(nid[by_node], prepend=-1))
    per = np.add.reduceat(held[:, :, by_node], starts, axis=-1) if by_node.size else held[:, :, :0]
    return per.astype(np.int16), held[:, :, nid < 0].sum(axis=-1, dtype=np.int16)


def _confined(per_node: np.ndarray, unlabeled: np.ndarray) -> np.ndarray:
    """``[L, E]``: two or more replicas, all on labeled ranks of one node."""
    cnt = per_node.sum(axis=-1) + unlabeled
    return (cnt >= 2) & (unlabeled == 0) & ((per_node > 0).sum(axis=-1) == 1)


def shared_node_mask(placement: ExpertPlacement, node_of: Sequence[str]) -> np.ndarray:
    """bool ``[num_layers, num_logical]``: the (layer, logical) pairs with two or more
    replicas that all sit on (labeled ranks of) one node: losing that node leaves them
    no GPU replica. ``node_of``: one label per rank of ``placement``."""
    nid = node_ids(node_of, placement.ep_size)
    held = _counts(placement.phy2log, placement.slots_per_rank, placement.num_logical, placement.ep_size)
    return _confined(*_per_node(held, nid))


def shared_node_experts(placement: ExpertPlacement, node_of: Sequence[str]) -> int:
    """How many (layer, logical) pairs :func:`shared_node_mask` marks."""
    return int(shared_node_mask(placement, node_of).sum())


def spread_over_nodes(carry: np.ndarray, row: np.ndarray, load: np.ndarray, node_of: Sequence[str],
                      spr: int, slot_cost: float = SLOT_COST) -> np.ndarray:
    """``row`` ``[L, P]`` (a full placement; ``carry`` ``[L, P]``: what each slot held
    before the change, ``-1`` empty; ``load`` ``[L, E]``) after swaps of two slots on
    different nodes, so that every expert with two or more replicas spans two or more
    nodes where a swap allows it. Returns ``row`` itself when fewer than two nodes are
    labeled (``node_of``: one label per rank, ``""`` unknown).

    A swap exchanges a slot ``x`` of a confined expert ``ex`` (node ``A``) with a slot
    ``y`` on a labeled rank of another node, holding ``ey``; it is allowed when neither
    rank then holds its new expert twice, ``ey`` is not left confined (it has fewer
    than two replicas, one on an unlabeled rank, or one off node ``A``), and ``ex`` and
    ``ey`` both have or both lack a replica in ``carry`` (each rank keeps its count of
    experts read from disk). Replica counts never change, so neither does any slot's
    share of load.

    Each round, per layer, every confined expert proposes its best swap: least gain
    of the layer's peak rank load, plus ``slot_cost`` x mean rank load per slot changed
    vs ``carry`` (as ``keep_local_slots`` counts them). Swaps sharing no rank and no
    expert are made, the best one always. A made swap un-confines ``ex`` and confines
    no one, so rounds are bounded. Partners are first looked for among the ``_WINDOW``
    slots of closest load (when the full search is large), then among all slots.
    Guarantee on return: no confined expert has an allowed swap from any of its slots.
    """
    nid = node_ids(node_of, row.shape[1] // spr)
    if np.unique(nid[nid >= 0]).size < 2:
        return row
    s = _Spread.start(carry, row, np.asarray(load, dtype=np.float64), nid, spr)
    P = row.shape[1]
    todo = _confined(s.per_node, s.unlabeled)
    s.wide = todo.sum(axis=1) * P <= _SCAN  # small searches see every slot at once
    while True:
        todo = _confined(s.per_node, s.unlabeled) & (s.tried < s.cnt)
        ls = np.flatnonzero(todo.any(axis=1))
        if ls.size == 0:
            return s.row
        for wide in (False, True):
            part = ls[s.wide[ls] == wide]
            if part.size:
                per = int(todo[part].sum(axis=1).max()) * (P if wide else _WINDOW)
                size = max(1, _CHUNK // per)
                for i in range(0, part.size, size):
                    s.round(part[i:i + size], todo[part[i:i + size]], slot_cost, wide)


def _pos(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return np.maximum(x - mean, 0.0)


def _at(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[i, idx[i, ...]]`` for ``a`` ``[n, P]`` and ``idx`` ``[n or 1, ...]``."""
    return np.take(a, np.arange(a.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1)) * a.shape[1] + idx)


@dataclass
class _Spread:
    """:func:`spread_over_nodes`'s state, all layers at once.

    ``row``/``carry``: ``[L, P]``; ``held``/``held0``: ``[L, E, R]`` replicas per rank
    now / in ``carry``; ``per_node``: ``[L, E, N]``; ``unlabeled``/``cnt``/``kept``/
    ``per``: ``[L, E]`` replicas on unlabeled ranks, replicas, has one in ``carry``,
    load per replica; ``rl``: ``[L, R]`` rank loads; ``tried``: ``[L, E]`` slots of a
    confined expert found without an allowed swap since its layer last changed;
    ``wide``: ``[L]`` the layer's partners are searched among all slots.
    """

    row: np.ndarray
    carry: np.ndarray
    spr: int
    nid: np.ndarray
    held: np.ndarray
    held0: np.ndarray
    per_node: np.ndarray
    unlabeled: np.ndarray
    cnt: np.ndarray
    kept: np.ndarray
    per: np.ndarray
    rl: np.ndarray
    tried: np.ndarray
    wide: np.ndarray

    @classmethod
    def start(cls, carry: np.ndarray, row: np.ndarray, w: np.ndarray, nid: np.ndarray, spr: int) -> "_Spread":
        L, E, R = w.shape[0], w.shape[1], nid.size
        held, held0 = _counts(row, spr, E, R), _counts(carry, spr, E, R)
        per_node, unlabeled = _per_node(held, nid)
        cnt = held.sum(axis=-1, dtype=np.int64)
        per = w / np.maximum(cnt, 1)
        rl = np.take_along_axis(per, row, axis=1).reshape(L, R, spr).sum(axis=-1)
        return cls(row=np.array(row, dtype=np.int64), carry=carry, spr=spr, nid=nid, held=held, held0=held0,
                   per_node=per_node, unlabeled=unlabeled, cnt=cnt, kept=held0.sum(axis=-1) > 0, per=per,
                   rl=rl, tried=np.zeros((L, E), dtype=np.int64), wide=np.ones(L, dtype=bool))

    @property
    def ranks(self) -> int:
        return self.nid.size

    def _gather(self, table: np.ndarray, ls: np.ndarray, e: np.ndarray, col: np.ndarray) -> np.ndarray:
        """``table[ls, e, col]`` for ``table`` ``[L, E, C]``, ``e``/``col`` broadcast
        against ``[n, ...]``."""
        _, E, C = table.shape
        lead = ls.reshape((-1,) + (1,) * (max(e.ndim, col.ndim) - 1))
        return np.take(table, ((lead * E + e) * C + col))

    def round(self, ls: np.ndarray, todo: np.ndarray, slot_cost: float, wide: bool) -> None:
        """One round on layers ``ls`` (``todo`` ``[n, E]``: their confined experts with
        slots left to try): propose, make the swaps that share nothing. An expert with
        no allowed partner among all slots tries its next slot; a layer where no expert
        found one in its window searches all slots from then on."""
        v = _first_true(todo)  # [n, B]
        x = self._slot_to_try(ls, self.row[ls], np.maximum(v, 0))
        cand = np.arange(self.row.shape[1])[None, None, :] if wide else self._window(ls, x)
        ok, y, score = self._propose(ls, v, x, cand, slot_cost)
        ids = np.stack([x // self.spr, y // self.spr, self.ranks + np.maximum(v, 0),
                        self.ranks + np.take_along_axis(self.row[ls], y, axis=1)], axis=-1)
        made = ok & _disjoint(ids, score, self.ranks + self.cnt.shape[1])
        li, bi = np.nonzero(made)
        self._swap(ls[li], x[li, bi], y[li, bi])
        if wide:
            stuck = (v >= 0) & ~ok
            self.tried[np.broadcast_to(ls[:, None], v.shape)[stuck], v[stuck]] += 1
        else:
            self.wide[ls[~ok.any(axis=1)]] = True
        self.tried[ls[made.any(axis=1)]] = 0  # the layer changed: every slot is worth a new try

    def _window(self, ls: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``[n, B, _WINDOW]``: the slots whose share of load is closest to slot ``x``'s
        ``[n, B]`` (a run of the layer's slots sorted by load)."""
        n, P = ls.size, self.row.shape[1]
        k = min(_WINDOW, P)
        load = np.take_along_axis(self.per[ls], self.row[ls], axis=1)
        order = np.argsort(load, axis=1, kind="stable")
        step = 2.0 * float(load.max(initial=0.0)) + 1.0  # rows one after another in one sorted run
        lift = np.arange(n)[:, None] * step
        at = np.searchsorted((np.take_along_axis(load, order, axis=1) + lift).ravel(),
                             (np.take_along_axis(load, x, axis=1) + lift).ravel()).reshape(x.shape)
        first = np.clip(at - np.arange(n)[:, None] * P - k // 2, 0, P - k)
        return _at(order, first[..., None] + np.arange(k))

    def _propose(self, ls: np.ndarray, v: np.ndarray, x: np.ndarray, cand: np.ndarray, slot_cost: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per confined expert ``v`` ``[n, B]`` (``-1`` padded) of layers ``ls``, moving
        from its slot ``x`` ``[n, B]`` to one of the slots ``cand`` ``[n or 1, B or 1,
        K]``: whether an allowed swap exists, the best partner slot and its score
        (``[n, B]`` each)."""
        row, ex, spr = self.row[ls], np.maximum(v, 0), self.spr
        r1, r2 = x // spr, cand // spr
        a, b, ey = self.nid[r1], self.nid[r2], _at(row, cand)
        ok = (v >= 0)[..., None] & (b >= 0) & (b != a[..., None])
        ok &= self._gather(self.held, ls, ex[..., None], r2) == 0
        ok &= self._gather(self.held, ls, ey, r1[..., None]) == 0
        ok &= _at(self.kept[ls], ey) == self.kept[ls[:, None], ex][..., None]
        cnt_y = _at(self.cnt[ls], ey)
        off_a = cnt_y - 1 - self._gather(self.per_node, ls, ey, a[..., None])  # ey's other replicas off A
        ok &= (cnt_y < 2) | (_at(self.unlabeled[ls], ey) > 0) | (off_a > 0)
        # Slots changed vs carry, as keep_local_slots counts them (no rank holds ex or ey twice here).
        cost = (self._gather(self.held, ls, ey, r2) <= self._gather(self.held0, ls, ey, r2)).astype(np.int64)
        cost = cost + (self._gather(self.held, ls, ex, r1) <= self._gather(self.held0, ls, ex, r1))[..., None]
        cost -= self._gather(self.held0, ls, ey, r1[..., None]) > 0
        cost -= self._gather(self.held0, ls, ex[..., None], r2) > 0
        score = self._load_score(ls, ex, r1, ey, r2)
        score += slot_cost * np.maximum(self.rl[ls].mean(axis=1), 1e-12)[:, None, None] * cost
        score[~ok] = np.inf
        k = np.argmin(score, axis=-1)[..., None]
        best = np.take_along_axis(score, k, axis=-1)[..., 0]
        return np.isfinite(best), np.take_along_axis(np.broadcast_to(cand, score.shape), k, axis=-1)[..., 0], best

    def _load_score(self, ls: np.ndarray, ex: np.ndarray, r1: np.ndarray, ey: np.ndarray, r2: np.ndarray) -> np.ndarray:
        """``[n, B, K]``: what swapping ``ex`` on ``r1`` ``[n, B]`` with ``ey`` on ``r2``
        ``[n or 1, B or 1, K]`` costs the balance: the gain of the layer's peak rank
        load, then (1e-3) of its excess, then (1e-6) the load moved, so that ties go to
        the partner of closest load, a different one for each expert (a first choice
        all shared would leave one swap per round)."""
        rl = self.rl[ls]
        mean, peak = rl.mean(axis=1)[:, None, None], rl.max(axis=1)[:, None, None]
        d = _at(self.per[ls], ey) - self.per[ls[:, None], ex][..., None]  # load r1 takes, r2 sheds
        rl1, rl2 = np.take_along_axis(rl, r1, axis=1)[..., None], _at(rl, r2)
        score = np.maximum(np.maximum(rl1 + d, rl2 - d) - peak, 0.0)
        score += 1e-3 * (_pos(rl1 + d, mean) - _pos(rl1, mean) + _pos(rl2 - d, mean) - _pos(rl2, mean))
        score += 1e-6 * np.abs(d)
        return score

    def _slot_to_try(self, ls: np.ndarray, row: np.ndarray, ex: np.ndarray) -> np.ndarray:
        """``[n, B]``: the slot of expert ``ex`` that its ``tried`` count points at, its
        slots taken in order of preference: a slot already changing first (one transfer
        less), then the most loaded rank's (the swap may lighten it)."""
        rank_load = np.repeat(self.rl[ls], self.spr, axis=1)
        order = np.lexsort((-rank_load, row == self.carry[ls], row), axis=-1)  # grouped by expert
        cnt = self.cnt[ls]
        start = np.cumsum(cnt, axis=1) - cnt
        k = np.take_along_axis(start + self.tried[ls], ex, axis=1)
        return np.take_along_axis(order, np.minimum(k, row.shape[1] - 1), axis=1)

    def _swap(self, ls: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Exchange slots ``x`` and ``y`` (``[n]`` each) of layers ``ls``; no two swaps of
        one layer share a rank or an expert, so no index repeats below."""
        ex, ey = self.row[ls, x], self.row[ls, y]
        r1, r2 = x // self.spr, y // self.spr
        a, b = self.nid[r1], self.nid[r2]
        self.row[ls, x], self.row[ls, y] = ey, ex
        for e, src, dst, na, nb in ((ex, r1, r2, a, b), (ey, r2, r1, b, a)):
            self.held[ls, e, src] -= 1
            self.held[ls, e, dst] += 1
            self.per_node[ls, e, na] -= 1
            self.per_node[ls, e, nb] += 1
        d = self.per[ls, ey] - self.per[ls, ex]
        self.rl[ls, r1] += d
        self.rl[ls, r2] -= d


def _first_true(mask: np.ndarray) -> np.ndarray:
    """``[n, B]``: the column indices of the ``True`` entries of each row of ``mask``
    ``[n, E]``, in order, ``-1`` padded (``B >= 1``)."""
    width = max(int(mask.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(~mask, axis=1, kind="stable")[:, :width]
    return np.where(np.take_along_axis(mask, order, axis=1), order, -1)


def _disjoint(ids: np.ndarray, score: np.ndarray, width: int) -> np.ndarray:
    """``[n, B]``: the proposals of each layer (``ids`` ``[n, B, k]``: what each one
    touches, ``< width``) that come first, in order of ``score`` ``[n, B]``, for every
    id they touch. The best proposal of a layer always does."""
    n, B, k = ids.shape
    order = np.argsort(score, axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(B), (n, B)), axis=1)
    flat = np.arange(n)[:, None, None] * width + ids
    first = np.full(n * width, B, dtype=np.int64)
    np.minimum.at(first, flat.ravel(), np.broadcast_to(pos[..., None], ids.shape).ravel())
    return (first[flat] == pos[..., None]).all(axis=-1)
