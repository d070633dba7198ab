"""Rank mapping of one membership change: ``old_rank -> new_rank``, ``-1`` when removed.

Surviving ranks keep their order and are renumbered densely ``0 .. k-1``; joining ranks
take ``k .. k+j-1``. A *leaving* (draining) rank is removed from the new placement but
still serves its experts as a transfer source until the plan commits; a *dead* rank is
neither a destination nor a source.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable

import numpy as np

from elastic_ep.errors import RankMappingError
from elastic_ep.core.placement import ExpertPlacement, describe, record_int, record_ints

MAX_RANKS = 1 << 16
"""The most ranks a mapping read from a record may name (old ranks, and joining ranks)."""


@dataclass(frozen=True)
class RankMapping:
    """``old_to_new[old_rank] -> new_rank | -1``.

    Attributes:
        old_to_new: length ``old_ep_size``. Example: 4 ranks, rank 1 dead, one joining:
            ``(0, -1, 1, 2)`` and ``new_ep_size == 4`` (new rank 3 is the joiner).
        dead: old ranks that are gone (``{1}`` above); never a source.
        leaving: old ranks draining out; removed but still a source.
        num_joining: ranks added at the end of the new numbering.
    """

    old_to_new: tuple[int, ...]
    dead: frozenset[int] = frozenset()
    leaving: frozenset[int] = frozenset()
    num_joining: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_to_new", tuple(int(x) for x in self.old_to_new))
        object.__setattr__(self, "dead", frozenset(int(x) for x in self.dead))
        object.__setattr__(self, "leaving", frozenset(int(x) for x in self.leaving))
        self.validate()

    @classmethod
    def build(
        cls,
        old_ep_size: int,
        dead: Iterable[int] = (),
        leaving: Iterable[int] = (),
        num_joining: int = 0,
    ) -> "RankMapping":
        """The mapping for ``old_ep_size`` ranks minus ``dead`` and ``leaving``, plus
        ``num_joining`` new ranks. ``build(4, dead=[1]).old_to_new == (0, -1, 1, 2)``."""
        dead_s, leaving_s = frozenset(dead), frozenset(leaving)
        for name, s in (("dead", dead_s), ("leaving", leaving_s)):
            out = sorted(r for r in s if not 0 <= r < old_ep_size)
            if out:
                raise RankMappingError(
                    f"{name} ranks {out} are outside 0..{old_ep_size - 1} (old ep size {old_ep_size})"
                )
        removed = dead_s | leaving_s
        mapping, nxt = [], 0
        for r in range(old_ep_size):
            if r in removed:
                mapping.append(-1)
            else:
                mapping.append(nxt)
                nxt += 1
        return cls(tuple(mapping), dead_s, leaving_s, num_joining)

    # -- sizes -------------------------------------------------------------------------
    @property
    def old_ep_size(self) -> int:
        return len(self.old_to_new)

    @cached_property  # read once per transfer when a plan is checked: count once
    def num_surviving(self) -> int:
        return sum(1 for x in self.old_to_new if x >= 0)

    @property
    def new_ep_size(self) -> int:
        return self.num_surviving + self.num_joining

    @cached_property
    def live_sources(self) -> frozenset[int]:
        """Old ranks that may send during the transfer: everyone but the dead."""
        return frozenset(r for r in range(self.old_ep_size) if r not in self.dead)

    def new_to_old(self) -> list[int]:
        """``[new_ep_size]``: the old rank behind each new rank, ``-1`` for a joiner."""
        out = [-1] * self.new_ep_size
        for old, new in enumerate(self.old_to_new):
            if new >= 0:
                out[new] = old
        return out

    def is_identity(self) -> bool:
        return self.num_joining == 0 and self.old_to_new == tuple(range(self.old_ep_size))

    # -- invariants --------------------------------------------------------------------
    def validate(self) -> None:
        m = self.old_to_new
        if self.num_joining < 0:
            raise RankMappingError(f"num_joining must be >= 0, got {self.num_joining}")
        bad = [(o, n) for o, n in enumerate(m) if n < -1]
        if bad:
            raise RankMappingError(f"old->new pairs {bad} map below -1; use -1 for a removed rank")
        survivors = [n for n in m if n >= 0]
        if survivors != list(range(len(survivors))):
            raise RankMappingError(
                f"mapping {list(m)} is not dense and ordered: surviving ranks must map to "
                f"0..{len(survivors) - 1} in their old order"
            )
        removed = {o for o, n in enumerate(m) if n < 0}
        both = self.dead & self.leaving
        if both:
            raise RankMappingError(f"ranks {sorted(both)} are marked both dead and leaving")
        if (self.dead | self.leaving) != removed:
            raise RankMappingError(
                f"removed ranks {sorted(removed)} must be exactly dead {sorted(self.dead)} "
                f"plus leaving {sorted(self.leaving)}"
            )
        if self.new_ep_size == 0:
            raise RankMappingError("the new deployment would have no rank: keep at least one")

    # -- placement -----------------------------------------------------------------------
    def carry_over(self, placement: ExpertPlacement) -> np.ndarray:
        """``[num_layers, new_ep_size * slots_per_rank]``: what each new slot holds before
        any transfer (the slot of a surviving rank keeps its expert; slots of joining
        ranks are ``-1``)."""
        if placement.ep_size != self.old_ep_size:
            raise RankMappingError(
                f"mapping is for {self.old_ep_size} ranks but the placement has "
                f"{placement.ep_size}"
            )
        spr = placement.slots_per_rank
        out = np.full((placement.num_layers, self.new_ep_size * spr), -1, dtype=np.int64)
        for new, old in enumerate(self.new_to_old()):
            if old >= 0:
                out[:, new * spr : (new + 1) * spr] = placement.rank_slots(old)
        return out

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "old_to_new": list(self.old_to_new),
            "dead": sorted(self.dead),
            "leaving": sorted(self.leaving),
            "num_joining": self.num_joining,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "RankMapping":
        """The mapping of a record (``to_dict``'s shape). Anything else, a hostile value
        included, raises :class:`RankMappingError`; sizes are bounded by :data:`MAX_RANKS`."""
        if not isinstance(d, dict) or "old_to_new" not in d:
            raise RankMappingError(f"rank mapping record is malformed ({describe(d)}); expected old_to_new, dead, "
                                   "leaving, num_joining")
        old_to_new = record_ints(d["old_to_new"], "rank mapping old_to_new", -1, MAX_RANKS - 1, RankMappingError,
                                 MAX_RANKS)
        n = len(old_to_new)
        dead, leaving = (record_ints(d.get(k, []), f"rank mapping {k}", 0, n - 1, RankMappingError, n)
                         for k in ("dead", "leaving"))
        joining = record_int(d.get("num_joining", 0), "rank mapping num_joining", 0, MAX_RANKS, RankMappingError)
        return cls(tuple(old_to_new), frozenset(dead), frozenset(leaving), joining)
