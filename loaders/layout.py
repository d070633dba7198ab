"""The layout of one expert in a serving process, shared by every way of filling a slot.

A serving process keeps, per MoE layer, tensors shaped ``[slots_per_rank, ...]`` (vLLM's
``MixtureOfExperts.expert_weights``); a slot is row ``i`` of every tensor of the layer.
:class:`ExpertLayout` says, for each of those tensors, its row shape and dtype and which
checkpoint tensors fill a row:

- fused (vLLM's ``w13_weight``): the row is ``concat(gate, up)`` on dim 0 of the
  ``[intermediate, hidden]`` projections, so ``[2 * intermediate, hidden]``;
- unfused: one checkpoint tensor per serving tensor.

Rows are C-contiguous, so concatenation on dim 0 is concatenation of bytes: a slot
*packs* into ``expert_bytes`` bytes, tensor after tensor in layout order, each tensor's
parts one after the other. The disk loader reads checkpoint tensors straight to their
offsets in that packed form, and peer transports send and receive the same bytes, so
packing and unpacking never disagree on order (mixed dtypes included: FP8 weights
beside float32 ``weight_scale_inv`` block scales).

Example (DeepSeek-V3, bf16, fused): ``w13_weight`` row ``[4096, 7168]`` from
``gate.weight`` and ``up.weight`` (each ``[2048, 7168]``), ``w2_weight`` row
``[7168, 2048]`` from ``down.weight``; ``expert_bytes == 88_080_384``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence, Union

import torch

from elastic_ep.errors import ConfigError

LayerWeights = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
"""One MoE layer's serving tensors: by name, or a list in layout order (vLLM's form)."""


@dataclass(frozen=True)
class CheckpointPart:
    """One checkpoint tensor of an expert: ``role`` (gate, up, down), ``param``
    (``weight`` or ``weight_scale_inv``) and its shape, e.g.
    ``CheckpointPart("gate", "weight", (2048, 7168))``."""

    role: str
    param: str
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        """``"gate.weight"``: the part's name within one expert."""
        return f"{self.role}.{self.param}"


@dataclass(frozen=True)
class SlotTensor:
    """One serving tensor of a MoE layer, shaped ``[slots_per_rank, *row_shape]``.

    Attributes:
        name: e.g. ``"w13_weight"``.
        dtype: of the serving tensor and of every part (nothing is converted).
        parts: checkpoint tensors concatenated on dim 0 to make one row, e.g.
            ``(CheckpointPart("gate", "weight", (I, H)), CheckpointPart("up", "weight", (I, H)))``
            for ``w13_weight`` with row shape ``(2 * I, H)``.
    """

    name: str
    dtype: torch.dtype
    parts: tuple[CheckpointPart, ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ConfigError(f"serving tensor {self.name!r} has no checkpoint parts")
        tails = {p.shape[1:] for p in self.parts}
        if len(tails) != 1 or any(len(p.shape) == 0 for p in self.parts):
            raise ConfigError(
                f"serving tensor {self.name!r}: parts {[(p.key, p.shape) for p in self.parts]} "
                "cannot be concatenated on dim 0 (they need at least one dim and the same "
                "trailing dims)"
            )

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts),) + self.parts[0].shape[1:]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.itemsize

    def part_bytes(self, part: CheckpointPart) -> int:
        return math.prod(part.shape) * self.itemsize


@dataclass(frozen=True)
class PartSpan:
    """Where a checkpoint part lands in a packed slot: bytes
    ``[offset, offset + nbytes)`` of the ``expert_bytes`` of one expert."""

    tensor: str
    part: CheckpointPart
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """Every serving tensor of one expert, in packing order.

    Example: ``moe_layout(hidden=64, intermediate=32)`` holds ``w13_weight`` (row
    ``(64, 64)`` bf16 from gate and up) and ``w2_weight`` (row ``(64, 32)`` from down);
    ``expert_bytes == 12_288``.
    """

    tensors: tuple[SlotTensor, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        keys = [p.key for t in self.tensors for p in t.parts]
        if not names or len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ConfigError(
                f"expert layout needs at least one tensor, unique tensor names and each "
                f"checkpoint part once; got tensors {names} with parts {keys}"
            )

    # -- sizes and offsets -------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor's row in a packed slot."""
        out, at = [], 0
        for t in self.tensors:
            out.append(at)
            at += t.row_bytes
        return tuple(out)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert, every tensor of it (scales included)."""
        return sum(t.row_bytes for t in self.tensors)

    @cached_property
    def spans(self) -> tuple[PartSpan, ...]:
        """Every checkpoint part with its place in a packed slot, in packing order."""
        out = []
        for t, at in zip(self.tensors, self.offsets):
            for p in t.parts:
                n = t.part_bytes(p)
                out.append(PartSpan(t.name, p, t.dtype, at, n))
                at += n
        return tuple(out)

    # -- serving tensors ---------------------------------------------------------------
    def check_weights(self, weights: LayerWeights, where: str = "layer") -> tuple[dict[str, torch.Tensor], int]:
        """Name the serving tensors of one layer and check them against the layout.

        Returns ``(name -> tensor, slots_per_rank)``; raises :class:`ConfigError`
        naming ``where``, the tensor, expected vs found.
        """
        if isinstance(weights, Mapping):
            named = dict(weights)
        else:
            named = dict(zip(self.names, weights))
            if len(weights) != len(self.tensors):
                raise ConfigError(
                    f"{where}: {len(weights)} tensors given, the layout has {len(self.tensors)} "
                    f"({list(self.names)}); pass them in that order or by name"
                )
        slots = None
        for t in self.tensors:
            w = named.get(t.name)
            if w is None:
                raise ConfigError(f"{where}: no serving tensor {t.name!r}; have {sorted(named)}")
            if tuple(w.shape[1:]) != t.row_shape or w.dtype != t.dtype or w.dim() == 0:
                raise ConfigError(
                    f"{where}: serving tensor {t.name!r} is {w.dtype} {tuple(w.shape)}, the layout "
                    f"expects {t.dtype} [slots_per_rank, {', '.join(map(str, t.row_shape))}]"
                )
            if not w.is_contiguous():
                raise ConfigError(f"{where}: serving tensor {t.name!r} must be contiguous")
            if slots is not None and w.shape[0] != slots:
                raise ConfigError(
                    f"{where}: serving tensor {t.name!r} has {w.shape[0]} slots, others {slots}"
                )
            slots = int(w.shape[0])
        return {t.name: named[t.name] for t in self.tensors}, int(slots)  # type: ignore[arg-type]

    def check_mirror(self, buffer: torch.Tensor) -> int:
        """The rows of a host-memory mirror of packed experts: ``buffer`` must be flat,
        contiguous ``uint8`` on the CPU, whole ``expert_bytes`` rows; else
        :class:`ConfigError` saying how to allocate one."""
        eb = self.expert_bytes
        if (buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous()
                or buffer.device.type != "cpu" or buffer.numel() % eb):
            raise ConfigError(
                f"a mirror must be a flat contiguous CPU uint8 tensor of whole {eb}-byte rows, got "
                f"{buffer.dtype} {tuple(buffer.shape)} on {buffer.device}; allocate "
                f"torch.empty(rows * {eb}, dtype=torch.uint8, pin_memory=True)"
            )
        return buffer.numel() // eb

    @staticmethod
    def row_bytes_view(tensor: torch.Tensor, slot: int) -> torch.Tensor:
        """Row ``slot`` of a contiguous ``[slots, ...]`` tensor as flat uint8 (a view:
        writing it writes the slot). Works for any dtype and for 1-D tensors."""
        return tensor[slot : slot + 1].view(torch.uint8).reshape(-1)

    def pack_slot(self, weights: LayerWeights, slot: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy one slot into ``out`` (uint8 ``[expert_bytes]``, allocated on the
        weights' device when ``None``) and return it."""
        named, _ = self.check_weights(weights)
        if out is None:
            out = torch.empty(self.expert_bytes, dtype=torch.uint8, device=named[self.names[0]].device)
        for t, at in zip(self.tensors, self.offsets):
            out[at : at + t.row_bytes].copy_(self.row_bytes_view(named[t.name], slot))
        return out

    def unpack_slot(
        self, buf: torch.Tensor, weights: LayerWeights, slot: int, non_blocking: bool = False
    ) -> None:
        """Write a packed slot (uint8 ``[expert_bytes]``) into row ``slot`` of every tensor."""
        named, _ = self.check_weights(weights)
        for t, at in zip(self.tensors, self.offsets):
            self.row_bytes_view(named[t.name], slot).copy_(buf[at : at + t.row_bytes], non_blocking=non_blocking)

    def assemble_row(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Serving rows of one expert from its checkpoint tensors (keyed by
        :attr:`CheckpointPart.key`), concatenated on dim 0: the reference for what a
        loaded slot must hold."""
        return {t.name: torch.cat([parts[p.key] for p in t.parts], dim=0) for t in self.tensors}

    def allocate(
        self, slots_per_rank: int, device: torch.device | str = "cpu", fill_byte: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Empty serving tensors of one layer, ``[slots_per_rank, *row_shape]`` each
        (for tests and demos); ``fill_byte`` sets every byte, to see untouched slots."""
        out = {}
        for t in self.tensors:
            w = torch.empty((slots_per_rank, *t.row_shape), dtype=t.dtype, device=device)
            if fill_byte is not None:
                w.view(torch.uint8).fill_(fill_byte)
            out[t.name] = w
        return out


def moe_layout(
    hidden: int,
    intermediate: int,
    dtype: torch.dtype = torch.bfloat16,
    fused: bool = True,
    scale_block: int | None = None,
) -> ExpertLayout:
    """The layout of a SwiGLU expert: gate and up ``[intermediate, hidden]``, down
    ``[hidden, intermediate]``.

    ``fused``: vLLM's ``w13_weight`` (gate then up) and ``w2_weight``; else one serving
    tensor per projection: ``w1_weight`` (gate), ``w3_weight`` (up), ``w2_weight`` (down).
    ``scale_block``: block-scaled FP8 as DeepSeek-V3 stores it: each projection also has
    a float32 ``weight_scale_inv`` of ``[ceil(rows / b), ceil(cols / b)]``, served as
    ``w13_weight_scale_inv`` (fused: gate's then up's block rows) / ``w2_weight_scale_inv``.
    """
    if min(hidden, intermediate) <= 0 or (scale_block is not None and scale_block <= 0):
        raise ConfigError(
            f"hidden={hidden}, intermediate={intermediate}, scale_block={scale_block}: sizes must be positive"
        )
    shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    groups = [("w13", ("gate", "up")), ("w2", ("down",))] if fused else [
        ("w1", ("gate",)), ("w3", ("up",)), ("w2", ("down",))
    ]
    tensors = [
        SlotTensor(f"{name}_weight", dtype, tuple(CheckpointPart(r, "weight", shapes[r]) for r in roles))
        for name, roles in groups
    ]
    if scale_block is not None:
        def blocks(shape: tuple[int, int]) -> tuple[int, int]:
            return (-(-shape[0] // scale_block), -(-shape[1] // scale_block))

        tensors += [
            SlotTensor(
                f"{name}_weight_scale_inv",
                torch.float32,
                tuple(CheckpointPart(r, "weight_scale_inv", blocks(shapes[r])) for r in roles),
            )
            for name, roles in groups
        ]
    return ExpertLayout(tuple(tensors))
