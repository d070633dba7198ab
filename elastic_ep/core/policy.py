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


def _replicas_on_rank(row: np.ndarray, slot_rank: np.ndarray, num_logical: int, ranks: int) -> np.ndarray:
    """``[num_logical, ranks]``: replicas of each expert on each rank."""
    out = np.zeros((num_logical, ranks))
    filled = row >= 0
    np.add.at(out, (row[filled], slot_rank[filled]), 1.0)
    return out


def _loads_after_replacing(
    row: np.ndarray, cnt: np.ndarray, w: np.ndarray, rl: np.ndarray, slot_rank: np.ndarray, cand: np.ndarray, h: int,
    on_rank: np.ndarray,
) -> np.ndarray:
    """Rank loads ``[len(cand), ranks]`` after putting expert ``h`` in each candidate
    slot instead of its current expert ``a`` (which must keep another replica).

    Every replica of ``h`` sheds load (its count grows), every other replica of ``a``
    takes more, and the candidate's rank swaps ``a``'s share for ``h``'s.
    ``on_rank``: :func:`_replicas_on_rank` of ``row``.
    """
    base = rl - on_rank[h] * (w[h] / cnt[h] - w[h] / (cnt[h] + 1)) if cnt[h] else rl
    a = row[cand]
    grow = w[a] / (cnt[a] - 1) - w[a] / cnt[a]
    new = base[None, :] + on_rank[a] * grow[:, None]
    new[np.arange(cand.size), slot_rank[cand]] += w[h] / (cnt[h] + 1) - w[a] / cnt[a] - grow
    return new


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
    """Keep surviving replicas in place; move only what must move, plus moves that pay.

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
                cand = np.flatnonzero(cnt[row] >= 2)
                cand = cand[taken[slot_rank[cand]] == taken[slot_rank[cand]].min()]
                # Of the redundant replicas there, replace the one that leaves the
                # least excess load.
                on_rank = _replicas_on_rank(row, slot_rank, E, ranks)
                slot = cand[np.argmin(_excess(_loads_after_replacing(row, cnt, w, rl, slot_rank, cand, e, on_rank)))]
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

        # 3. Moves that pay for balance, while the budget lasts: re-home a replica of
        #    an expert of the peak rank, or swap a slot of the peak rank with another,
        #    whichever lowers the layer's excess load (sum over ranks of load above the
        #    mean) most per transfer it adds, if by at least min_gain x mean. Excess
        #    rather than peak, so that lowering one of several equal peaks counts.
        #    Only experts that kept a replica on a surviving rank get new copies, and
        #    a swap never raises the most disk reads a rank makes: no move adds to or
        #    concentrates the disk reads.
        ctx = _MoveContext(carry_row, row, cnt, w, spr, taken, int(taken.max(initial=0)))
        spent = 0
        for _ in range(4 * self.max_moves_per_layer + spr):  # each accepted move lowers excess
            rl = rank_load()
            moves = [m for m in (ctx.best_replicate(rl), ctx.best_swap(rl)) if m is not None]
            if not moves:
                break
            gain, cost, apply = max(moves, key=lambda m: m[0] / max(m[1], 1e-9))
            if cost > 0 and (gain / cost < self.min_gain * rl.mean() or spent + cost > self.max_moves_per_layer):
                break
            apply()
            spent += max(cost, 0)
        return row


@dataclass
class _MoveContext:
    """One layer's state while min_migration looks for moves that pay.

    ``carry``/``row``: ``[P]`` experts before any transfer / now; ``cnt``: ``[E]``
    replicas now; ``w``: ``[E]`` load; ``taken``: ``[ranks]`` experts without a live
    replica placed on each rank; ``disk_cap``: the most any rank may take.
    """

    carry: np.ndarray
    row: np.ndarray
    cnt: np.ndarray
    w: np.ndarray
    spr: int
    taken: np.ndarray
    disk_cap: int

    def __post_init__(self) -> None:
        self.slot_rank = np.arange(self.row.size) // self.spr
        self.kept = np.isin(np.arange(self.w.size), self.carry)

    def best_replicate(self, rl: np.ndarray):
        """(gain, cost, apply) for giving an expert of the peak rank another copy in the
        place of a redundant replica of another expert; None if none helps."""
        row, cnt, slot_rank = self.row, self.cnt, self.slot_rank
        hi = int(np.argmax(rl))
        now = float(_excess(rl))
        best: tuple[float, int, int] | None = None
        on_rank = _replicas_on_rank(row, slot_rank, self.w.size, rl.size)
        redundant = cnt[row] >= 2
        for h in np.unique(row[hi * self.spr : (hi + 1) * self.spr]):
            if not self.kept[h]:
                continue
            cand = np.flatnonzero(redundant & (on_rank[h][slot_rank] == 0))
            if cand.size == 0:
                continue
            excess = _excess(_loads_after_replacing(row, cnt, self.w, rl, slot_rank, cand, int(h), on_rank))
            c = int(np.argmin(excess))
            if best is None or excess[c] < best[0]:
                best = (float(excess[c]), int(cand[c]), int(h))
        if best is None or not now - best[0] > 0:
            return None
        _, slot, h = best
        cost = int(row[slot] == self.carry[slot])  # replacing a slot already changing is free

        def apply() -> None:
            cnt[row[slot]] -= 1
            row[slot] = h
            cnt[h] += 1

        return now - best[0], cost, apply

    def best_swap(self, rl: np.ndarray):
        """(gain, cost, apply) for exchanging a slot of the peak rank with a slot of
        another rank; None if none lowers the excess."""
        row, slot_rank, carry = self.row, self.slot_rank, self.carry
        hi = int(np.argmax(rl))
        xs = np.arange(hi * self.spr, (hi + 1) * self.spr)
        per = self.w[row] / self.cnt[row]
        delta = per[xs][:, None] - per[None, :]  # [spr, P]: load hi sheds, slot y's rank takes
        mean = rl.mean()
        ry = slot_rank
        before = max(rl[hi] - mean, 0.0) + np.clip(rl[ry] - mean, 0.0, None)[None, :]
        after = np.clip(rl[hi] - delta - mean, 0.0, None) + np.clip(rl[ry][None, :] + delta - mean, 0.0, None)
        # Never swap within the peak rank or put a second copy of an expert on a rank.
        holds = _replicas_on_rank(row, slot_rank, self.w.size, rl.size) > 0
        bad = (ry == hi)[None, :] | holds[row[xs]][:, ry] | holds[row][:, hi][None, :]
        # Experts without a live replica moving between ranks: keep within disk_cap.
        hx = (~self.kept[row[xs]]).astype(np.int64)[:, None]
        hy = (~self.kept[row]).astype(np.int64)[None, :]
        bad |= (self.taken[ry][None, :] + hx - hy > self.disk_cap) | (self.taken[hi] - hx + hy > self.disk_cap)
        changed = row != carry
        cost = (
            (row[None, :] != carry[xs][:, None]).astype(np.int64)
            + (row[xs][:, None] != carry[None, :])
            - changed[xs][:, None]
            - changed[None, :]
        )
        gain = np.where(bad, -np.inf, before - after)
        score = gain / np.maximum(cost, 1e-9)
        i, j = np.unravel_index(np.argmax(np.where(gain > 0, score, -np.inf)), gain.shape)
        if not gain[i, j] > 0:
            return None
        x, y = int(xs[i]), int(j)
        taken = self.taken

        def apply() -> None:
            taken[hi] += int(hy[0, y] - hx[i, 0])
            taken[slot_rank[y]] += int(hx[i, 0] - hy[0, y])
            row[x], row[y] = row[y], row[x]

        return float(gain[i, j]), int(cost[i, j]), apply


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
