"""Rebalance policies: from the old placement, a rank mapping and the expert load, the
new placement.

Two policies behind one interface, chosen by name (``get_policy("min_migration")``):

- ``deepseek``: DeepSeek's EPLB recomputed from scratch on the new rank count (best
  balance, moves most experts), then each rank's slots are permuted so that an expert
  already on a rank keeps its slot there.
- ``min_migration``: keeps every surviving replica where it is, gives each expert left
  without a replica a slot (freeing redundant replicas where needed, spreading those
  slots over the ranks so disk reads run in parallel), fills new ranks with replicas
  of the most loaded experts, then makes a bounded number of swaps only where a swap
  lowers the layer's peak rank load by a set fraction of the mean.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.errors import ConfigError
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.rank_mapping import RankMapping


def _check_inputs(old: ExpertPlacement, mapping: RankMapping, load: np.ndarray) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (old.num_layers, old.num_logical):
        raise ConfigError(
            f"load must be [num_layers={old.num_layers}, num_logical={old.num_logical}], "
            f"got shape {load.shape}"
        )
    if not np.isfinite(load).all() or (load < 0).any():
        raise ConfigError("load must be finite and non-negative")
    new_slots = mapping.new_ep_size * old.slots_per_rank
    if new_slots < old.num_logical:
        raise ConfigError(
            f"{mapping.new_ep_size} ranks x {old.slots_per_rank} slots = {new_slots} slots cannot "
            f"hold {old.num_logical} logical experts: keep more ranks or add slots per rank"
        )
    return load


def _excess(rank_load: np.ndarray) -> np.ndarray:
    """Load above the mean, summed over ranks (the last axis)."""
    above = rank_load - rank_load.mean(axis=-1, keepdims=True)
    return np.maximum(above, 0.0, out=above).sum(axis=-1)


def _true_indices(mask: np.ndarray, most: int) -> np.ndarray:
    """``[X, k]``: the column indices of the ``True`` entries of each row of ``mask``
    ``[X, n]``, in order, at most ``most`` of them, ``-1`` padded (``k >= 1``)."""
    counts = mask.sum(axis=-1)
    k = int(min(max(counts.max(initial=1), 1), most))
    r, c = np.nonzero(mask)  # row-major: each row's columns in order
    nth = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = nth < k
    out = np.full((mask.shape[0], k), -1, dtype=np.int64)
    out[r[keep], nth[keep]] = c[keep]
    return out


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``[n, K, H]``: ``x[i, idx[i]]`` for ``x`` ``[n, M, H]`` and ``idx`` ``[n, K]``
    (``np.take`` of whole rows: far faster than ``take_along_axis`` over three axes)."""
    n, M, H = x.shape
    return np.take(x.reshape(n * M, H), np.arange(n)[:, None] * M + idx, axis=0)


def _near_min(score: np.ndarray, tol: np.ndarray, most: int) -> np.ndarray:
    """``[X, k]``: the indices of each row of ``score`` ``[X, n]`` within ``tol`` ``[X]``
    of the row's minimum, in order, at most ``most`` of them, ``-1`` padded."""
    return _true_indices(score <= (score.min(axis=-1) + tol)[:, None], most)


class RebalancePolicy(ABC):
    """Computes the placement after a membership change (or a load-driven rebalance,
    with an identity mapping). Implementations are pure: no I/O, no global state."""

    name: ClassVar[str]

    def rebalance(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray,
                  nodes: int | None = None) -> ExpertPlacement:
        """``load``: ``[num_layers, num_logical]``; ``nodes``: the number of distinct
        nodes the new ranks run on, when known (a policy that places by node uses it
        instead of its configured count: after a scale-down fewer nodes may be left).
        Returns a valid placement on ``mapping.new_ep_size`` ranks with
        ``old.slots_per_rank`` slots each, in which an expert that stays on a rank keeps
        its slot there."""
        load = _check_inputs(old, mapping, load)
        if nodes is not None and not 1 <= nodes <= mapping.new_ep_size:
            raise ConfigError(f"nodes={nodes} must be between 1 and the new rank count {mapping.new_ep_size}")
        carry = mapping.carry_over(old)
        phy2log = keep_local_slots(carry, self.place(old, mapping, load, carry, nodes), old.slots_per_rank)
        new = ExpertPlacement(phy2log, old.slots_per_rank, old.num_logical)
        new.validate()
        return new

    @abstractmethod
    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray,
              nodes: int | None = None) -> np.ndarray:
        """The new ``phy2log`` ``[num_layers, new_ep_size * slots_per_rank]``; slot order
        inside a rank is free (``rebalance`` restores kept slots). ``carry`` is
        ``mapping.carry_over(old)``; ``load`` and ``nodes`` are checked."""


def keep_local_slots(before: np.ndarray, after: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Permute ``after`` inside each rank so that an expert that ``before`` already had
    on that rank stays in its slot (no shuffles inside a rank).

    before: [num_layers, num_physical], ``-1`` for an empty slot
    after: [num_layers, num_physical], same shape
    Returns: [num_layers, num_physical], each rank holding the same multiset as ``after``.

    Per rank: the ``k``-th copy of an expert in ``before`` keeps its slot if ``after``
    has more than ``k`` copies of it there; the rest of ``after`` (its first copies of
    each kept expert taken out) fills the other slots in order. All ranks at once.
    """
    L, P = after.shape
    b = before.reshape(-1, slots_per_rank)
    a = after.reshape(-1, slots_per_rank)
    earlier = np.tril(np.ones((slots_per_rank, slots_per_rank), dtype=bool), -1)

    def nth_copy(x: np.ndarray) -> np.ndarray:  # [M, spr]: copies of x[i] before slot i
        return ((x[:, :, None] == x[:, None, :]) & earlier).sum(axis=-1)

    keep = (b >= 0) & (nth_copy(b) < (b[:, :, None] == a[:, None, :]).sum(axis=-1))
    taken = (a >= 0) & (nth_copy(a) < (a[:, :, None] == b[:, None, :]).sum(axis=-1))
    free = np.argsort(keep, axis=1, kind="stable")  # the other slots first, in order
    rest = np.argsort(taken, axis=1, kind="stable")  # what is left of after, in order
    fill = np.arange(slots_per_rank) < (~keep).sum(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(a.shape[0])[:, None], a.shape)
    out = np.where(keep, b, a)
    out[rows[fill], free[fill]] = a[rows[fill], rest[fill]]
    return out.reshape(L, P)


@dataclass(frozen=True)
class DeepSeekPolicy(RebalancePolicy):
    """DeepSeek's EPLB on the new rank count.

    The node count is ``nodes`` of ``rebalance`` when given (the nodes the new ranks
    run on, as vLLM recounts them after a scale-down), else ``num_nodes``. When
    ``num_groups`` is not a multiple of it, the global policy runs (one node, one
    group), as the reference does; when the new rank count is not a multiple of it,
    the ranks are taken as one node, as vLLM does.
    """

    num_groups: int = 1
    num_nodes: int = 1
    name: ClassVar[str] = "deepseek"

    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray,
              nodes: int | None = None) -> np.ndarray:
        ep = mapping.new_ep_size
        n = nodes or self.num_nodes
        # rebalance_experts itself runs the global policy when groups do not divide.
        phy2log, _, _ = rebalance_experts(load, ep * old.slots_per_rank, self.num_groups, n if ep % n == 0 else 1, ep)
        return phy2log.numpy()


@dataclass(frozen=True)
class MinMigrationPolicy(RebalancePolicy):
    """Keep surviving replicas in place; move only what must move, plus moves that pay.

    Every step below runs on all layers at once (layers are independent; each array
    has a leading layer axis), so one Python loop runs over the step, not the layer.

    Attributes:
        min_gain: a move is made only if it lowers the layer's excess load (the sum
            over ranks of load above the mean) by at least this fraction of the mean
            rank load per transfer it costs.
        max_moves_per_layer: transfers per layer that balance may add beyond the
            ones the membership change forces.
    """

    min_gain: float = 0.01
    max_moves_per_layer: int = 8
    name: ClassVar[str] = "min_migration"

    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray,
              nodes: int | None = None) -> np.ndarray:
        s = _Layers.start(carry, load, old.slots_per_rank)
        s.home_missing()
        s.fill_empty()
        self._moves_that_pay(s)
        return s.row

    def _moves_that_pay(self, s: "_Layers") -> None:
        """3. Moves that pay for balance, while the budget lasts: re-home a replica of
        an expert of the peak rank, or swap a slot of the peak rank with another,
        whichever lowers the layer's excess load (sum over ranks of load above the
        mean) most per transfer it adds, if by at least min_gain x mean. Excess rather
        than peak, so that lowering one of several equal peaks counts. Only experts
        that kept a replica on a surviving rank get new copies, and a swap never raises
        the most disk reads a rank makes: no move adds to or concentrates the disk reads.
        """
        L = s.row.shape[0]
        s.disk_cap = s.taken.max(axis=1)
        active = np.ones(L, dtype=bool)
        spent = np.zeros(L, dtype=np.int64)
        for _ in range(4 * self.max_moves_per_layer + s.spr):  # each accepted move lowers excess
            ls = np.flatnonzero(active)
            if ls.size == 0:
                break
            rl = s.rank_loads(ls)
            rep, swap = s.best_replicate(ls, rl), s.best_swap(ls, rl)
            use_swap = swap.ok & (~rep.ok | (swap.key > rep.key))
            gain = np.where(use_swap, swap.gain, rep.gain)
            cost = np.where(use_swap, swap.cost, rep.cost)
            with np.errstate(divide="ignore", invalid="ignore"):
                poor = (cost > 0) & ((gain / cost < self.min_gain * rl.mean(axis=-1))
                                     | (spent[ls] + cost > self.max_moves_per_layer))
            go = (rep.ok | swap.ok) & ~poor
            active[ls[~go]] = False
            s.apply_replicate(ls[go & ~use_swap], rep, go & ~use_swap)
            s.apply_swap(ls[go & use_swap], swap, go & use_swap)
            spent[ls[go]] += np.maximum(cost[go], 0)


@dataclass
class _Move:
    """The best move of each layer of a step, all ``[n]``: ``ok``, ``gain``, ``cost``
    (transfers it adds), ``key`` (gain per transfer, the ranking key); ``a``/``b``: the
    slot and the expert it takes (replicate), or a peak-rank slot and the slot it is
    exchanged with (swap)."""

    ok: np.ndarray
    gain: np.ndarray
    cost: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @property
    def key(self) -> np.ndarray:
        return self.gain / np.maximum(self.cost, 1e-9)


@dataclass
class _Layers:
    """min_migration's state, all layers at once.

    ``carry``/``row``: ``[L, P]`` experts before any transfer / now (``-1`` empty);
    ``cnt``: ``[L, E]`` replicas now; ``w``: ``[L, E]`` load; ``taken``: ``[L, ranks]``
    experts without a live replica placed on each rank; ``kept``: ``[L, E]`` experts
    with a replica on a surviving rank.
    """

    w: np.ndarray
    spr: int
    carry: np.ndarray
    kept: np.ndarray
    row: np.ndarray
    cnt: np.ndarray
    taken: np.ndarray
    disk_cap: np.ndarray | None = None
    """``[L]``: the most missing experts any rank took in step 1; no move exceeds it."""

    @classmethod
    def start(cls, carry: np.ndarray, w: np.ndarray, spr: int) -> "_Layers":
        L, P = carry.shape
        E = w.shape[1]
        flat = (np.arange(L)[:, None] * E + carry)[carry >= 0]
        cnt = np.bincount(flat, minlength=L * E).reshape(L, E)
        taken = np.zeros((L, P // spr), dtype=np.int64)
        return cls(w=w, spr=spr, carry=carry, kept=cnt > 0, row=carry.copy(), cnt=cnt, taken=taken)

    @property
    def ranks(self) -> int:
        return self.row.shape[1] // self.spr

    @property
    def slot_rank(self) -> np.ndarray:
        return np.arange(self.row.shape[1]) // self.spr

    def rank_loads(self, ls: np.ndarray) -> np.ndarray:
        """``[len(ls), ranks]`` load per rank of layers ``ls``, an expert's load split
        over its replicas (summed in slot order)."""
        row = self.row[ls]
        per = np.where(row >= 0, self._per_slot(ls, row), 0.0)
        idx = np.arange(ls.size)[:, None] * self.ranks + self.slot_rank
        return np.bincount(idx.ravel(), weights=per.ravel(), minlength=ls.size * self.ranks).reshape(ls.size, -1)

    def _per_slot(self, ls: np.ndarray, row: np.ndarray) -> np.ndarray:
        """``[len(ls), P]`` each slot's share of its expert's load (empty slots: any)."""
        e = np.maximum(row, 0)
        cnt = np.take_along_axis(self.cnt[ls], e, 1)
        return np.take_along_axis(self.w[ls], e, 1) / np.maximum(cnt, 1)

    def _place(self, ls: np.ndarray, slot: np.ndarray, e: np.ndarray) -> None:
        """Put expert ``e`` ``[n]`` in ``slot`` ``[n]`` of layers ``ls``, freeing the
        replica that was there."""
        was = self.row[ls, slot]
        np.subtract.at(self.cnt, (ls[was >= 0], was[was >= 0]), 1)
        self.row[ls, slot] = e
        np.add.at(self.cnt, (ls, e), 1)

    def home_missing(self) -> None:
        """1. Every expert without a replica gets a slot, heaviest first: an empty slot
        (a joining rank's, which must be filled anyway) on the least loaded rank if
        there is one, else the slot of a redundant replica on a rank that took the
        fewest such experts so far (so that their disk or peer reads spread over the
        ranks), the one whose replacement leaves the least excess load."""
        missing = self.cnt == 0
        order = np.argsort(np.where(missing, -self.w, np.inf), axis=1, kind="stable")
        num = missing.sum(axis=1)
        for i in range(int(num.max(initial=0))):
            ls = np.flatnonzero(num > i)
            e = order[ls, i]
            rl = self.rank_loads(ls)
            free = self.row[ls] < 0
            slot = np.argmin(np.where(free, rl[:, self.slot_rank], np.inf), axis=1)
            full = ~free.any(axis=1)
            if full.any():
                slot[full] = self._slot_to_replace(ls[full], e[full], rl[full])
            self._place(ls, slot, e)
            self.taken[ls, slot // self.spr] += 1

    def _slot_to_replace(self, ls: np.ndarray, e: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n]``: for layers ``ls`` without an empty slot, the redundant replica to give
        to missing expert ``e`` ``[n]``: on a rank that took the fewest missing experts,
        the one that leaves the least excess load."""
        row = self.row[ls]
        redundant = np.take_along_axis(self.cnt[ls], row, 1) >= 2
        tk = self.taken[ls][:, self.slot_rank]
        fewest = np.where(redundant, tk, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
        slots = _true_indices(redundant & (tk == fewest), row.shape[1])
        excess = self.excess_after_replacing(ls, e[:, None], slots, rl)
        return self._least_excess(ls, e[:, None], slots, rl, excess)[0]

    def _least_excess(self, ls: np.ndarray, h: np.ndarray, slots: np.ndarray, rl: np.ndarray,
                      excess: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (slot, expert) pair of least ``excess`` ``[n, H, K]`` (from
        :meth:`excess_after_replacing` on candidate ``slots`` ``[n, K]``, ``inf`` where not
        allowed): ``(slot, j, excess)`` ``[n]`` each, ``j`` indexing ``h`` ``[n, H]``.

        Pairs within rounding of the least are compared again by the rank loads
        summed in full (:meth:`_excess_in_full`), so that equal inputs give equal
        choices whichever formula found the candidates; the first 64 of them in
        (expert, slot) order, as ``slots`` is ascending."""
        n, H, K = excess.shape
        flat = excess.reshape(n, -1)
        near = np.maximum(_near_min(flat, 1e-9 * (1.0 + rl.sum(axis=-1)), 64), 0)
        slot, j = np.maximum(np.take_along_axis(slots, near % K, 1), 0), near // K
        full = self._excess_in_full(ls, np.take_along_axis(h, j, 1), slot, rl)
        full = np.where(np.isfinite(np.take_along_axis(flat, near, 1)), full, np.inf)
        best = np.argmin(full, axis=1)
        r = np.arange(n)
        return slot[r, best], j[r, best], full[r, best]

    def _excess_in_full(self, ls: np.ndarray, h: np.ndarray, slot: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n, K]``: the excess load after putting expert ``h`` in ``slot`` (both
        ``[n, K]``), with every rank's load written out: ``O(K x ranks)``."""
        K = h.shape[1]
        row, cnt, w = self.row[ls], self.cnt[ls], self.w[ls]
        a = np.maximum(np.take_along_axis(row, slot, 1), 0)
        wh, ch = np.take_along_axis(w, h, 1), np.take_along_axis(cnt, h, 1)
        wa, ca = np.take_along_axis(w, a, 1), np.take_along_axis(cnt, a, 1)
        on = self._replicas_per_rank(ls, np.concatenate([h, a], axis=1))
        on_h, on_a = on[:, :K], on[:, K:]
        with np.errstate(divide="ignore", invalid="ignore"):
            shed = wh / ch - wh / (ch + 1)
            # in place, as rl - on_h * shed + on_a * grow: these [n, K, ranks] arrays are the cost
            new = np.multiply(on_h, shed[..., None])
            np.subtract(rl[:, None, :], new, out=new)
            np.copyto(new, rl[:, None, :], where=(ch <= 0)[..., None])  # a missing h sheds nothing
            grow = wa / (ca - 1) - wa / ca
            new += np.multiply(on_a, grow[..., None])
            np.put_along_axis(new, (slot // self.spr)[..., None],
                              np.take_along_axis(new, (slot // self.spr)[..., None], -1)
                              + (wh / (ch + 1) - wa / ca - grow)[..., None], -1)
        return _excess(new)

    def _replicas_per_rank(self, ls: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``[n, K, ranks]``: the replicas of expert ``x`` ``[n, K]`` of layers ``ls`` on
        each rank. Slots sorted by expert give each expert's replicas as one run, so
        only ``x``'s replicas are visited (a hot expert may have a hundred: no padding
        to the longest run), never a whole expert x rank table."""
        row, cnt = self.row[ls], self.cnt[ls]
        n, K = x.shape
        P = row.shape[1]
        order = np.argsort(np.where(row >= 0, row, cnt.shape[1]), axis=1, kind="stable")
        start = np.take_along_axis(np.cumsum(cnt, axis=1) - cnt, x, 1) + np.arange(n)[:, None] * P
        runs = np.take_along_axis(cnt, x, 1).ravel()
        within = np.arange(runs.sum()) - np.repeat(np.cumsum(runs) - runs, runs)
        slot = order.ravel()[np.repeat(start.ravel(), runs) + within]
        idx = np.repeat(np.arange(n * K), runs) * self.ranks + slot // self.spr
        return np.bincount(idx, minlength=n * K * self.ranks).reshape(n, K, self.ranks)

    def excess_after_replacing(self, ls: np.ndarray, h: np.ndarray, slots: np.ndarray,
                               rl: np.ndarray) -> np.ndarray:
        """``[n, H, K]``: the excess load of layer ``ls[i]`` after putting expert
        ``h[i, j]`` in slot ``c = slots[i, k]`` instead of its expert ``a``, which must
        keep another replica; ``inf`` where ``c`` is ``-1`` or its rank holds ``h``.
        The ``h`` of a layer all have a replica, or there is one (``H == 1``).

        Every replica of ``h`` sheds load (its count grows), every other replica of
        ``a`` takes more, and ``c``'s rank swaps ``a``'s share for ``h``'s. The sum over
        ranks is then: the ranks as ``h`` leaves them ``[n, H]``, plus one term per
        (``a``, rank) pair summed per expert ``[n, E]``, corrected where a rank holds
        both ``h`` and ``a`` ``[n, E, H]`` (few such ranks), plus ``c``'s rank
        ``[n, H, K]``: no candidate array has a rank axis.
        """
        n, H = h.shape
        row, cnt, w = self.row[ls], self.cnt[ls], self.w[ls]
        wh, ch = np.take_along_axis(w, h, 1), np.take_along_axis(cnt, h, 1)  # [n, H]
        # A missing h adds its load to the layer (only ever alone: H == 1).
        mean = (rl.sum(axis=-1) + np.where(ch[:, 0] == 0, wh[:, 0], 0.0)) / self.ranks

        def pos(x: np.ndarray) -> np.ndarray:
            return np.maximum(x - mean.reshape((n,) + (1,) * (x.ndim - 1)), 0.0)

        hit = row[:, None, :] == h[:, :, None]  # [n, H, P]
        on_h = hit.reshape(n, H, self.ranks, self.spr).sum(axis=-1)
        shed = np.where(ch > 0, wh / np.maximum(ch, 1) - wh / (ch + 1), 0.0)
        base = rl[:, None, :] - on_h * shed[..., None]  # [n, H, R]
        a = np.maximum(row, 0)
        wa, ca = np.take_along_axis(w, a, 1), np.take_along_axis(cnt, a, 1)  # [n, P]
        grow = np.where(ca >= 2, wa / np.maximum(ca - 1, 1) - wa / np.maximum(ca, 1), 0.0)
        same, first = self._same_on_rank(row)
        shared = rl[:, self.slot_rank] + same * grow  # a slot's rank as a's other copies grow
        term = np.where(first, pos(shared) - pos(rl[:, self.slot_rank]), 0.0)
        per_a = self._per_expert(term, a)
        both = self._held_with_h(hit, first, a, base, same * grow, term, mean)
        # Candidates are laid out [n, K, H] so that every gather takes whole rows of H.
        c = np.maximum(slots, 0)
        ac = np.take_along_axis(a, c, 1)
        holds = on_h.transpose(0, 2, 1) > 0  # [n, R, H]
        # c's rank: a's share out (its other copies there grow), h's share in.
        out = np.take_along_axis(shared - wa / np.maximum(ca, 1) - grow, c, 1) - mean[:, None]
        total = _rows(both, ac)  # summed in place: these [n, K, H] arrays are the cost
        total += pos(base).sum(axis=-1)[:, None, :]
        total += (np.take_along_axis(per_a, ac, 1) - np.take_along_axis(pos(shared), c, 1))[..., None]
        c_rank = np.add(out[..., None], (wh / (ch + 1))[:, None, :])
        total += np.maximum(c_rank, 0.0, out=c_rank)
        bad = (slots < 0)[..., None] | _rows(holds, c // self.spr)
        return np.where(bad, np.inf, total).transpose(0, 2, 1)

    def _per_expert(self, term: np.ndarray, a: np.ndarray) -> np.ndarray:
        """``[n, E]``: ``term`` ``[n, P]`` summed over slots by their expert ``a`` ``[n, P]``."""
        n, E = term.shape[0], self.w.shape[1]
        idx = np.arange(n)[:, None] * E + a
        return np.bincount(idx.ravel(), weights=term.ravel(), minlength=n * E).reshape(n, E)

    def _held_with_h(self, hit: np.ndarray, first: np.ndarray, a: np.ndarray, base: np.ndarray,
                     gain: np.ndarray, term: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """``[n, E, H]``: on the ranks holding ``h`` (``hit`` ``[n, H, P]``), what each
        (``a``, rank) term changes when taken from ``base`` ``[n, H, R]`` (the rank after
        ``h`` sheds) instead of ``term`` ``[n, P]`` (from the rank as it is), summed per
        ``a``. ``gain`` ``[n, P]``: what a slot's rank takes as ``a``'s other copies grow;
        ``mean`` ``[n]``. Only ``h``'s ranks times their slots are visited."""
        n, H, P = hit.shape
        E = self.w.shape[1]
        i, s = np.nonzero((hit & first[:, None, :]).reshape(n * H, P))  # h's first slot on a rank
        lay, r = (i // H)[:, None], (s // self.spr)[:, None]
        t = r * self.spr + np.arange(self.spr)  # [M, spr]: the slots of that rank
        b, mm = base[lay, (i % H)[:, None], r], mean[lay]
        val = np.maximum(b + gain[lay, t] - mm, 0.0) - np.maximum(b - mm, 0.0) - term[lay, t]
        idx = (lay * E + a[lay, t]) * H + (i % H)[:, None]
        sel = first[lay, t]
        both = np.bincount(idx[sel], weights=val[sel], minlength=n * E * H)
        return both.astype(np.float64, copy=False).reshape(n, E, H)  # float even when no rank holds h

    def _same_on_rank(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, P]`` replicas of each slot's expert on its rank, and whether the slot is
        the first of them there. Ranks holding an expert twice are rare: only they are
        compared slot by slot (``spr x spr``), the others are found by sorting."""
        n, P = row.shape
        r3 = row.reshape(n * self.ranks, self.spr)
        srt = np.sort(r3, axis=-1)
        dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=-1))
        same = np.ones((n * self.ranks, self.spr), dtype=np.int64)
        first = np.ones((n * self.ranks, self.spr), dtype=bool)
        eq = r3[dup, :, None] == r3[dup, None, :]
        same[dup] = eq.sum(axis=-1)
        first[dup] = ~(eq & np.tril(np.ones((self.spr, self.spr), dtype=bool), -1)).any(axis=-1)
        return same.reshape(n, P), first.reshape(n, P)

    def fill_empty(self) -> None:
        """2. Empty slots (joining ranks) take replicas of the experts with the greatest
        load per replica, on the least loaded rank not already holding that expert."""
        while True:
            ls = np.flatnonzero((self.row < 0).any(axis=1))
            if ls.size == 0:
                return
            e = np.argmax(self.w[ls] / np.maximum(self.cnt[ls], 1), axis=1)
            row = self.row[ls]
            free = row < 0
            holders = (row == e[:, None]).reshape(ls.size, self.ranks, self.spr).any(axis=-1)
            pref = free & ~holders[:, self.slot_rank]
            free = np.where(pref.any(axis=1, keepdims=True), pref, free)
            rl = self.rank_loads(ls)
            self._place(ls, np.argmin(np.where(free, rl[:, self.slot_rank], np.inf), axis=1), e)

    def _peak(self, ls: np.ndarray, rl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The peak rank ``[n]`` of each layer and its slots ``[n, spr]``."""
        hi = np.argmax(rl, axis=1)
        return hi, hi[:, None] * self.spr + np.arange(self.spr)

    def best_replicate(self, ls: np.ndarray, rl: np.ndarray) -> _Move:
        """Per layer, giving an expert of the peak rank another copy in the place of a
        redundant replica of another expert (``a``: slot, ``b``: expert)."""
        row = self.row[ls]
        hi, xs = self._peak(ls, rl)
        h = np.sort(np.take_along_axis(row, xs, 1), axis=1)  # lowest id first, as np.unique
        usable = np.take_along_axis(self.kept[ls], h, 1)
        usable[:, 1:] &= h[:, 1:] != h[:, :-1]
        slots = _true_indices(np.take_along_axis(self.cnt[ls], row, 1) >= 2, row.shape[1])  # redundant
        excess = np.where(usable[:, :, None], self.excess_after_replacing(ls, h, slots, rl), np.inf)
        slot, j, least = self._least_excess(ls, h, slots, rl, excess)
        gain = _excess(rl) - least
        expert = h[np.arange(ls.size), j]
        cost = (row[np.arange(ls.size), slot] == self.carry[ls, slot]).astype(np.int64)  # a changing slot: free
        return _Move(np.isfinite(gain) & (gain > 0), gain, cost, slot, expert)

    def apply_replicate(self, ls: np.ndarray, move: _Move, sel: np.ndarray) -> None:
        self._place(ls, move.a[sel], move.b[sel])

    def best_swap(self, ls: np.ndarray, rl: np.ndarray) -> _Move:
        """Per layer, exchanging a slot of the peak rank (``a``) with a slot of another
        rank (``b``), never within the peak rank, never putting a second copy of an
        expert on a rank, never raising the most disk reads a rank makes.

        Every ``[n, spr, P]`` array is built once, in place where it can be: these
        candidate arrays are the cost of the step."""
        n, r = ls.size, np.arange(ls.size)
        row, carry = self.row[ls], self.carry[ls]
        hi, xs = self._peak(ls, rl)
        rx = np.take_along_axis(row, xs, 1)
        gain = self._swap_gain(ls, row, xs, hi, rl)
        bad = self._swap_not_allowed(ls, row, rx, hi)
        changed = row != carry
        cost = np.add(row[:, None, :] != np.take_along_axis(carry, xs, 1)[:, :, None],
                      rx[:, :, None] != carry[:, None, :], dtype=np.int8)
        cost -= np.add(np.take_along_axis(changed, xs, 1)[:, :, None], changed[:, None, :], dtype=np.int8)
        score = np.full(gain.shape, -np.inf)
        np.divide(gain, np.maximum(cost, 1e-9), out=score, where=(gain > 0) & ~bad)
        pick = np.argmax(score.reshape(n, -1), axis=1)
        i, y = pick // row.shape[1], pick % row.shape[1]
        g = np.where(bad[r, i, y], -np.inf, gain[r, i, y])
        return _Move(g > 0, g, cost[r, i, y].astype(np.int64), xs[r, i], y)

    def _swap_gain(self, ls: np.ndarray, row: np.ndarray, xs: np.ndarray, hi: np.ndarray,
                   rl: np.ndarray) -> np.ndarray:
        """``[n, spr, P]``: the excess the peak rank ``hi`` and slot ``y``'s rank lose
        when peak slot ``xs[:, i]`` and ``y`` swap (the peak sheds ``delta``, ``y``'s
        rank takes it)."""
        n = ls.size
        per = self._per_slot(ls, row)
        delta = np.take_along_axis(per, xs, 1)[:, :, None] - per[:, None, :]
        mean = rl.mean(axis=-1)[:, None, None]
        rh = rl[np.arange(n), hi][:, None, None]
        ryl = rl[:, self.slot_rank][:, None, :]
        before = np.maximum(rh - mean, 0.0) + np.maximum(ryl - mean, 0.0)
        after = np.subtract(rh, delta)
        after -= mean
        np.maximum(after, 0.0, out=after)
        y_side = np.add(ryl, delta, out=delta)
        y_side -= mean
        after += np.maximum(y_side, 0.0, out=y_side)
        return np.subtract(before, after, out=after)

    def _swap_not_allowed(self, ls: np.ndarray, row: np.ndarray, rx: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``[n, spr, P]``: swapping peak slot ``i`` (expert ``rx[:, i]``) with slot ``y``
        is not allowed: ``y`` is on the peak rank, the swap would put a second copy of
        an expert on a rank, or would make a rank take more experts without a live
        replica than the most any rank took when they were placed."""
        n, r = ls.size, np.arange(ls.size)
        # [n, spr, ranks] -> per slot: y's rank holds x's expert
        x_on = np.repeat((row.reshape(n, 1, self.ranks, self.spr) == rx[:, :, None, None]).any(axis=-1),
                         self.spr, axis=-1)
        y_side = (row[:, :, None] == rx[:, None, :]).any(axis=-1)  # the peak rank holds y's expert
        y_side |= self.slot_rank[None, :] == hi[:, None]
        kept = self.kept[ls]
        hx = ~np.take_along_axis(kept, rx, 1)  # [n, spr]: x's expert has no live replica
        hy = (~np.take_along_axis(kept, np.maximum(row, 0), 1)).astype(np.int64)  # [n, P]
        taken, cap = self.taken[ls], self.disk_cap[ls][:, None]
        # the disk rule for hx = 0 and hx = 1, per y; then chosen per (i, y)
        disk = [(taken[:, self.slot_rank] + d - hy > cap) | (taken[r, hi][:, None] - d + hy > cap) | y_side
                for d in (0, 1)]
        return x_on | np.where(hx[:, :, None], disk[1][:, None, :], disk[0][:, None, :])

    def apply_swap(self, ls: np.ndarray, move: _Move, sel: np.ndarray) -> None:
        x, y = move.a[sel], move.b[sel]
        kept = self.kept[ls]
        hx = (~kept[np.arange(ls.size), self.row[ls, x]]).astype(np.int64)
        hy = (~kept[np.arange(ls.size), self.row[ls, y]]).astype(np.int64)
        np.add.at(self.taken, (ls, x // self.spr), hy - hx)
        np.add.at(self.taken, (ls, y // self.spr), hx - hy)
        self.row[ls, x], self.row[ls, y] = self.row[ls, y], self.row[ls, x].copy()


_POLICIES: dict[str, type[RebalancePolicy]] = {
    DeepSeekPolicy.name: DeepSeekPolicy,
    MinMigrationPolicy.name: MinMigrationPolicy,
}


def get_policy(name: str, **options: Any) -> RebalancePolicy:
    """The policy registered under ``name``, built with ``options``.

    ``get_policy("deepseek", num_groups=8, num_nodes=4)``
    """
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown rebalance policy {name!r}; choose one of {sorted(_POLICIES)}") from None
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"bad options for policy {name!r}: {e}") from e
