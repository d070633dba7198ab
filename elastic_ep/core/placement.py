"""Expert placement: which logical expert each physical slot of each MoE layer holds.

Glossary (the words of vLLM's and SGLang's EPLB):

- logical expert: an expert of the model, ``0 .. num_logical - 1`` per MoE layer.
- physical expert / slot: one copy of a logical expert's weights on one rank. A layer
  has ``num_physical = ep_size * slots_per_rank`` slots; slot ``s`` lives on rank
  ``s // slots_per_rank`` at local index ``s % slots_per_rank``.
- redundant expert: a physical expert beyond the first copy of its logical expert.
- ``phy2log[layer, slot]``: the logical expert held by a slot.
- ``log2phy[layer, logical, k]``: the slots holding a logical expert, ``-1`` padded.
- ``logcnt[layer, logical]``: how many slots hold a logical expert.

Example (DeepSeek-V3 / R1 on 32 ranks): 256 logical experts + 32 redundant = 288
physical experts, 9 slots per rank. The initial placement puts logical experts
0..255 in slots 0..255 and the redundant slots 256..287 hold logical ``i % 256``,
so rank 0 holds experts 0..8 and rank 31 holds 279..287 -> 23..31.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from elastic_ep.core.packed import describe, pack, unpack
from elastic_ep.errors import PlacementError


def _as_int64(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise PlacementError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """Per MoE layer, the logical expert held by every physical slot.

    Attributes:
        phy2log: int64 ``[num_layers, num_physical]``, ``num_physical = ep_size *
            slots_per_rank``. Example for 2 layers, 4 logical experts, 2 ranks x 3 slots:
            ``[[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]]``.
        slots_per_rank: slots per rank in every layer (3 above).
        num_logical: logical experts per layer (4 above).

    Derived (computed once, read-only):
        log2phy: int64 ``[num_layers, num_logical, num_physical - num_logical + 1]``,
            the slots of each logical expert in ascending order, ``-1`` padded
            (vLLM's width: at most every redundant slot holds one expert).
        logcnt: int64 ``[num_layers, num_logical]``, replicas per logical expert.

    The constructor does not validate (a policy may build intermediate states);
    call :meth:`validate` at the boundaries.
    """

    phy2log: np.ndarray
    slots_per_rank: int
    num_logical: int
    _log2phy: np.ndarray | None = field(default=None, repr=False, compare=False)
    _logcnt: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        phy2log = _as_int64(self.phy2log, "phy2log")
        if phy2log.ndim != 2:
            raise PlacementError(
                f"phy2log must be [num_layers, num_physical], got shape {tuple(phy2log.shape)}"
            )
        if self.slots_per_rank <= 0:
            raise PlacementError(f"slots_per_rank must be positive, got {self.slots_per_rank}")
        if self.num_logical <= 0:
            raise PlacementError(f"num_logical must be positive, got {self.num_logical}")
        if phy2log.shape[1] % self.slots_per_rank:
            raise PlacementError(
                f"num_physical={phy2log.shape[1]} is not a multiple of "
                f"slots_per_rank={self.slots_per_rank}: every rank holds the same slot count"
            )
        phy2log = np.ascontiguousarray(phy2log)
        phy2log.setflags(write=False)
        object.__setattr__(self, "phy2log", phy2log)

    # -- shape -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def ep_size(self) -> int:
        return self.num_physical // self.slots_per_rank

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_logical

    def rank_slots(self, rank: int) -> np.ndarray:
        """``[num_layers, slots_per_rank]``: the logical experts held by ``rank``."""
        s = rank * self.slots_per_rank
        return self.phy2log[:, s : s + self.slots_per_rank]

    def masked(self, ranks: list[int]) -> "ExpertPlacement":
        """This placement with every slot of ``ranks`` emptied (``-1``): its ``log2phy``
        and ``logcnt`` route around those ranks, and a logical expert whose count drops
        to 0 has no live replica (:meth:`unavailable`). Not a placement to plan from:
        :meth:`validate` refuses it. Example: ``p.masked([1]).logcnt`` counts only the
        replicas outside rank 1."""
        phy2log = self.phy2log.copy()
        for r in ranks:
            if 0 <= r < self.ep_size:
                phy2log[:, r * self.slots_per_rank:(r + 1) * self.slots_per_rank] = -1
        return ExpertPlacement(phy2log, self.slots_per_rank, self.num_logical)

    def unavailable(self) -> list[list[int]]:
        """Per layer, the logical experts with no replica (after :meth:`masked`)."""
        return [np.flatnonzero(row == 0).tolist() for row in self.logcnt]

    # -- derived maps ------------------------------------------------------------------
    @property
    def logcnt(self) -> np.ndarray:
        if self._logcnt is None:
            cnt = np.zeros((self.num_layers, self.num_logical), dtype=np.int64)
            valid = (self.phy2log >= 0) & (self.phy2log < self.num_logical)
            rows = np.broadcast_to(np.arange(self.num_layers)[:, None], self.phy2log.shape)
            np.add.at(cnt, (rows[valid], self.phy2log[valid]), 1)
            cnt.setflags(write=False)
            object.__setattr__(self, "_logcnt", cnt)
        return self._logcnt  # type: ignore[return-value]

    @property
    def log2phy(self) -> np.ndarray:
        if self._log2phy is None:
            width = max(self.num_physical - self.num_logical + 1, 1)
            out = np.full((self.num_layers, self.num_logical, width), -1, dtype=np.int64)
            valid = (self.phy2log >= 0) & (self.phy2log < self.num_logical)
            layer, slot = np.nonzero(valid)  # slots ascending within each layer
            logical = self.phy2log[layer, slot]
            # k-th replica index: position of this slot among the slots of the same
            # (layer, logical), found by a stable sort on the key.
            key = layer * self.num_logical + logical
            order = np.argsort(key, kind="stable")
            sorted_key = key[order]
            starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
            run_start = np.repeat(starts, np.diff(np.r_[starts, sorted_key.size]))
            k = np.empty_like(order)
            k[order] = np.arange(order.size) - run_start
            keep = k < width
            out[layer[keep], logical[keep], k[keep]] = slot[keep]
            out.setflags(write=False)
            object.__setattr__(self, "_log2phy", out)
        return self._log2phy  # type: ignore[return-value]

    # -- invariants --------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`PlacementError` naming the layer and the broken invariant."""
        p = self.phy2log
        bad = (p < 0) | (p >= self.num_logical)
        if bad.any():
            layer, slot = np.argwhere(bad)[0]
            raise PlacementError(
                f"layer {layer}: slot {slot} holds logical expert {p[layer, slot]}, "
                f"outside 0..{self.num_logical - 1}"
            )
        if self.num_physical < self.num_logical:
            raise PlacementError(
                f"{self.num_physical} slots cannot hold {self.num_logical} logical experts: "
                "add ranks or slots per rank"
            )
        missing = self.logcnt == 0
        if missing.any():
            layer = int(np.flatnonzero(missing.any(axis=1))[0])
            experts = np.flatnonzero(missing[layer]).tolist()
            raise PlacementError(
                f"layer {layer}: logical experts {experts[:16]}"
                f"{' ...' if len(experts) > 16 else ''} have no replica"
            )

    # -- value semantics ---------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return (
            self.slots_per_rank == other.slots_per_rank
            and self.num_logical == other.num_logical
            and np.array_equal(self.phy2log, other.phy2log)
        )

    def to_dict(self) -> dict[str, Any]:
        """The record form: ``phy2log`` packed (:mod:`elastic_ep.core.packed`), about a
        fifth of a JSON list of lists."""
        return {"slots_per_rank": self.slots_per_rank, "num_logical": self.num_logical, "phy2log": pack(self.phy2log)}

    @classmethod
    def from_dict(cls, d: Any) -> "ExpertPlacement":
        """The placement of a record (``to_dict``'s shape; ``phy2log`` packed or a list of
        lists), validated. Anything else, a hostile value included, raises
        :class:`PlacementError` before an array is built."""
        if not isinstance(d, dict) or not {"phy2log", "slots_per_rank", "num_logical"} <= d.keys():
            raise PlacementError(f"placement record is malformed ({describe(d)}); expected keys phy2log, "
                                 "slots_per_rank, num_logical")
        slots = record_int(d["slots_per_rank"], "placement slots_per_rank", 1, MAX_SLOTS_PER_RANK)
        logical = record_int(d["num_logical"], "placement num_logical", 1, MAX_LOGICAL)
        raw = d["phy2log"]
        if isinstance(raw, dict):
            phy2log = unpack(raw, "placement phy2log", MAX_ELEMENTS, ndim=2)
            if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= logical):
                raise PlacementError(f"placement phy2log holds ids outside 0..{logical - 1}")
        else:
            phy2log = record_matrix(raw, "placement phy2log", 0, logical - 1)
        placement = cls(phy2log, slots, logical)
        placement.validate()
        return placement


# -- reading records ---------------------------------------------------------------------
# Records come from etcd, where anything may have been written: every bound is checked
# before an array is allocated, and every defect raises the caller's typed error.
MAX_SLOTS_PER_RANK = 1 << 12
MAX_LOGICAL = 1 << 16
MAX_ELEMENTS = 1 << 22
"""The most entries an array of a record may hold (a DeepSeek-V3 placement on 2048
ranks holds 58 x 18432 = 1.07M)."""


def record_int(value: Any, name: str, lo: int, hi: int,
               error: Callable[[str], Exception] = PlacementError) -> int:
    """``value`` when it is an int (not a bool) in ``lo..hi``, else ``error`` naming ``name``.

    ``record_int(3, "slots_per_rank", 1, 4096) == 3``."""
    if type(value) is not int:
        raise error(f"{name} must be an integer in {lo}..{hi}, got {describe(value)}")
    if not lo <= value <= hi:
        raise error(f"{name} {describe(value)} is out of range {lo}..{hi}")
    return value


def record_ints(value: Any, name: str, lo: int, hi: int, error: Callable[[str], Exception] = PlacementError,
                max_len: int = MAX_ELEMENTS) -> list[int]:
    """``value`` when it is a list of at most ``max_len`` ints in ``lo..hi``, else
    ``error`` naming ``name``. ``record_ints([0, 2], "dead", 0, 3) == [0, 2]``."""
    if not isinstance(value, list) or len(value) > max_len:
        raise error(f"{name} must be a list of at most {max_len} integers, got {describe(value)}")
    bad = [x for x in value if type(x) is not int][:1]
    if bad:
        raise error(f"{name} must hold integers only, got {describe(bad[0])}")
    if value and (min(value) < lo or max(value) > hi):
        raise error(f"{name} holds {describe(min(value) if min(value) < lo else max(value))}, out of range {lo}..{hi}")
    return value


def record_matrix(value: Any, name: str, lo: int, hi: int,
                  error: Callable[[str], Exception] = PlacementError) -> np.ndarray:
    """int64 ``[rows, cols]`` from a non-empty list of equal-length lists of ints in
    ``lo..hi`` (at most :data:`MAX_ELEMENTS`), else ``error`` naming ``name``: a ragged
    or oversized value is refused before anything is allocated."""
    if not isinstance(value, list) or not value or not isinstance(value[0], list):
        raise error(f"{name} must be a non-empty list of lists of integers, got {describe(value)}")
    cols = len(value[0])
    if len(value) * max(cols, 1) > MAX_ELEMENTS:
        raise error(f"{name} is {len(value)} x {cols}, more than {MAX_ELEMENTS} entries")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            raise error(f"{name} row {i} is {describe(row)}, expected a list of {cols} integers like row 0")
        record_ints(row, f"{name} row {i}", lo, hi, error)
    return np.array(value, dtype=np.int64).reshape(len(value), cols)


def initial_placement(
    num_layers: int, num_logical: int, ep_size: int, slots_per_rank: int
) -> ExpertPlacement:
    """Routed experts in order, then redundant slot ``i`` holds logical ``i % num_logical``.

    ``initial_placement(1, 4, 2, 3).phy2log == [[0, 1, 2, 3, 0, 1]]``.
    """
    num_physical = ep_size * slots_per_rank
    if num_physical < num_logical:
        raise PlacementError(
            f"ep_size={ep_size} x slots_per_rank={slots_per_rank} = {num_physical} slots "
            f"cannot hold {num_logical} logical experts"
        )
    row = np.arange(num_physical, dtype=np.int64) % num_logical
    return ExpertPlacement(np.tile(row, (num_layers, 1)), slots_per_rank, num_logical)


def rank_loads(placement: ExpertPlacement, load: np.ndarray) -> np.ndarray:
    """``[num_layers, ep_size]`` load per rank, a logical expert's load split evenly
    over its replicas (how EP dispatch spreads tokens over replicas).

    ``load``: ``[num_layers, num_logical]`` tokens routed to each logical expert.
    """
    load = np.asarray(load, dtype=np.float64)
    cnt = np.maximum(placement.logcnt, 1)
    per_replica = load / cnt
    per_slot = np.take_along_axis(per_replica, placement.phy2log, axis=1)
    return per_slot.reshape(placement.num_layers, placement.ep_size, placement.slots_per_rank).sum(-1)


def balance(placement: ExpertPlacement, load: np.ndarray) -> float:
    """Mean over layers of ``mean rank load / max rank load`` (1.0 is perfect)."""
    r = rank_loads(placement, load)
    mx = r.max(axis=1)
    ratio = np.where(mx > 0, r.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)
    return float(ratio.mean())
