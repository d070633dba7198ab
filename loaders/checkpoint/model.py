"""What a rank needs to know about a checkpoint's routed experts, whatever wrote it."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from loaders.layout import ExpertLayout
from loaders.checkpoint.naming import NamingScheme


class ExpertModel(Protocol):
    """The experts of a checkpoint: :class:`loaders.checkpoint.synthetic.SyntheticSpec` (generated
    checkpoints) and :class:`loaders.checkpoint.hf_model.ModelCheckpoint` (model directories).

    ``layers`` MoE layers (placement layer ``i`` is checkpoint layer
    ``moe_layer_ids[i]``) of ``experts`` routed experts, each packing into
    ``expert_bytes`` in ``layout()``; ``expected_row(layer, expert)`` is what a slot
    holding that expert must contain (serving tensor name -> row), from a reference
    independent of the disk loader.
    """

    @property
    def layers(self) -> int: ...

    @property
    def experts(self) -> int: ...

    @property
    def naming(self) -> NamingScheme: ...

    @property
    def moe_layer_ids(self) -> Sequence[int]: ...

    @property
    def expert_bytes(self) -> int: ...

    def layout(self) -> ExpertLayout: ...

    def expected_row(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...
