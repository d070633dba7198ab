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

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .eplb import rebalance_experts
from .errors import ConfigError
from .placement import ExpertPlacement
from .rank_mapping import RankMapping


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


def _excess(rank_load: np.ndarray) -> float:
    return float(np.clip(rank_load - rank_load.mean(), 0.0, None).sum())


class RebalancePolicy(ABC):
    """Computes the placement after a membership change (or a load-driven rebalance,
    with an identity mapping). Implementations are pure: no I/O, no global state."""

    name: ClassVar[str]

    def rebalance(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray) -> ExpertPlacement:
        """``load``: ``[num_layers, num_logical]``. Returns a valid placement on
        ``mapping.new_ep_size`` ranks with ``old.slots_per_rank`` slots each, in which
        an expert that stays on a rank keeps its slot there."""
        load = _check_inputs(old, mapping, load)
        carry = mapping.carry_over(old)
        phy2log = keep_local_slots(carry, self.place(old, mapping, load, carry), old.slots_per_rank)
        new = ExpertPlacement(phy2log, old.slots_per_rank, old.num_logical)
        new.validate()
        return new

    @abstractmethod
    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray) -> np.ndarray:
        """The new ``phy2log`` ``[num_layers, new_ep_size * slots_per_rank]``; slot order
        inside a rank is free (``rebalance`` restores kept slots). ``carry`` is
        ``mapping.carry_over(old)``; ``load`` is checked."""


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

    ``num_nodes`` applies only while the new rank count is a multiple of it and
    ``num_groups`` is too (the hierarchical policy's preconditions); otherwise the
    global policy runs, as the reference does when groups do not divide over nodes.
    """

    num_groups: int = 1
    num_nodes: int = 1
    name: ClassVar[str] = "deepseek"

    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray) -> np.ndarray:
        ep = mapping.new_ep_size
        nodes = self.num_nodes if ep % self.num_nodes == 0 and self.num_groups % self.num_nodes == 0 else 1
        phy2log, _, _ = rebalance_experts(load, ep * old.slots_per_rank, self.num_groups, nodes, ep)
        return phy2log.numpy()


@dataclass(frozen=True)
class MinMigrationPolicy(RebalancePolicy):
    """Keep surviving replicas in place; move only what must move, plus swaps that pay.

    Attributes:
        min_gain: a move is made only if it lowers the layer's excess load (the sum
            over ranks of load above the mean) by at least this fraction of the mean
            rank load per transfer it costs.
        max_moves_per_layer: transfers per layer that balance may add beyond the
            ones the membership change forces.
    """

    min_gain: float = 0.02
    max_moves_per_layer: int = 4
    name: ClassVar[str] = "min_migration"

    def place(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray, carry: np.ndarray) -> np.ndarray:
        return np.stack([self._layer(carry[layer], load[layer], old.slots_per_rank) for layer in range(old.num_layers)])

    def _layer(self, carry_row: np.ndarray, w: np.ndarray, spr: int) -> np.ndarray:
        row = carry_row.copy()
        E, P = w.size, row.size
        ranks = P // spr
        slot_rank = np.arange(P) // spr
        cnt = np.bincount(row[row >= 0], minlength=E)

        def rank_load() -> np.ndarray:
            filled = row >= 0
            per = w[row[filled]] / cnt[row[filled]]
            return np.bincount(slot_rank[filled], weights=per, minlength=ranks)

        # 1. Every expert without a replica gets a slot, heaviest first: an empty slot
        #    (a joining rank's, which must be filled anyway) if there is one, else the
        #    slot of a redundant replica on a rank that took the fewest such experts so
        #    far, so that their (disk or peer) reads spread over the ranks.
        homeless = np.flatnonzero(cnt == 0)
        homeless = homeless[np.argsort(-w[homeless], kind="stable")]
        taken = np.zeros(ranks, dtype=np.int64)
        for e in homeless:
            rl = rank_load()
            free = np.flatnonzero(row < 0)
            if free.size:
                slot = free[np.argmin(rl[slot_rank[free]])]
            else:
                evictable = np.flatnonzero(cnt[row] >= 2)
                evictable = evictable[taken[slot_rank[evictable]] == taken[slot_rank[evictable]].min()]
                # Drop a replica of the expert that loses least per replica by it, on
                # the least loaded of those ranks holding one.
                after = w[row[evictable]] / (cnt[row[evictable]] - 1)
                cand = evictable[after == after.min()]
                cand = cand[row[cand] == row[cand[0]]]
                slot = cand[np.argmin(rl[slot_rank[cand]])]
                cnt[row[slot]] -= 1
            row[slot] = e
            cnt[e] += 1
            taken[slot_rank[slot]] += 1

        # 2. Empty slots (joining ranks) take replicas of the experts with the greatest
        #    load per replica, on the least loaded rank not already holding that expert.
        while (row < 0).any():
            e = int(np.argmax(w / np.maximum(cnt, 1)))
            free = np.flatnonzero(row < 0)
            holders = np.zeros(ranks, dtype=bool)
            holders[slot_rank[row == e]] = True
            pref = free[~holders[slot_rank[free]]]
            if pref.size:
                free = pref
            rl = rank_load()
            slot = free[np.argmin(rl[slot_rank[free]])]
            row[slot] = e
            cnt[e] += 1

        # 3. Moves that pay for balance, while the budget lasts: re-home a replica
        #    (one transfer) or swap two slots (two transfers), whichever lowers the
        #    layer's excess load (sum over ranks of load above the mean) most per
        #    transfer, if by at least min_gain x mean. Excess rather than peak, so that
        #    lowering one of several equal peaks counts as progress.
        #    Slots filled above stay put, and only experts that kept a replica on a
        #    surviving rank get new copies: a move never adds a disk read.
        pinned = row != carry_row
        kept = np.isin(np.arange(E), carry_row)
        moves = 0
        while moves < self.max_moves_per_layer:
            rl = rank_load()
            best = max(
                (
                    m
                    for m in (
                        self._best_replicate(row, cnt, w, rl, spr, pinned, kept),
                        self._best_swap(row, cnt, w, rl, spr, pinned),
                    )
                    if m
                ),
                key=lambda m: m[0] / m[1],
                default=None,
            )
            if best is None or best[0] / best[1] < self.min_gain * rl.mean() or moves + best[1] > self.max_moves_per_layer:
                break
            _, cost, apply = best
            apply()
            moves += cost
        return row

    @staticmethod
    def _best_replicate(
        row: np.ndarray, cnt: np.ndarray, w: np.ndarray, rl: np.ndarray, spr: int, pinned: np.ndarray, kept: np.ndarray
    ):
        """Best (gain, 1, apply) for giving the heaviest replica of the peak rank another
        copy, in the place of a redundant replica of another expert; None if none."""
        R = rl.size
        slot_rank = np.arange(row.size) // spr
        hi = int(np.argmax(rl))
        on_hi = row[hi * spr : (hi + 1) * spr]
        on_hi = on_hi[kept[on_hi]]
        if on_hi.size == 0:
            return None
        h = int(on_hi[np.argmax(w[on_hi] / cnt[on_hi])])
        n_h = np.bincount(slot_rank[row == h], minlength=R)
        base = rl - n_h * (w[h] / cnt[h] - w[h] / (cnt[h] + 1))
        cand = np.flatnonzero((cnt[row] >= 2) & (row != h) & (n_h[slot_rank] == 0) & ~pinned)
        if cand.size == 0:
            return None
        a = row[cand]
        ga = w[a] / (cnt[a] - 1) - w[a] / cnt[a]
        # n_a[c, r]: replicas of candidate c's expert on rank r
        n_a = (row[None, :] == a[:, None]).astype(np.float64) @ (slot_rank[:, None] == np.arange(R)).astype(np.float64)
        new = base[None, :] + n_a * ga[:, None]
        new[np.arange(cand.size), slot_rank[cand]] += w[h] / (cnt[h] + 1) - w[a] / cnt[a] - ga
        excess = np.clip(new - rl.mean(), 0.0, None).sum(axis=1)
        c = int(np.argmin(excess))
        gain = _excess(rl) - excess[c]
        if not gain > 0:
            return None
        slot = int(cand[c])

        def apply() -> None:
            cnt[row[slot]] -= 1
            row[slot] = h
            cnt[h] += 1
            pinned[slot] = True

        return gain, 1, apply

    @staticmethod
    def _best_swap(row: np.ndarray, cnt: np.ndarray, w: np.ndarray, rl: np.ndarray, spr: int, pinned: np.ndarray):
        """Best (gain, 2, apply) for exchanging a slot of the peak rank with a slot of
        the least loaded rank; None if none lowers the excess."""
        hi, lo = int(np.argmax(rl)), int(np.argmin(rl))
        if hi == lo:
            return None
        xs = np.arange(hi * spr, (hi + 1) * spr)
        ys = np.arange(lo * spr, (lo + 1) * spr)
        delta = (w[row[xs]] / cnt[row[xs]])[:, None] - (w[row[ys]] / cnt[row[ys]])[None, :]
        mean = rl.mean()
        before = max(rl[hi] - mean, 0.0) + max(rl[lo] - mean, 0.0)
        after = np.clip(rl[hi] - delta - mean, 0.0, None) + np.clip(rl[lo] + delta - mean, 0.0, None)
        # Never put a second copy of an expert on one rank.
        dup = np.isin(row[xs], row[ys])[:, None] | np.isin(row[ys], row[xs])[None, :]
        after[dup | pinned[xs][:, None] | pinned[ys][None, :]] = np.inf
        i, j = np.unravel_index(np.argmin(after), after.shape)
        gain = before - after[i, j]
        if not gain > 0:
            return None
        x, y = int(xs[i]), int(ys[j])

        def apply() -> None:
            row[x], row[y] = row[y], row[x]
            pinned[[x, y]] = True

        return gain, 2, apply


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
