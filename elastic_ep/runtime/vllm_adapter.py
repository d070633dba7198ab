"""Embedding the rank agent in a vLLM-style serving engine.

What such an engine holds (vLLM's ``MixtureOfExperts`` / ``EplbState`` names):

- ``expert_weights[layer]``: per MoE layer, a list of tensors each ``[slots_per_rank,
  ...]``, in parameter order: ``w13_weight`` ``[S, 2 * I, H]`` (gate then up),
  ``w2_weight`` ``[S, H, I]``, and for block-scaled FP8 their ``weight_scale_inv``.
  vLLM's ``FusedMoE.get_expert_weights()`` hands them out flattened, ``[S, -1]``.
- ``physical_to_logical_map``: int64 ``[num_moe_layers, num_physical]``, global across
  ranks (slot ``s`` lives on rank ``s // S``).
- optionally ``logical_to_physical_map`` ``[num_moe_layers, num_logical, max_replicas]``
  (``-1`` padded) and ``logical_replica_count`` ``[num_moe_layers, num_logical]``.

:class:`VllmExpertAdapter` turns these into what the agent needs (an
:class:`~loaders.layout.ExpertLayout`, per-layer views the
:class:`~elastic_ep.runtime.executor.PlanExecutor` writes through, the ``load_initial`` /
``on_commit`` / ``load_window`` callbacks) and rewrites the maps in place whenever the
weights change, so weights and maps never disagree while the engine runs a step.

The engine's side of the contract (the agent's ``busy`` lock):

1. Run every forward step inside :meth:`VllmExpertAdapter.step`: it holds the agent's
   ``busy`` lock, which the agent takes for the bootstrap load and, during a plan, only
   to switch one layer's routing rows or write one layer's staged slots
   (:mod:`elastic_ep.runtime.serving`): reads and barriers run beside serving. A step
   that gets ``False`` (weights unknown: nothing loaded yet, or a plan failed half-way)
   must not run.
2. Layer by layer during a plan, the routing rows (``logical_to_physical_map``,
   ``logical_replica_count``) first keep only the slots that do not change, then, once
   every rank wrote the layer, name the new slots (still in the old numbering). At the
   end of the writes the adapter rewrites every map to the new placement inside the
   lock (before the controller's commit: the weights already hold it).
   While the number of physical slots stays the same the maps keep their storage
   (CUDA graphs stay valid); when it changes (ranks joined or left) they are resized
   in place and ``on_maps_resized`` is called to rebind views of them and recapture
   graphs.
3. Take this process's EP rank from :attr:`VllmExpertAdapter.rank` at each step: it
   changes with the maps (ranks behind a dead one move down). The controller's member
   order is the EP order, and the engine's EP communicator must follow it;
   ``on_placement(placement, rank)`` is called at each commit this rank is part of.
4. Report routed tokens with :meth:`record_physical_load` (vLLM's per-step
   ``expert_load_pass``, ``[num_moe_layers, num_physical]``); the agent publishes them
   and the controller rebalances on them.

Example (DeepSeek-V3-like, 2 MoE layers, 4 slots per rank, 2 ranks)::

    adapter = VllmExpertAdapter(model.expert_weights, eplb.physical_to_logical_map,
                                logical_to_physical_map=eplb.logical_to_physical_map,
                                logical_replica_count=eplb.logical_replica_count)
    agent = adapter.agent(agent_settings_from_env())  # ELASTIC_EP_MODEL=/models/DeepSeek-V3
    threading.Thread(target=agent.run, daemon=True).start()
    while serving:
        with adapter.step() as ok:
            if ok:
                engine.step()
"""

from __future__ import annotations

import contextlib

import enum
import functools
import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from loaders.checkpoint.naming import NamingScheme
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.layout import ExpertLayout, moe_layout

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan
from elastic_ep.errors import ConfigError, PlacementError
from elastic_ep.runtime.executor import ExecutionReport, PlanExecutor
from elastic_ep.runtime.serving import ServingMap
from elastic_ep.runtime.slots import disk_reference, fill_rank_slots, mismatched_slots

if TYPE_CHECKING:  # the agent brings etcd: imported when an agent is built, not with the adapter
    from elastic_ep.runtime.agent import RankAgent
    from elastic_ep.runtime.wiring import AgentSettings

log = logging.getLogger(__name__)


def infer_layout(
    layer_weights: Sequence[torch.Tensor],
    hidden: int | None = None,
    intermediate: int | None = None,
    scale_block: int = 128,
) -> ExpertLayout:
    """The :class:`ExpertLayout` of vLLM's fused SwiGLU experts, from one layer's tensors.

    ``layer_weights``: ``[w13_weight, w2_weight]`` or, for block-scaled FP8,
    ``[w13_weight, w2_weight, w13_weight_scale_inv, w2_weight_scale_inv]``, each
    ``[S, ...]``. ``hidden`` / ``intermediate`` are read from 3-D tensors (``w2_weight``
    is ``[S, H, I]``) and must be given for flattened ``[S, -1]`` ones. Example:
    ``infer_layout([torch.empty(4, 64, 64, dtype=torch.bfloat16), torch.empty(4, 64, 32,
    dtype=torch.bfloat16)])`` is ``moe_layout(hidden=64, intermediate=32)``. Raises
    :class:`ConfigError` naming the tensor whose size or dtype does not fit.
    """
    if len(layer_weights) not in (2, 4):
        raise ConfigError(
            f"{len(layer_weights)} expert tensors per layer; infer_layout knows vLLM's fused "
            "[w13_weight, w2_weight] (+ their weight_scale_inv for FP8): pass layout= for others"
        )
    w13, w2 = layer_weights[0], layer_weights[1]
    if w2.dim() == 3 and (hidden is None or intermediate is None):
        hidden, intermediate = int(w2.shape[1]), int(w2.shape[2])
    if hidden is None or intermediate is None:
        raise ConfigError(
            f"w2_weight is {tuple(w2.shape)}: flattened tensors need hidden= and intermediate= "
            "(the model config's hidden_size and moe_intermediate_size)"
        )
    scales = len(layer_weights) == 4
    layout = moe_layout(hidden, intermediate, w13.dtype, fused=True, scale_block=scale_block if scales else None)
    check_fits(layout, layer_weights, "layer 0")
    return layout


def check_fits(layout: ExpertLayout, layer_weights: Sequence[torch.Tensor], where: str) -> int:
    """Check that an engine layer's tensors hold ``layout``'s rows in order (same dtype,
    same elements per slot, contiguous); returns ``slots_per_rank``."""
    if len(layer_weights) != len(layout.tensors):
        raise ConfigError(f"{where}: {len(layer_weights)} expert tensors, the layout has {list(layout.names)}")
    slots = int(layer_weights[0].shape[0]) if layer_weights[0].dim() else 0
    for w, t in zip(layer_weights, layout.tensors):
        per_slot = int(np.prod(t.row_shape))
        if w.dim() == 0 or w.dtype != t.dtype or w.numel() != slots * per_slot or int(w.shape[0]) != slots:
            raise ConfigError(
                f"{where}: tensor for {t.name!r} is {w.dtype} {tuple(w.shape)}; expected {t.dtype} "
                f"[{slots}, {', '.join(map(str, t.row_shape))}] (or flattened [{slots}, {per_slot}])"
            )
        if not w.is_contiguous():
            raise ConfigError(f"{where}: tensor for {t.name!r} must be contiguous")
    return slots


class AdapterState(enum.Enum):
    """What the engine's expert weights hold."""

    EMPTY = "empty"  # nothing this rank serves: not loaded yet, or drained out
    SERVING = "serving"  # a placement's slots, and the maps say that placement
    UNKNOWN = "unknown"  # a plan failed half-way: some slots may hold anything


class _MapUpdatingExecutor(PlanExecutor):
    """A :class:`PlanExecutor` that tells the adapter when the writes are done, while
    the agent still holds its ``busy`` lock."""

    def __init__(self, adapter: "VllmExpertAdapter", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def execute(
        self, plan: TransferPlan, old_rank: int | None = None, new_rank: int | None = None, *, store: Any = None,
        gone: Any = None, hooks: Any = None,
    ) -> ExecutionReport:
        try:
            report = super().execute(plan, old_rank, new_rank, store=store, gone=gone, hooks=hooks)
        except BaseException:
            self.adapter._weights_lost(f"plan epoch {plan.epoch} failed part-way")
            raise
        agent = self.adapter.rank_agent
        with agent.busy if agent is not None else contextlib.nullcontext():  # not mid-step of the engine
            self.adapter._weights_hold(plan.new, report.new_rank)
        return report


class VllmExpertAdapter:
    """Maps a vLLM-style engine's expert tensors and maps onto the rank agent.

    Args:
        expert_weights: per MoE layer, the engine's tensors ``[slots_per_rank, ...]``
            (3-D or flattened); the adapter writes into them, never copies them.
        physical_to_logical_map: int ``[num_moe_layers, num_physical]``, rewritten in place.
        logical_to_physical_map: optional ``[num_moe_layers, num_logical, width]``,
            rewritten in place: each expert's slots ascending, ``-1`` padded (replicas
            beyond ``width`` are left out, and counted out of ``logical_replica_count``).
        logical_replica_count: optional ``[num_moe_layers, num_logical]``.
        layout: one expert's layout; default :func:`infer_layout` (with ``hidden``,
            ``intermediate``, ``scale_block`` for flattened tensors).
        ep_rank: the engine's EP rank at start-up, whose slots of the map its weights
            already hold: the bootstrap then reads only the slots that differ. None:
            nothing is trusted and the bootstrap reads every slot.
        on_placement: ``(placement, rank)`` at each commit this rank is part of.
        on_maps_resized: ``(maps)`` after the maps changed size (views of them are stale).
    """

    def __init__(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        physical_to_logical_map: torch.Tensor,
        *,
        logical_to_physical_map: torch.Tensor | None = None,
        logical_replica_count: torch.Tensor | None = None,
        layout: ExpertLayout | None = None,
        hidden: int | None = None,
        intermediate: int | None = None,
        scale_block: int = 128,
        ep_rank: int | None = None,
        on_placement: Callable[[ExpertPlacement, int], None] | None = None,
        on_maps_resized: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        if not expert_weights:
            raise ConfigError("no MoE layers in expert_weights")
        self.layout = layout or infer_layout(expert_weights[0], hidden, intermediate, scale_block)
        slots = {check_fits(self.layout, w, f"MoE layer {i}") for i, w in enumerate(expert_weights)}
        if len(slots) != 1:
            raise ConfigError(f"MoE layers have different slots_per_rank: {sorted(slots)}")
        self.slots_per_rank = slots.pop()
        # Views shaped [S, *row_shape] on the engine's storage: the executor writes through them.
        self.weights = [
            [w.view(self.slots_per_rank, *t.row_shape) for w, t in zip(layer, self.layout.tensors)]
            for layer in expert_weights
        ]
        self.maps = {"physical_to_logical_map": physical_to_logical_map}
        if logical_to_physical_map is not None:
            self.maps["logical_to_physical_map"] = logical_to_physical_map
        if logical_replica_count is not None:
            self.maps["logical_replica_count"] = logical_replica_count
        p2l = physical_to_logical_map
        if p2l.dim() != 2 or p2l.shape[0] != len(self.weights):
            raise ConfigError(
                f"physical_to_logical_map is {tuple(p2l.shape)}, expected [{len(self.weights)} MoE layers, num_physical]"
            )
        self.on_placement, self.on_maps_resized = on_placement, on_maps_resized
        self.state = AdapterState.EMPTY
        self.placement: ExpertPlacement | None = None
        self.rank: int | None = None
        # [num_layers, slots_per_rank] logical ids the weights hold; -1: unknown.
        self.held = np.full((len(self.weights), self.slots_per_rank), -1, dtype=np.int64)
        if ep_rank is not None:
            s = ep_rank * self.slots_per_rank
            if not 0 <= s <= p2l.shape[1] - self.slots_per_rank:
                raise ConfigError(f"ep_rank {ep_rank} has no slots in a map of {p2l.shape[1]} physical experts")
            self.held[:] = p2l[:, s : s + self.slots_per_rank].cpu().numpy()
        self.rank_agent: RankAgent | None = None
        self._load_lock = threading.Lock()
        self._load: np.ndarray | None = None  # [num_layers, num_logical] tokens since the last window
        self.unavailable: list[list[int]] = []
        """Per layer, logical experts with no live replica while routing around dead ranks."""

    # -- the maps --------------------------------------------------------------------
    def _write_map(self, name: str, value: np.ndarray) -> bool:
        """Copy ``value`` into the engine's tensor; True if it had to be resized."""
        t = self.maps[name]
        src = torch.tensor(np.asarray(value), dtype=t.dtype, device=t.device)  # a copy: placements are read-only
        resized = tuple(t.shape) != tuple(src.shape)
        if resized:
            t.resize_(src.shape)  # same tensor object; its storage may move
        t.copy_(src)
        return resized

    def write_maps(self, placement: ExpertPlacement) -> None:
        """Rewrite the engine's maps to say ``placement`` (same storage while the number
        of physical slots is unchanged)."""
        if placement.num_layers != len(self.weights) or placement.slots_per_rank != self.slots_per_rank:
            raise PlacementError(
                f"placement of {placement.num_layers} layers x {placement.slots_per_rank} slots per rank "
                f"does not fit this engine ({len(self.weights)} x {self.slots_per_rank})"
            )
        resized = self._write_map("physical_to_logical_map", placement.phy2log)
        if self._write_routing(placement):
            resized = True
        if resized:
            log.warning("expert maps resized to %d physical slots; views of them must be rebound",
                        placement.num_physical)
            if self.on_maps_resized is not None:
                self.on_maps_resized(self.maps)

    def _write_routing(self, placement: ExpertPlacement) -> bool:
        """Rewrite ``logical_to_physical_map`` and ``logical_replica_count`` (the maps a
        router reads) from ``placement``; True if one had to be resized."""
        resized = False
        l2p = self.maps.get("logical_to_physical_map")
        width = l2p.shape[-1] if l2p is not None and l2p.dim() == 3 else None
        if l2p is not None:
            full = placement.log2phy
            out = np.full((*full.shape[:2], width), -1, dtype=np.int64)
            n = min(width, full.shape[2])
            out[:, :, :n] = full[:, :, :n]
            resized |= self._write_map("logical_to_physical_map", out)
        if "logical_replica_count" in self.maps:
            cnt = placement.logcnt if width is None else np.minimum(placement.logcnt, width)
            resized |= self._write_map("logical_replica_count", cnt)
        return resized

    def on_routing(self, placement: ExpertPlacement, rank: int, dead: list[int]) -> None:
        """Coverage before balance: ranks ``dead`` of the committed ``placement`` are
        gone; the router's maps stop naming their slots (in place: the shapes do not
        change) until the next commit restores balance. ``unavailable`` lists, per
        layer, the experts left with no replica (served again once restored)."""
        if self.state is not AdapterState.SERVING or self.placement != placement:
            return
        masked = placement.masked(dead)
        agent = self.rank_agent
        with agent.busy if agent is not None else contextlib.nullcontext():  # not mid-step of the engine
            self._write_routing(masked)
        self.unavailable = masked.unavailable()
        log.warning("routing around ranks %s; experts with no live replica per layer: %s", dead,
                    {i: u for i, u in enumerate(self.unavailable) if u})

    def on_serving(self, m: ServingMap, layers: list[int]) -> None:
        """The agent changed rows ``layers`` of its serving map (``busy`` held): rewrite
        the router's rows of them in place; maps of another width (the numbering changes
        at the end of a plan, where :meth:`write_maps` rewrites them all) are left."""
        if self.state is not AdapterState.SERVING or self.placement is None:
            return
        if m.phy2log.shape != self.placement.phy2log.shape:
            return
        rows = ExpertPlacement(m.phy2log[layers], m.slots_per_rank, m.num_logical)
        l2p = self.maps.get("logical_to_physical_map")
        if l2p is not None and l2p.dim() == 3:
            width = l2p.shape[-1]
            full = rows.log2phy
            out = np.full((len(layers), full.shape[1], width), -1, dtype=np.int64)
            n = min(width, full.shape[2])
            out[:, :, :n] = full[:, :, :n]
            l2p[layers] = torch.tensor(out, dtype=l2p.dtype, device=l2p.device)
        cnt = self.maps.get("logical_replica_count")
        if cnt is not None:
            c = rows.logcnt if l2p is None or l2p.dim() != 3 else np.minimum(rows.logcnt, l2p.shape[-1])
            cnt[layers] = torch.tensor(c, dtype=cnt.dtype, device=cnt.device)
        self.unavailable = m.unavailable()

    def _weights_hold(self, placement: ExpertPlacement, rank: int | None) -> None:
        """The writes of a plan (or the bootstrap load) are done: maps follow at once."""
        if rank is None:  # drained out: this process serves nothing any more
            self.state, self.placement, self.rank = AdapterState.EMPTY, None, None
            self.held[:] = -1
            return
        self.held[:] = placement.rank_slots(rank)
        self.write_maps(placement)
        self.state, self.placement, self.rank = AdapterState.SERVING, placement, rank

    def _weights_lost(self, why: str) -> None:
        """A failed write, or the agent fenced this rank: nothing is served until a plan
        refills every slot (``held`` forgets what the slots hold)."""
        log.error("%s: expert weights unknown until this rank is refilled", why)
        self.state = AdapterState.UNKNOWN
        self.held[:] = -1

    # -- agent callbacks ---------------------------------------------------------------
    def load_initial(self, disk: SafetensorsExpertSource, placement: ExpertPlacement, rank: int) -> int:
        """Bootstrap: fill ``rank``'s slots of ``placement`` from ``disk``, reading only
        slots that do not hold their expert yet; returns bytes read."""
        try:
            total = fill_rank_slots(disk, placement, rank, self.weights, held=self.held)
        except BaseException:
            self._weights_lost("bootstrap load failed part-way")
            raise
        self._weights_hold(placement, rank)
        return total

    def on_commit(self, placement: ExpertPlacement, rank: int) -> None:
        """A placement committed with this rank in it: the weights and maps were switched
        when the writes ended; confirm and tell the engine its rank."""
        if self.state is not AdapterState.SERVING or self.placement != placement or self.rank != rank:
            log.error("commit of a placement (rank %s) these weights do not hold (state %s, rank %s)",
                      rank, self.state.value, self.rank)
            return
        if self.on_placement is not None:
            self.on_placement(placement, rank)

    def mismatched_slots(self, disk: SafetensorsExpertSource, placement: ExpertPlacement, rank: int) -> int:
        """Slots of ``rank`` whose bytes differ from the checkpoint's (reads every one of
        them from disk: for tests and debugging, not for production acks)."""
        return len(mismatched_slots(self.layout, placement, rank, self.weights, disk_reference(disk)))

    # -- load statistics ---------------------------------------------------------------
    def record_physical_load(self, counts: torch.Tensor | np.ndarray) -> None:
        """Add one step's tokens per physical slot, ``[num_moe_layers, num_physical]``
        routed with the current maps (vLLM's ``expert_load_pass``)."""
        placement = self.placement
        if placement is None:
            return
        c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
        if c.shape != placement.phy2log.shape:
            raise ConfigError(f"load counts {c.shape} do not match the placement's {placement.phy2log.shape}")
        rows = np.broadcast_to(np.arange(placement.num_layers)[:, None], c.shape)
        with self._load_lock:
            if self._load is None or self._load.shape != (placement.num_layers, placement.num_logical):
                self._load = np.zeros((placement.num_layers, placement.num_logical))
            np.add.at(self._load, (rows, placement.phy2log), c.astype(np.float64))

    def load_window(self) -> np.ndarray:
        """``[num_moe_layers, num_logical]`` tokens recorded since the last call."""
        placement = self.placement
        with self._load_lock:
            out, self._load = self._load, None
        if out is None:
            out = np.zeros((len(self.weights), placement.num_logical if placement is not None else 1))
        return out

    # -- wiring ----------------------------------------------------------------------
    def executor(self, transport: Any, disk: SafetensorsExpertSource | None, **options: Any) -> PlanExecutor:
        """A :class:`PlanExecutor` on the engine's tensors that switches the maps when a
        plan's writes are done (``options``: the executor's timeouts)."""
        return _MapUpdatingExecutor(self, self.weights, self.layout, transport, disk, None, **options)

    def agent(
        self,
        settings: AgentSettings,
        scheme: NamingScheme | None = None,
        moe_layer_ids: Sequence[int] | None = None,
        verify: bool = False,
        **executor_options: Any,
    ) -> RankAgent:
        """A :class:`~elastic_ep.runtime.agent.RankAgent` for this engine
        (:func:`~elastic_ep.runtime.wiring.build_agent`): its transport, the checkpoint in
        ``settings.checkpoint`` as disk fallback, and the callbacks above. ``scheme``
        None: the checkpoint is a Hugging Face model directory, checked against this
        engine's layout (:func:`~elastic_ep.runtime.wiring.open_checkpoint`); else a
        naming scheme with checkpoint layer numbers ``moe_layer_ids``. ``verify``: report
        in every ack how many slots differ from the checkpoint (reads them all; tests
        only). ``executor_options``: the executor's timeouts. Before each registration
        the agent checks the checkpoint's headers for every expert of every layer (as
        many experts as ``logical_to_physical_map`` has, else as the checkpoint's first
        MoE layer); when the agent fences the rank, the weights count as unknown and
        :meth:`step` yields False until a plan refills them."""
        from elastic_ep.runtime.wiring import AgentHooks, RankExperts, build_agent, open_checkpoint

        disk = open_checkpoint(settings.checkpoint, self.layout, scheme, moe_layer_ids)
        hooks = AgentHooks(
            load_initial=lambda placement, rank: self.load_initial(disk, placement, rank),
            on_commit=self.on_commit,
            reference=disk_reference(disk) if verify else None,
            load_window=self.load_window,
            on_fence=lambda why: self._weights_lost(f"rank fenced ({why})"),
            on_routing=self.on_routing,
            on_serving=self.on_serving,
        )
        experts = RankExperts(self.weights, self.layout, disk, self._num_logical())
        self.rank_agent = build_agent(settings, experts, hooks, functools.partial(_MapUpdatingExecutor, self),
                                      **executor_options)
        return self.rank_agent

    def _num_logical(self) -> int | None:
        """Logical experts per layer, from the engine's logical maps when it has them."""
        for name in ("logical_to_physical_map", "logical_replica_count"):
            m = self.maps.get(name)
            if m is not None and m.dim() >= 2:
                return int(m.shape[1])
        return None

    @contextmanager
    def step(self, timeout_s: float = -1) -> Iterator[bool]:
        """Hold the agent's ``busy`` lock for one forward step; yields True when the
        weights and maps hold a placement this rank may serve (run the step), False
        otherwise (skip it: nothing loaded, a failed plan, the rank fenced or its lease
        possibly expired, or the lock not had within ``timeout_s``; -1 waits)."""
        agent = self.rank_agent
        busy = agent.busy if agent is not None else None
        if busy is not None and not busy.acquire(timeout=timeout_s):
            yield False
            return
        try:
            yield self.state is AdapterState.SERVING and (agent is None or agent.holding is not None)
        finally:
            if busy is not None:
                busy.release()
