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
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.core.fault_domains import SLOT_COST, node_ids, spread_over_nodes
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


def _excess(rank_load: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Load above the mean, summed over ranks (the last axis); ``overwrite``: work in
    ``rank_load`` itself instead of a copy (the caller's scratch array)."""
    mean = rank_load.mean(axis=-1, keepdims=True)
    above = np.subtract(rank_load, mean, out=rank_load if overwrite else None)
    return np.maximum(above, 0.0, out=above).sum(axis=-1)


def _true_indices(mask: np.ndarray, most: int) -> np.ndarray:
    """``[X, k]``: the column indices of the ``True`` entries of each row of ``mask``
    ``[X, n]``, in order, at most ``most`` of them, ``-1`` padded (``k >= 1``)."""
    counts = mask.sum(axis=-1)
    k = int(min(max(counts.max(initial=1), 1), most))
    r, c = np.divmod(np.flatnonzero(mask), mask.shape[1])  # row-major: each row's columns in order
    nth = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    if k < counts.max(initial=0):  # some rows have more: keep their first k
        keep = nth < k
        r, c, nth = r[keep], c[keep], nth[keep]
    out = np.full((mask.shape[0], k), -1, dtype=np.int64)
    out[r, nth] = c
    return out


def _pick(x: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``[n, ...]``: ``x[rows[i], idx[i, ...]]`` for ``x`` ``[N, M]``, ``idx`` ``[n, ...]``
    (non-negative) and ``rows`` ``[n]`` (default ``arange(n)``). One flat ``np.take``:
    several times faster than ``take_along_axis``, and no copy of ``x[rows]``."""
    rows = np.arange(idx.shape[0]) if rows is None else rows
    return np.take(x, (rows * x.shape[1]).reshape((-1,) + (1,) * (idx.ndim - 1)) + idx)


def _rows(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``[n, K, H]``: ``x[i, idx[i]]`` for ``x`` ``[n, M, H]`` and ``idx`` ``[n, K]``
    (``np.take`` of whole rows: far faster than ``take_along_axis`` over three axes),
    into ``out`` if given (``idx`` in range: ``mode="clip"`` writes it unbuffered)."""
    n, M, H = x.shape
    return np.take(x.reshape(n * M, H), np.arange(n)[:, None] * M + idx, axis=0, out=out,
                   mode="raise" if out is None else "clip")


class RebalancePolicy(ABC):
    """Computes the placement after a membership change (or a load-driven rebalance,
    with an identity mapping). Implementations are pure: no I/O, no global state."""

    name: ClassVar[str]

    @property
    def spread_slot_cost(self) -> float:
        """What one more changed slot weighs against balance when the placement is
        spread over nodes (a fraction of the mean rank load; see
        :func:`~elastic_ep.core.fault_domains.spread_over_nodes`)."""
        return SLOT_COST

    def rebalance(self, old: ExpertPlacement, mapping: RankMapping, load: np.ndarray,
                  nodes: int | None = None, node_of: Sequence[str] | None = None) -> ExpertPlacement:
        """``load``: ``[num_layers, num_logical]``; ``nodes``: the number of distinct
        nodes the new ranks run on, when known (a policy that places by node uses it
        instead of its configured count: after a scale-down fewer nodes may be left).
        ``node_of``: each new rank's node label (``mapping.new_ep_size`` of them, ``""``
        unknown), e.g. ``["n0", "n0", "n1", "n1"]``: the placement is then spread over
        nodes (:func:`~elastic_ep.core.fault_domains.spread_over_nodes`), so that an
        expert with two or more replicas keeps one if a node is lost; with no label or
        a single one the placement is the same as without ``node_of``.
        Returns a valid placement on ``mapping.new_ep_size`` ranks with
        ``old.slots_per_rank`` slots each, in which an expert that stays on a rank keeps
        its slot there."""
        load = _check_inputs(old, mapping, load)
        if nodes is not None and not 1 <= nodes <= mapping.new_ep_size:
            raise ConfigError(f"nodes={nodes} must be between 1 and the new rank count {mapping.new_ep_size}")
        if node_of is not None:
            node_ids(node_of, mapping.new_ep_size)  # checked before any work
        carry, spr = mapping.carry_over(old), old.slots_per_rank
        phy2log = keep_local_slots(carry, self.place(old, mapping, load, carry, nodes), spr)
        if node_of is not None:
            spread = spread_over_nodes(carry, phy2log, load, node_of, spr, self.spread_slot_cost)
            phy2log = phy2log if spread is phy2log else keep_local_slots(carry, spread, spr)
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
    each kept expert taken out) fills the other slots in order. All ranks at once;
    only the ranks whose slots changed are visited (the others are ``before`` as is).
    """
    L, P = after.shape
    out = np.array(after, dtype=np.result_type(before, after)).reshape(-1, slots_per_rank)
    changed = np.flatnonzero((out != before.reshape(-1, slots_per_rank)).any(axis=1))
    out[changed] = _keep_local_slots(before.reshape(-1, slots_per_rank)[changed], out[changed])
    return out.reshape(L, P)


def _keep_local_slots(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """:func:`keep_local_slots` of ranks ``b``, ``a`` ``[M, slots_per_rank]``."""
    slots_per_rank = b.shape[1]
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

    @property
    def spread_slot_cost(self) -> float:
        return 0.0  # it moves what balance asks for: spreading serves balance alone too

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
    has a leading layer axis), so one Python loop runs over the step, not the layer;
    the scoring of candidate moves takes the layers in batches whose arrays stay in
    cache (``_CHUNK``). An expert's replicas per rank are kept in a table updated by
    every change, and the step's large arrays are built in reused memory: at 256
    ranks x 9 slots it is those arrays' size, not Python, that sets the time.

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

    @property
    def spread_slot_cost(self) -> float:
        return self.min_gain  # what a transfer must bring back in its own moves

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
            per = s.slot_loads(ls)  # rows are full from here on
            rl = s.rank_loads(ls, per)
            rep, swap = s.best_moves(ls, rl, per)
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


_NEAR = 64
"""Candidates within rounding of the least approximate excess that are scored again
in full (:meth:`_Layers._least_excess`)."""

_CHUNK = 1 << 18
"""Candidate moves scored per batch of layers (``n x spr x P`` at most, one layer at
least): a batch's candidate arrays (~2 MiB of float64 each) stay in cache, where all
58 layers of a 256-rank deployment at once (~9 MiB each) do not."""


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

    @classmethod
    def concat(cls, moves: list[_Move]) -> _Move:
        """The moves of consecutive batches of layers, as one."""
        if len(moves) == 1:
            return moves[0]
        return cls(*(np.concatenate([getattr(m, f.name) for m in moves]) for f in fields(cls)))


@dataclass
class _Layers:
    """min_migration's state, all layers at once.

    ``carry``/``row``: ``[L, P]`` experts before any transfer / now (``-1`` empty);
    ``cnt``: ``[L, E]`` replicas now; ``held``: ``[L, E, ranks]`` replicas now of each
    expert on each rank (kept up to date by every change, so that no step compares
    slots to find an expert's ranks); ``w``: ``[L, E]`` load; ``taken``: ``[L, ranks]``
    experts without a live replica placed on each rank; ``kept``: ``[L, E]`` experts
    with a replica on a surviving rank.
    """

    w: np.ndarray
    spr: int
    carry: np.ndarray
    kept: np.ndarray
    row: np.ndarray
    cnt: np.ndarray
    held: np.ndarray
    taken: np.ndarray
    disk_cap: np.ndarray | None = None
    """``[L]``: the most missing experts any rank took in step 1; no move exceeds it."""
    scratch: dict[str, np.ndarray] = field(default_factory=dict)
    """Working memory of the largest arrays of a step, by name (:meth:`buffer`)."""

    @classmethod
    def start(cls, carry: np.ndarray, w: np.ndarray, spr: int) -> "_Layers":
        L, P = carry.shape
        E, R = w.shape[1], P // spr
        lay, slot = np.nonzero(carry >= 0)
        e = carry[lay, slot]
        cnt = np.bincount(lay * E + e, minlength=L * E).reshape(L, E)
        held = np.zeros((L, E, R), dtype=np.min_scalar_type(-spr))  # counts <= spr: small gathers
        where, times = np.unique((lay * E + e) * R + slot // spr, return_counts=True)
        held.reshape(-1)[where] = times
        taken = np.zeros((L, R), dtype=np.int64)
        return cls(w=w, spr=spr, carry=carry, kept=cnt > 0, row=carry.copy(), cnt=cnt, held=held, taken=taken)

    @property
    def ranks(self) -> int:
        return self.row.shape[1] // self.spr

    @property
    def slot_rank(self) -> np.ndarray:
        return np.arange(self.row.shape[1]) // self.spr

    def by_slot(self, x: np.ndarray) -> np.ndarray:
        """``[n, P]``: ``x`` ``[n, ranks]`` of each slot's rank."""
        return np.repeat(x, self.spr, axis=1)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        """An uninitialised ``shape`` array in the memory kept for ``name``: the large
        arrays of every step reuse the same pages (fresh ones are page faults, and
        freeing them lets the allocator hand the pages back)."""
        size = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.scratch[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)

    def held_rows(self, ls: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``[n, K, ranks]``: the replicas of expert ``x`` ``[n, K]`` of layers ``ls`` on
        each rank (whole rows of ``held``, gathered in one ``np.take``)."""
        return np.take(self.held.reshape(-1, self.ranks), ls[:, None] * self.w.shape[1] + x, axis=0)

    def held_at(self, ls: np.ndarray, x: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """``[n, K]``: the replicas of expert ``x`` ``[n, K]`` of layers ``ls`` on ``rank``
        (broadcast to ``x``)."""
        return np.take(self.held, (ls[:, None] * self.w.shape[1] + x) * self.ranks + rank)

    def slot_loads(self, ls: np.ndarray) -> np.ndarray:
        """``[len(ls), P]`` each slot's share of its expert's load (empty slots: any)."""
        e = np.maximum(self.row[ls], 0)
        return _pick(self.w, e, ls) / np.maximum(_pick(self.cnt, e, ls), 1)

    def rank_loads(self, ls: np.ndarray, per: np.ndarray | None = None) -> np.ndarray:
        """``[len(ls), ranks]`` load per rank of layers ``ls``, an expert's load split
        over its replicas (summed in slot order). ``per``: :meth:`slot_loads` of rows
        without an empty slot, when the caller has it."""
        if per is None:
            per = np.where(self.row[ls] >= 0, self.slot_loads(ls), 0.0)
        idx = np.arange(ls.size)[:, None] * self.ranks + self.slot_rank
        return np.bincount(idx.ravel(), weights=per.ravel(), minlength=ls.size * self.ranks).reshape(ls.size, -1)

    def _place(self, ls: np.ndarray, slot: np.ndarray, e: np.ndarray) -> None:
        """Put expert ``e`` ``[n]`` in ``slot`` ``[n]`` of layers ``ls`` (one slot per
        layer), freeing the replica that was there."""
        was = self.row[ls, slot]
        had = was >= 0
        self.cnt[ls[had], was[had]] -= 1
        self.held[ls[had], was[had], slot[had] // self.spr] -= 1
        self.row[ls, slot] = e
        self.cnt[ls, e] += 1
        self.held[ls, e, slot // self.spr] += 1

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
            slot = np.argmin(np.where(free, self.by_slot(rl), np.inf), axis=1)
            full = ~free.any(axis=1)
            if full.any():
                slot[full] = self._slot_to_replace(ls[full], e[full], rl[full])
            self._place(ls, slot, e)
            self.taken[ls, slot // self.spr] += 1

    def _slot_to_replace(self, ls: np.ndarray, e: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n]``: for layers ``ls`` without an empty slot, the redundant replica to give
        to missing expert ``e`` ``[n]``: on a rank that took the fewest missing experts,
        the one that leaves the least excess load."""
        redundant = _pick(self.cnt, self.row[ls], ls) >= 2
        tk = self.by_slot(self.taken[ls])
        fewest = np.where(redundant, tk, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
        slots = _true_indices(redundant & (tk == fewest), redundant.shape[1])
        if slots.shape[1] <= _NEAR:
            # _least_excess would sum all of them in full (the least within rounding is
            # the least of all): do only that, and skip the approximate pass.
            c = np.maximum(slots, 0)
            full = self._excess_in_full(ls, np.broadcast_to(e[:, None], c.shape), c, rl)
            return c[np.arange(ls.size), np.argmin(np.where(slots >= 0, full, np.inf), axis=1)]
        excess = self.excess_after_replacing(ls, e[:, None], slots, rl)
        return self._least_excess(ls, e[:, None], slots, rl, excess)[0]

    def _least_excess(self, ls: np.ndarray, h: np.ndarray, slots: np.ndarray, rl: np.ndarray,
                      excess: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (slot, expert) pair of least ``excess`` ``[n, K, H]`` (from
        :meth:`excess_after_replacing` on candidate ``slots`` ``[n, K]``, ``inf`` where not
        allowed): ``(slot, j, excess)`` ``[n]`` each, ``j`` indexing ``h`` ``[n, H]``.

        Pairs within rounding of the least are compared again by the rank loads
        summed in full (:meth:`_excess_in_full`), so that equal inputs give equal
        choices whichever formula found the candidates; the first ``_NEAR`` of them in
        (expert, slot) order, as ``slots`` is ascending."""
        n, K, H = excess.shape
        r = np.arange(n)
        tol = 1e-9 * (1.0 + rl.sum(axis=-1))
        close = excess <= (excess.min(axis=(1, 2)) + tol)[:, None, None]
        # (expert, slot) order: only the bool mask is transposed, not the scores
        near = np.maximum(_true_indices(close.transpose(0, 2, 1).reshape(n, H * K), _NEAR), 0)
        k, j = near % K, near // K
        slot = np.maximum(_pick(slots, k), 0)
        full = self._excess_in_full(ls, _pick(h, j), slot, rl)
        full = np.where(np.isfinite(excess.reshape(n, -1)[r[:, None], k * H + j]), full, np.inf)
        best = np.argmin(full, axis=1)
        return slot[r, best], j[r, best], full[r, best]

    def _excess_in_full(self, ls: np.ndarray, h: np.ndarray, slot: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n, K]``: the excess load after putting expert ``h`` in ``slot`` (both
        ``[n, K]``), with every rank's load written out: ``O(K x ranks)``."""
        n, K = h.shape
        a = np.maximum(_pick(self.row, slot, ls), 0)
        wh, ch = _pick(self.w, h, ls), _pick(self.cnt, h, ls)
        wa, ca = _pick(self.w, a, ls), _pick(self.cnt, a, ls)
        on = self.held_rows(ls, np.concatenate([h, a], axis=1))
        on_h, on_a = on[:, :K], on[:, K:]
        with np.errstate(divide="ignore", invalid="ignore"):
            shed = wh / ch - wh / (ch + 1)
            # in place, as rl - on_h * shed + on_a * grow: these [n, K, ranks] arrays are the cost
            new = np.multiply(on_h, shed[..., None])
            np.subtract(rl[:, None, :], new, out=new)
            np.copyto(new, rl[:, None, :], where=(ch <= 0)[..., None])  # a missing h sheds nothing
            grow = wa / (ca - 1) - wa / ca
            new += np.multiply(on_a, grow[..., None])
            at = np.arange(n * K) * self.ranks + (slot // self.spr).ravel()  # the slot's rank
            new.reshape(-1)[at] += (wh / (ch + 1) - wa / ca - grow).ravel()
        return _excess(new, overwrite=True)

    def excess_after_replacing(self, ls: np.ndarray, h: np.ndarray, slots: np.ndarray,
                               rl: np.ndarray, usable: np.ndarray | None = None) -> np.ndarray:
        """``[n, K, H]``: the excess load of layer ``ls[i]`` after putting expert
        ``h[i, j]`` in slot ``c = slots[i, k]`` instead of its expert ``a``, which must
        keep another replica; ``inf`` where ``c`` is ``-1``, its rank holds ``h`` or
        ``usable`` ``[n, H]`` (all if ``None``) is false. The ``h`` of a layer all have
        a replica, or there is one (``H == 1``); rows have no empty slot.

        Every replica of ``h`` sheds load (its count grows), every other replica of
        ``a`` takes more, and ``c``'s rank swaps ``a``'s share for ``h``'s. The sum over
        ranks is then: the ranks as ``h`` leaves them ``[n, H]``, plus one term per
        (``a``, rank) pair summed per expert ``[n, E]``, corrected where a rank holds
        both ``h`` and ``a`` ``[n, E, H]`` (few such ranks), plus ``c``'s rank
        ``[n, K, H]``: no candidate array has a rank axis.
        """
        n, H = h.shape
        row = self.row[ls]
        wh, ch = _pick(self.w, h, ls), _pick(self.cnt, h, ls)  # [n, H]
        # A missing h adds its load to the layer (only ever alone: H == 1).
        mean = (rl.sum(axis=-1) + np.where(ch[:, 0] == 0, wh[:, 0], 0.0)) / self.ranks

        def pos(x: np.ndarray) -> np.ndarray:
            return np.maximum(x - mean.reshape((n,) + (1,) * (x.ndim - 1)), 0.0)

        on_h = self.held_rows(ls, h)  # [n, H, R]
        shed = np.where(ch > 0, wh / np.maximum(ch, 1) - wh / (ch + 1), 0.0)
        base = rl[:, None, :] - on_h * shed[..., None]  # [n, H, R]
        wa, ca = _pick(self.w, row, ls), _pick(self.cnt, row, ls)  # [n, P]
        grow = np.where(ca >= 2, wa / np.maximum(ca - 1, 1) - wa / np.maximum(ca, 1), 0.0)
        same, first = self._same_on_rank(ls, row)
        rl_slot = self.by_slot(rl)
        shared = rl_slot + same * grow  # a slot's rank as a's other copies grow
        term = np.where(first, pos(shared) - pos(rl_slot), 0.0)
        per_a = self._per_expert(term, row)
        both = self._held_with_h(on_h, first, row, base, same * grow, term, mean)
        # Candidates are laid out [n, K, H] so that every gather takes whole rows of H.
        c = np.maximum(slots, 0)
        ac = _pick(row, c)
        holds = on_h.transpose(0, 2, 1) > 0  # [n, R, H]
        # c's rank: a's share out (its other copies there grow), h's share in.
        out = _pick(shared - wa / np.maximum(ca, 1) - grow, c) - mean[:, None]
        shape = ac.shape + (H,)
        total = _rows(both, ac, self.buffer("total", shape))  # in place: these [n, K, H] arrays are the cost
        total += pos(base).sum(axis=-1)[:, None, :]
        total += (_pick(per_a, ac) - _pick(pos(shared), c))[..., None]
        c_rank = np.add(out[..., None], (wh / (ch + 1))[:, None, :], out=self.buffer("c_rank", shape))
        total += np.maximum(c_rank, 0.0, out=c_rank)
        bad = _rows(holds, c // self.spr, self.buffer("rep_bad", shape, np.bool_))
        bad |= (slots < 0)[..., None]
        if usable is not None:
            bad |= ~usable[:, None, :]
        np.copyto(total, np.inf, where=bad)
        return total

    def _per_expert(self, term: np.ndarray, a: np.ndarray) -> np.ndarray:
        """``[n, E]``: ``term`` ``[n, P]`` summed over slots by their expert ``a`` ``[n, P]``."""
        n, E = term.shape[0], self.w.shape[1]
        idx = np.arange(n)[:, None] * E + a
        return np.bincount(idx.ravel(), weights=term.ravel(), minlength=n * E).reshape(n, E)

    def _held_with_h(self, on_h: np.ndarray, first: np.ndarray, a: np.ndarray, base: np.ndarray,
                     gain: np.ndarray, term: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """``[n, E, H]``: on the ranks holding ``h`` (``on_h`` ``[n, H, R]``), what each
        (``a``, rank) term changes when taken from ``base`` ``[n, H, R]`` (the rank after
        ``h`` sheds) instead of ``term`` ``[n, P]`` (from the rank as it is), summed per
        ``a``. ``gain`` ``[n, P]``: what a slot's rank takes as ``a``'s other copies grow;
        ``mean`` ``[n]``. Only ``h``'s ranks times their slots are visited."""
        n, H, R = on_h.shape
        E, P = self.w.shape[1], a.shape[1]
        ih = np.flatnonzero(on_h > 0)  # (layer, h, rank) triples, in order
        i, r = np.divmod(ih, R)
        lay = (i // H)[:, None]
        t = lay * P + r[:, None] * self.spr + np.arange(self.spr)  # [M, spr]: that rank's slots, flat
        b, mm = np.take(base, ih)[:, None], mean[lay]
        val = np.maximum(b + np.take(gain, t) - mm, 0.0) - np.maximum(b - mm, 0.0) - np.take(term, t)
        idx = (lay * E + np.take(a, t)) * H + (i % H)[:, None]
        sel = np.take(first, t)
        both = self.buffer("both", (n * E * H,))
        both.fill(0.0)
        np.add.at(both, idx[sel], val[sel])  # summed in order, as np.bincount would
        return both.reshape(n, E, H)

    def _same_on_rank(self, ls: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, P]`` replicas of each slot's expert on its rank (from ``held``), and
        whether the slot is the first of them there. Ranks holding an expert twice are
        rare: only they are compared slot by slot (``spr x spr``)."""
        n, P = row.shape
        same = self.held_at(ls, row, self.slot_rank)
        first = np.ones((n * self.ranks, self.spr), dtype=bool)
        dup = np.flatnonzero((same.reshape(n * self.ranks, self.spr) > 1).any(axis=-1))
        if dup.size:
            r3 = row.reshape(n * self.ranks, self.spr)[dup]
            eq = r3[:, :, None] == r3[:, None, :]
            first[dup] = ~(eq & np.tril(np.ones((self.spr, self.spr), dtype=bool), -1)).any(axis=-1)
        return same, first.reshape(n, P)

    def fill_empty(self) -> None:
        """2. Empty slots (joining ranks) take replicas of the experts with the greatest
        load per replica, on the least loaded rank not already holding that expert."""
        while True:
            ls = np.flatnonzero((self.row < 0).any(axis=1))
            if ls.size == 0:
                return
            e = np.argmax(self.w[ls] / np.maximum(self.cnt[ls], 1), axis=1)
            free = self.row[ls] < 0
            holders = self.held_rows(ls, e[:, None])[:, 0] > 0  # [n, ranks]
            pref = free & ~self.by_slot(holders)
            free = np.where(pref.any(axis=1, keepdims=True), pref, free)
            rl = self.rank_loads(ls)
            self._place(ls, np.argmin(np.where(free, self.by_slot(rl), np.inf), axis=1), e)

    def _peak(self, ls: np.ndarray, rl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The peak rank ``[n]`` of each layer and its slots ``[n, spr]``."""
        hi = np.argmax(rl, axis=1)
        return hi, hi[:, None] * self.spr + np.arange(self.spr)

    def best_moves(self, ls: np.ndarray, rl: np.ndarray, per: np.ndarray) -> tuple[_Move, _Move]:
        """:meth:`best_replicate` and :meth:`best_swap` of layers ``ls``, a batch of
        layers at a time (see ``_CHUNK``): each layer's moves are its own."""
        size = max(1, _CHUNK // (self.spr * self.row.shape[1]))
        parts = [slice(i, i + size) for i in range(0, ls.size, size)]
        rep = [self.best_replicate(ls[p], rl[p]) for p in parts]
        swap = [self.best_swap(ls[p], rl[p], per[p]) for p in parts]
        return _Move.concat(rep), _Move.concat(swap)

    def best_replicate(self, ls: np.ndarray, rl: np.ndarray) -> _Move:
        """Per layer, giving an expert of the peak rank another copy in the place of a
        redundant replica of another expert (``a``: slot, ``b``: expert)."""
        r = np.arange(ls.size)
        row = self.row[ls]
        _, xs = self._peak(ls, rl)
        h = np.sort(_pick(row, xs), axis=1)  # lowest id first, as np.unique
        usable = _pick(self.kept, h, ls)
        usable[:, 1:] &= h[:, 1:] != h[:, :-1]
        slots = _true_indices(_pick(self.cnt, row, ls) >= 2, row.shape[1])  # redundant
        excess = self.excess_after_replacing(ls, h, slots, rl, usable)
        slot, j, least = self._least_excess(ls, h, slots, rl, excess)
        gain = _excess(rl) - least
        cost = (row[r, slot] == self.carry[ls, slot]).astype(np.int64)  # a changing slot: free
        return _Move(np.isfinite(gain) & (gain > 0), gain, cost, slot, h[r, j])

    def apply_replicate(self, ls: np.ndarray, move: _Move, sel: np.ndarray) -> None:
        self._place(ls, move.a[sel], move.b[sel])

    def best_swap(self, ls: np.ndarray, rl: np.ndarray, per: np.ndarray) -> _Move:
        """Per layer, exchanging a slot of the peak rank (``a``) with a slot of another
        rank (``b``), never within the peak rank, never putting a second copy of an
        expert on a rank, never raising the most disk reads a rank makes. ``per``
        ``[n, P]``: :meth:`slot_loads` of the (full) rows of layers ``ls``.

        These ``[n, spr, P]`` candidate arrays are the cost of the step: each is built
        once and reused in place (a fresh large array costs page faults)."""
        n, r = ls.size, np.arange(ls.size)
        row, carry = self.row[ls], self.carry[ls]
        hi, xs = self._peak(ls, rl)
        rx = _pick(row, xs)
        shape = (n, self.spr, row.shape[1])
        gain = self._swap_gain(per, xs, hi, rl)
        bad = self._swap_not_allowed(ls, row, rx, hi)
        cost = np.not_equal(row[:, None, :], _pick(carry, xs)[:, :, None], out=self.buffer("cost", shape, np.int8))
        cost += rx[:, :, None] != carry[:, None, :]
        changed = row != carry
        cost -= _pick(changed, xs)[:, :, None]
        cost -= changed[:, None, :]
        score = np.maximum(cost, 1e-9, out=self.buffer("delta", shape))  # _swap_gain's scratch, done with
        np.divide(gain, score, out=score)
        skip = np.greater(gain, 0.0, out=self.buffer("skip", shape, np.bool_))
        np.logical_not(skip, out=skip)
        skip |= bad
        np.copyto(score, -np.inf, where=skip)
        i, y = np.divmod(np.argmax(score.reshape(n, -1), axis=1), row.shape[1])
        g = np.where(bad[r, i, y], -np.inf, gain[r, i, y])
        return _Move(g > 0, g, cost[r, i, y].astype(np.int64), xs[r, i], y)

    def _swap_gain(self, per: np.ndarray, xs: np.ndarray, hi: np.ndarray, rl: np.ndarray) -> np.ndarray:
        """``[n, spr, P]``: the excess the peak rank ``hi`` and slot ``y``'s rank lose
        when peak slot ``xs[:, i]`` and ``y`` swap (the peak sheds ``delta``, ``y``'s
        rank takes it)."""
        n, P = per.shape
        shape = (n, self.spr, P)
        mean = rl.mean(axis=-1)[:, None, None]
        rh = rl[np.arange(n), hi][:, None, None]
        ryl = self.by_slot(rl)[:, None, :]
        before = np.maximum(rh - mean, 0.0) + np.maximum(ryl - mean, 0.0)
        delta = np.subtract(_pick(per, xs)[:, :, None], per[:, None, :], out=self.buffer("delta", shape))
        after = np.subtract(rh, delta, out=self.buffer("gain", shape))
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
        bad = self.buffer("swap_bad", (n, self.spr, row.shape[1]), np.bool_)
        # y's rank holds x's expert: [n, spr, ranks] spread over each rank's slots
        np.copyto(bad.reshape(n, self.spr, self.ranks, self.spr), (self.held_rows(ls, rx) > 0)[..., None])
        y_side = self.held_at(ls, row, hi[:, None]) > 0  # [n, P]: the peak rank holds y's expert
        y_side |= self.slot_rank[None, :] == hi[:, None]
        hx = ~_pick(self.kept, rx, ls)  # [n, spr]: x's expert has no live replica
        hy = (~_pick(self.kept, row, ls)).astype(np.int64)  # [n, P]
        taken, cap = self.taken[ls], self.disk_cap[ls][:, None]
        # the disk rule for hx = 0 and hx = 1, per y; then chosen per (i, y)
        disk = [(self.by_slot(taken) + d - hy > cap) | (taken[r, hi][:, None] - d + hy > cap) | y_side
                for d in (0, 1)]
        np.logical_or(bad, disk[0][:, None, :], out=bad, where=~hx[:, :, None])
        np.logical_or(bad, disk[1][:, None, :], out=bad, where=hx[:, :, None])
        return bad

    def apply_swap(self, ls: np.ndarray, move: _Move, sel: np.ndarray) -> None:
        x, y = move.a[sel], move.b[sel]
        ex, ey = self.row[ls, x], self.row[ls, y]
        hx, hy = (~self.kept[ls, ex]).astype(np.int64), (~self.kept[ls, ey]).astype(np.int64)
        rx, ry = x // self.spr, y // self.spr
        self.taken[ls, rx] += hy - hx
        self.taken[ls, ry] += hx - hy
        self.held[ls, ex, rx] -= 1
        self.held[ls, ex, ry] += 1
        self.held[ls, ey, ry] -= 1
        self.held[ls, ey, rx] += 1
        self.row[ls, x], self.row[ls, y] = ey, ex


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
