"""A rank's slots against the checkpoint: fill them from disk, and find the ones whose
bytes differ from their expert's.

Both take a rank's weights as the executor does: per MoE layer, the serving tensors
``[slots_per_rank, ...]`` (by name or in layout order). Slot ``s`` of rank ``r`` holds
``placement.rank_slots(r)[layer, s]``.

Example (2 layers, 4 slots per rank, rank 1 of 2)::

    read = fill_rank_slots(disk, placement, 1, weights)            # bytes read
    bad = mismatched_slots(layout, placement, 1, weights, disk_reference(disk))
    assert bad == []                                               # [(layer, slot, logical), ...]
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from loaders.checkpoint.model import ExpertModel
from loaders.checkpoint.safetensors_source import ExpertRequest, SafetensorsExpertSource
from loaders.layout import ExpertLayout, LayerWeights

from elastic_ep.core.placement import ExpertPlacement

ExpertReference = Callable[[int, Sequence[int]], torch.Tensor]
"""``(layer, logical experts) -> uint8 [len(experts), expert_bytes]``: what a slot holding
each expert must contain, packed in the layout's order."""


def fill_rank_slots(
    disk: SafetensorsExpertSource,
    placement: ExpertPlacement,
    rank: int,
    weights: Sequence[LayerWeights],
    held: np.ndarray | None = None,
) -> int:
    """Fill ``rank``'s slots of ``placement`` from the checkpoint; returns bytes read.

    ``held``: optional int ``[num_layers, slots_per_rank]``, the logical expert each slot
    holds now (``-1``: unknown); a slot that already holds its expert is not read.
    """
    want = placement.rank_slots(rank)
    total = 0
    for layer in range(placement.num_layers):
        reqs = [ExpertRequest(layer, int(e), s) for s, e in enumerate(want[layer])
                if held is None or held[layer, s] != e]
        if reqs:
            total += disk.load(reqs, weights).bytes_read
    return total


def disk_reference(disk: SafetensorsExpertSource) -> ExpertReference:
    """The checkpoint's bytes of each expert, read from disk (through the loader)."""

    def read(layer: int, experts: Sequence[int]) -> torch.Tensor:
        eb = disk.layout.expert_bytes
        out = torch.empty(len(experts) * eb, dtype=torch.uint8)
        disk.read_packed([(layer, int(e)) for e in experts], out, [i * eb for i in range(len(experts))])
        return out.view(len(experts), eb)

    return read


def model_reference(model: ExpertModel, layout: ExpertLayout) -> ExpertReference:
    """Each expert's bytes from ``model.expected_row``: a reference independent of the
    disk loader (a loader bug that writes wrong bytes cannot hide behind itself)."""

    def expected(layer: int, experts: Sequence[int]) -> torch.Tensor:
        out = torch.empty(len(experts), layout.expert_bytes, dtype=torch.uint8)
        for i, e in enumerate(experts):
            row = model.expected_row(layer, int(e))
            layout.pack_slot({n: r.contiguous().unsqueeze(0) for n, r in row.items()}, 0, out=out[i])
        return out

    return expected


def mismatched_slots(
    layout: ExpertLayout,
    placement: ExpertPlacement,
    rank: int,
    weights: Sequence[LayerWeights],
    reference: ExpertReference,
) -> list[tuple[int, int, int]]:
    """``(layer, slot, logical)`` of every slot of ``rank`` whose bytes differ from
    ``reference``'s for its expert (reads every slot: for tests and debugging)."""
    want = placement.rank_slots(rank)
    bad = []
    for layer in range(placement.num_layers):
        experts = [int(e) for e in want[layer]]
        ref = reference(layer, experts)
        got = torch.empty(layout.expert_bytes, dtype=torch.uint8, device=ref.device)
        for slot, e in enumerate(experts):
            if not torch.equal(layout.pack_slot(weights[layer], slot, out=got), ref[slot]):
                bad.append((layer, slot, e))
    return bad
