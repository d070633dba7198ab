"""A rank's slots against the checkpoint: check that the checkpoint holds every expert a
rank may be asked for, fill slots from disk, and find the ones whose bytes differ from
their expert's.

Both take a rank's weights as the executor does: per MoE layer, the serving tensors
``[slots_per_rank, ...]`` (by name or in layout order). Slot ``s`` of rank ``r`` holds
``placement.rank_slots(r)[layer, s]``.

Example (2 layers, 4 slots per rank, rank 1 of 2)::

    check_checkpoint(disk, 2, 8)                                   # headers only; raises if unfit
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
from elastic_ep.errors import MissingTensorError

ExpertReference = Callable[[int, Sequence[int]], torch.Tensor]
"""``(layer, logical experts) -> uint8 [len(experts), expert_bytes]``: what a slot holding
each expert must contain, packed in the layout's order."""


MAX_EXPERTS = 1 << 16
"""The most experts per layer :func:`check_checkpoint` counts when not told how many."""


def check_checkpoint(disk: SafetensorsExpertSource, num_layers: int, num_experts: int | None = None) -> int:
    """Check, reading headers only, every tensor of every logical expert of MoE layers
    ``0 .. num_layers - 1``: named by the index or a header, with the layout's dtype and
    shape, its bytes inside its file (a truncated shard fails here, not in a plan).
    Returns the experts checked, ``num_layers * num_experts``.

    ``num_experts`` None: as many as MoE layer 0 holds (counted up to the first one
    missing). Raises the :class:`~elastic_ep.errors.CheckpointError` a disk load of the
    first bad expert would raise, naming its file and tensor. Example:
    ``check_checkpoint(disk, 58, 256)`` for DeepSeek-V3 reads each shard's header once
    and checks 14,848 experts.
    """
    count = num_experts if num_experts is not None else _count_experts(disk)
    for layer in range(num_layers):
        disk.check([(layer, e) for e in range(count)])
    return num_layers * count


def _count_experts(disk: SafetensorsExpertSource) -> int:
    disk.check([(0, 0)])  # a layer 0 without expert 0 raises, naming the tensor
    for n in range(1, MAX_EXPERTS):
        try:
            disk.check([(0, n)])
        except MissingTensorError:
            return n
    return MAX_EXPERTS


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
