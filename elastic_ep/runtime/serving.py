"""What a rank's engine may route tokens to, and how a plan changes it layer by layer
while serving goes on (:mod:`elastic_ep.core.layer_switch` has the rules).

The engine runs each step holding the agent's ``busy`` lock. A plan takes the lock only
to switch one layer's map and to write one layer's staged slots, so the longest serving
pause is one layer's write; :class:`Pauses` measures every hold.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from elastic_ep.core.layer_switch import in_old_numbering, transition, uncovered, without_ranks
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan
from elastic_ep.runtime.executor import Participants


@dataclass
class ServingMap:
    """The router's view: ``phy2log`` int64 ``[num_layers, num_physical]``, the logical
    expert each physical slot serves, ``-1`` where no token may go (a dead rank, a slot
    being rewritten); ``rank``: this process's rank in the same numbering (None: it
    holds no slots). Rows are replaced whole, under the agent's ``busy`` lock.

    Example: ``m = ServingMap.of(placement, rank=1)``; ``m.routes(0, 5)`` -> the slots
    of layer 0 serving expert 5; ``m.unavailable()`` -> per layer, experts with none.
    """

    phy2log: np.ndarray
    slots_per_rank: int
    num_logical: int
    rank: int | None

    @classmethod
    def of(cls, placement: ExpertPlacement, rank: int | None, dead: frozenset[int] | set[int] = frozenset()) -> "ServingMap":
        return cls(without_ranks(placement.phy2log, dead, placement.slots_per_rank), placement.slots_per_rank,
                   placement.num_logical, rank)

    def routes(self, layer: int, expert: int) -> np.ndarray:
        """The slots of ``layer`` serving ``expert`` now (empty: unavailable)."""
        return np.flatnonzero(self.phy2log[layer] == expert)

    def unavailable(self) -> list[list[int]]:
        return uncovered(self.phy2log, self.num_logical)


@dataclass
class Pauses:
    """Every hold of the engine's lock by a plan: ``seconds`` in order; ``longest`` and
    ``total`` for the ack; ``writes``: the part of each write hold spent copying the
    layer's slots (the rest switches map rows). Example: ``with pauses.hold(lock): write()``."""

    seconds: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def hold(self, lock: threading.Lock) -> Iterator[None]:
        with lock:
            t = time.perf_counter()
            try:
                yield
            finally:
                self.seconds.append(time.perf_counter() - t)

    @property
    def longest(self) -> float:
        return max(self.seconds, default=0.0)

    @property
    def total(self) -> float:
        return sum(self.seconds)


@dataclass
class PlanSwitch:
    """The :class:`~elastic_ep.runtime.executor.LayerHooks` of one plan for an old rank
    that keeps serving while it runs: ``current`` is the map the engine reads (rows
    replaced under ``lock``), ``target`` the new placement in the old numbering,
    ``participants`` the plan's (to turn excluded participants into old ranks);
    ``changed(map, layers)`` tells the engine which rows were replaced (under the lock).
    Each layer's write is one pause, which also moves the layer before to its new slots
    and the layer after into transition; the last layer's new slots are one more."""

    current: ServingMap
    target: np.ndarray
    participants: Participants
    lock: threading.Lock
    changed: Callable[[ServingMap, list[int]], None] | None = None
    pauses: Pauses = field(default_factory=Pauses)

    @classmethod
    def start(cls, plan: TransferPlan, rank: int, lock: threading.Lock,
              changed: Callable[[ServingMap, list[int]], None] | None = None) -> "PlanSwitch":
        """The switch of ``plan`` for old rank ``rank``: serving starts from the plan's
        old placement without its dead ranks, layer 0 in transition."""
        m = plan.mapping
        current = ServingMap.of(plan.old, rank, m.dead)
        target = in_old_numbering(plan.new, m)
        current.phy2log[0] = transition(current.phy2log[0], target[0])
        return cls(current, target, Participants.of(m), lock, changed)

    @contextlib.contextmanager
    def writing(self, layer: int, excluded: list[int]) -> Iterator[None]:
        """One pause per layer: the layer before goes to its new slots, the next one into
        transition, and this one's slots are written."""
        with self.pauses.hold(self.lock):
            rows = self.current.phy2log
            changed = [layer]
            if layer > 0:
                rows[layer - 1] = self._target(layer - 1, excluded)
                changed.append(layer - 1)
            if layer + 1 < rows.shape[0]:
                rows[layer + 1] = transition(rows[layer + 1], self.target[layer + 1])
                changed.append(layer + 1)
            if self.changed is not None:
                self.changed(self.current, sorted(changed))
            t = time.perf_counter()
            yield
            self.pauses.writes.append(time.perf_counter() - t)

    def written(self, layer: int, excluded: list[int]) -> None:
        with self.pauses.hold(self.lock):
            self.current.phy2log[layer] = self._target(layer, excluded)
            if self.changed is not None:
                self.changed(self.current, [layer])

    def _target(self, layer: int, excluded: list[int]) -> np.ndarray:
        gone = {self.participants.old[p] for p in excluded if p < len(self.participants.old)}
        return without_ranks(self.target[layer], gone, self.current.slots_per_rank)


PLAN_PHASES = ("connect", "local", "peer", "disk", "barrier", "write")
"""The executor's phases, in seconds, in an ack (their sum: the rank's transfer time)."""


def plan_pauses(acks: Iterable[Any]) -> dict[str, float]:
    """The serving pauses of one plan, from its acks' phases (the agent writes
    ``pause_max``, ``pause_total`` and ``write_max``): the longest hold of any rank's
    engine lock, the largest total held by one rank, the longest copy of one layer's
    slots inside a hold, and the longest rank's transfer time; ``{}`` when no ack has
    them. Example: ``plan_pauses(acks)["longest_s"] -> 0.0051``."""
    acks = [a for a in acks if "pause_max" in a.phases]
    if not acks:
        return {}
    return {
        "longest_s": max(a.phases["pause_max"] for a in acks),
        "total_s": max(a.phases.get("pause_total", 0.0) for a in acks),
        "layer_write_s": max(a.phases.get("write_max", 0.0) for a in acks),
        "plan_s": max(sum(v for k, v in a.phases.items() if k in PLAN_PHASES) for a in acks),
    }
