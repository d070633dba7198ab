"""What the router may use, layer by layer, while a plan rewrites the weights beside
serving. Pure functions over ``phy2log`` arrays (``[num_layers, num_physical]``, ``-1``
for a slot no token may go to).

During a plan the engine keeps the numbering of the placement it serves (the old
one: its EP group changes at the commit). Per layer, each rank moves through:

1. ``old``: the committed placement, dead ranks' slots removed (coverage before
   balance);
2. ``transition`` (:func:`transition`): from just before this rank says it finished
   reading the layer, the slots that keep their expert across the plan, only. No rank
   writes a layer before every live rank said so (the layer barrier), so no token is
   routed to a slot while its bytes change;
3. ``target`` (:func:`in_old_numbering`): once every live rank has written the layer
   (the next layer's barrier), the new placement's slots of the surviving ranks.

Example: 2 ranks x 2 slots, old ``[[0, 1, 2, 3]]``, new ``[[0, 2, 1, 3]]`` (ranks
kept): transition ``[[0, -1, -1, 3]]``; target ``[[0, 2, 1, 3]]``.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.rank_mapping import RankMapping


def in_old_numbering(new: ExpertPlacement, mapping: RankMapping) -> np.ndarray:
    """``new``'s slots at the old ranks that fill them: int64 ``[num_layers, old_ep *
    slots_per_rank]``; ``-1`` on old ranks with no new rank (dead, leaving). Joining
    ranks are not in the old numbering and are left out."""
    spr = new.slots_per_rank
    out = np.full((new.num_layers, mapping.old_ep_size * spr), -1, dtype=np.int64)
    for old, nr in enumerate(mapping.old_to_new):
        if nr >= 0:
            out[:, old * spr:(old + 1) * spr] = new.phy2log[:, nr * spr:(nr + 1) * spr]
    return out


def without_ranks(phy2log: np.ndarray, ranks: set[int] | frozenset[int], slots_per_rank: int) -> np.ndarray:
    """A copy of ``phy2log`` with every slot of ``ranks`` set to ``-1``."""
    out = np.array(phy2log, dtype=np.int64, copy=True)
    for r in ranks:
        out[..., r * slots_per_rank:(r + 1) * slots_per_rank] = -1
    return out


def transition(old: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The slots of ``old`` whose expert is the same in ``target`` (same shape); ``-1``
    elsewhere."""
    return np.where(old == target, old, -1)


def uncovered(phy2log: np.ndarray, num_logical: int) -> list[list[int]]:
    """Per layer, the logical experts with no slot in ``phy2log``."""
    out = []
    for row in np.atleast_2d(phy2log):
        have = np.zeros(num_logical, dtype=bool)
        valid = row[(row >= 0) & (row < num_logical)]
        have[valid] = True
        out.append(np.flatnonzero(~have).tolist())
    return out
