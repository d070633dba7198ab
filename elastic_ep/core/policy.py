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
    return np.clip(rank_load - rank_load.mean(axis=-1, keepdims=True), 0.0, None).sum(axis=-1)


def _near_min(score: np.ndarray, tol: np.ndarray, most: int) -> np.ndarray:
    """``[X, k]``: the indices of each row of ``score`` ``[X, n]`` within ``tol`` ``[X]``
    of the row's minimum, in order, at most ``most`` of them, ``-1`` padded."""
    near = score <= (score.min(axis=-1) + tol)[:, None]
    k = int(min(near.sum(axis=-1).max(initial=1), most))
    idx = np.argsort(~near, axis=-1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(near, idx, -1), idx, -1)


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
    """
    L, P = after.shape
    out = after.copy()
    for layer in range(L):
        for start in range(0, P, slots_per_rank):
            old_row = before[layer, start : start + slots_per_rank].tolist()
            pool = after[layer, start : start + slots_per_rank].tolist()
            row: list[int | None] = [None] * slots_per_rank
            for i, e in enumerate(old_row):
                if e >= 0 and e in pool:
                    pool.remove(e)
                    row[i] = e
            rest = iter(pool)
            out[layer, start : start + slots_per_rank] = [e if e is not None else next(rest) for e in row]
    return out


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
        excess = self.excess_after_replacing(ls, e[:, None], rl)
        excess = np.where((redundant & (tk == fewest))[:, None, :], excess, np.inf)
        return self._least_excess(ls, e[:, None], rl, excess)[0]

    def _least_excess(self, ls: np.ndarray, h: np.ndarray, rl: np.ndarray,
                      excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (slot, expert) pair of least ``excess`` ``[n, H, P]`` (from
        :meth:`excess_after_replacing`, ``inf`` where not allowed): ``(slot, j, excess)``
        ``[n]`` each, ``j`` indexing ``h`` ``[n, H]``.

        Pairs within rounding of the least are compared again by the rank loads
        summed in full (:meth:`_excess_in_full`), so that equal inputs give equal
        choices whichever formula found the candidates."""
        n, H, P = excess.shape
        flat = excess.reshape(n, -1)
        near = _near_min(flat, 1e-9 * (1.0 + rl.sum(axis=-1)), 64)
        slot, j = np.maximum(near, 0) % P, np.maximum(near, 0) // P
        full = np.where(near >= 0, self._excess_in_full(ls, np.take_along_axis(h, j, 1), slot, rl), np.inf)
        full = np.where(np.isfinite(np.take_along_axis(flat, np.maximum(near, 0), 1)), full, np.inf)
        best = np.argmin(full, axis=1)
        r = np.arange(n)
        return slot[r, best], j[r, best], full[r, best]

    def _excess_in_full(self, ls: np.ndarray, h: np.ndarray, slot: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n, K]``: the excess load after putting expert ``h`` in ``slot`` (both
        ``[n, K]``), with every rank's load written out: ``O(K x ranks)``."""
        n, K = h.shape
        row, cnt, w = self.row[ls], self.cnt[ls], self.w[ls]
        E, R = w.shape[1], self.ranks
        a = np.maximum(np.take_along_axis(row, slot, 1), 0)
        wh, ch = np.take_along_axis(w, h, 1), np.take_along_axis(cnt, h, 1)
        wa, ca = np.take_along_axis(w, a, 1), np.take_along_axis(cnt, a, 1)
        # [n * E, R] replicas of each expert on each rank, then the rows of h and a.
        idx = (np.arange(n)[:, None] * E + np.maximum(row, 0)) * R + self.slot_rank
        table = np.bincount(idx[row >= 0], minlength=n * E * R).reshape(n * E, R)
        lay = np.arange(n)[:, None] * E
        on_h, on_a = table[lay + h], table[lay + a]
        with np.errstate(divide="ignore", invalid="ignore"):
            shed = wh / ch - wh / (ch + 1)
            base = np.where((ch > 0)[..., None], rl[:, None, :] - on_h * shed[..., None], rl[:, None, :])
            grow = wa / (ca - 1) - wa / ca
            new = base + on_a * grow[..., None]
            np.put_along_axis(new, (slot // self.spr)[..., None],
                              np.take_along_axis(new, (slot // self.spr)[..., None], -1)
                              + (wh / (ch + 1) - wa / ca - grow)[..., None], -1)
        return _excess(new)

    def excess_after_replacing(self, ls: np.ndarray, h: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n, H, P]``: the excess load of layer ``ls[i]`` after putting expert
        ``h[i, j]`` in slot ``c`` instead of its expert ``a`` (meaningful where ``a``
        keeps another replica and ``c``'s rank holds no ``h``).

        Every replica of ``h`` sheds load (its count grows), every other replica of
        ``a`` takes more, and ``c``'s rank swaps ``a``'s share for ``h``'s. Only ranks
        holding ``a`` change besides ``c``'s, so the sum over ranks is the unchanged
        sum plus one term per (``a``, rank) pair: ``O(H x P)``, not ``O(H x P x ranks)``.
        """
        n, H = h.shape
        row, cnt, w = self.row[ls], self.cnt[ls], self.w[ls]
        R, E = self.ranks, w.shape[1]
        a = np.maximum(row, 0)
        wh, ch = np.take_along_axis(w, h, 1), np.take_along_axis(cnt, h, 1)  # [n, H]
        mean = (rl.sum(axis=-1)[:, None] + np.where(ch == 0, wh, 0.0)) / R
        on_h = (row[:, None, :] == h[:, :, None]).reshape(n, H, R, self.spr).sum(axis=-1)
        shed = np.where(ch > 0, wh / np.maximum(ch, 1) - wh / (ch + 1), 0.0)
        base = rl[:, None, :] - on_h * shed[..., None]  # [n, H, R]

        def pos(x: np.ndarray) -> np.ndarray:
            return np.maximum(x - mean[..., None], 0.0)

        wa, ca = np.take_along_axis(w, a, 1), np.take_along_axis(cnt, a, 1)  # [n, P]
        grow = np.where(ca >= 2, wa / np.maximum(ca - 1, 1) - wa / np.maximum(ca, 1), 0.0)
        same, first = self._same_on_rank(row)
        b_c = base[:, :, self.slot_rank]  # [n, H, P]
        shared = b_c + (same * grow)[:, None, :]
        pos_shared = pos(shared)
        term = np.where(first[:, None, :], pos_shared - pos(b_c), 0.0)
        idx = (np.arange(n * H).reshape(n, H, 1) * E + a[:, None, :]).ravel()
        per_a = np.bincount(idx, weights=term.ravel(), minlength=n * H * E).reshape(n, H, E)
        total = pos(base).sum(axis=-1)[..., None] + np.take_along_axis(per_a, np.broadcast_to(a[:, None, :], term.shape), 2)
        d = (wh / (ch + 1))[..., None] - (wa / np.maximum(ca, 1) + grow)[:, None, :]
        return total - pos_shared + pos(shared + d)

    def _same_on_rank(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, P]`` replicas of each slot's expert on its rank, and whether the slot is
        the first of them there."""
        n, P = row.shape
        r3 = row.reshape(n, self.ranks, self.spr)
        eq = r3[..., :, None] == r3[..., None, :]
        earlier = np.tril(np.ones((self.spr, self.spr), dtype=bool), -1)
        return eq.sum(axis=-1).reshape(n, P), ~(eq & earlier).any(axis=-1).reshape(n, P)

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
        on_h = (row[:, None, :] == h[:, :, None]).reshape(ls.size, self.spr, self.ranks, self.spr).any(axis=-1)
        redundant = np.take_along_axis(self.cnt[ls], row, 1) >= 2
        cand = usable[:, :, None] & redundant[:, None, :] & ~on_h[:, :, self.slot_rank]
        excess = np.where(cand, self.excess_after_replacing(ls, h, rl), np.inf)
        slot, j, least = self._least_excess(ls, h, rl, excess)
        gain = _excess(rl) - least
        expert = h[np.arange(ls.size), j]
        cost = (row[np.arange(ls.size), slot] == self.carry[ls, slot]).astype(np.int64)  # a changing slot: free
        return _Move(np.isfinite(gain) & (gain > 0), gain, cost, slot, expert)

    def apply_replicate(self, ls: np.ndarray, move: _Move, sel: np.ndarray) -> None:
        self._place(ls, move.a[sel], move.b[sel])

    def best_swap(self, ls: np.ndarray, rl: np.ndarray) -> _Move:
        """Per layer, exchanging a slot of the peak rank (``a``) with a slot of another
        rank (``b``), never within the peak rank, never putting a second copy of an
        expert on a rank, never raising the most disk reads a rank makes."""
        n = ls.size
        row, carry, ry = self.row[ls], self.carry[ls], self.slot_rank
        hi, xs = self._peak(ls, rl)
        per = self._per_slot(ls, row)
        rx = np.take_along_axis(row, xs, 1)
        delta = np.take_along_axis(per, xs, 1)[:, :, None] - per[:, None, :]  # [n, spr, P]: hi sheds, y's rank takes
        mean = rl.mean(axis=-1)[:, None, None]
        rh = rl[np.arange(n), hi][:, None, None]
        ryl = rl[:, ry][:, None, :]
        before = np.maximum(rh - mean, 0.0) + np.maximum(ryl - mean, 0.0)
        after = np.maximum(rh - delta - mean, 0.0) + np.maximum(ryl + delta - mean, 0.0)
        bad = (ry[None, :] == hi[:, None])[:, None, :] | self._swap_duplicates(row, rx)
        bad |= self._swap_concentrates_disk(ls, row, rx, hi)
        changed = row != carry
        cx = np.take_along_axis(carry, xs, 1)
        cost = ((row[:, None, :] != cx[:, :, None]).astype(np.int64) + (rx[:, :, None] != carry[:, None, :])
                - np.take_along_axis(changed, xs, 1)[:, :, None] - changed[:, None, :])
        gain = np.where(bad, -np.inf, before - after)
        with np.errstate(invalid="ignore"):
            score = np.where(gain > 0, gain / np.maximum(cost, 1e-9), -np.inf).reshape(n, -1)
        pick = np.argmax(score, axis=1)
        i, y = pick // row.shape[1], pick % row.shape[1]
        g = gain.reshape(n, -1)[np.arange(n), pick]
        return _Move(g > 0, g, cost.reshape(n, -1)[np.arange(n), pick], xs[np.arange(n), i], y)

    def _swap_duplicates(self, row: np.ndarray, rx: np.ndarray) -> np.ndarray:
        """``[n, spr, P]``: swapping peak slot ``i`` with slot ``y`` would put a second
        copy of an expert on a rank."""
        n = row.shape[0]
        r3 = row.reshape(n, 1, self.ranks, self.spr)
        x_on = (r3 == rx[:, :, None, None]).any(axis=-1)[:, :, self.slot_rank]  # y's rank holds x's expert
        y_on = (row[:, :, None] == rx[:, None, :]).any(axis=-1)  # the peak rank holds y's expert
        return x_on | y_on[:, None, :]

    def _swap_concentrates_disk(self, ls: np.ndarray, row: np.ndarray, rx: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``[n, spr, P]``: the swap moves experts without a live replica so that a rank
        would take more of them than the most any rank took when they were placed."""
        n = ls.size
        kept = self.kept[ls]
        hx = (~np.take_along_axis(kept, rx, 1)).astype(np.int64)[:, :, None]
        hy = (~np.take_along_axis(kept, np.maximum(row, 0), 1)).astype(np.int64)[:, None, :]
        taken = self.taken[ls]
        cap = self.disk_cap[ls][:, None, None]
        return ((taken[:, self.slot_rank][:, None, :] + hx - hy > cap)
                | (taken[np.arange(n), hi][:, None, None] - hx + hy > cap))

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
