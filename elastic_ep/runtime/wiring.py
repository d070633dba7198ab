"""Wiring a rank agent: settings -> transport -> executor -> :class:`RankAgent`.

One place builds an agent from a rank's expert weights and its settings, for every
process that holds experts: the vLLM-style adapter (an engine's tensors) and the
stand-alone synthetic rank (plain tensors). What differs between them is passed in:
the executor class and the callbacks in :class:`AgentHooks`.

Example (a stand-alone rank of a synthetic checkpoint, 4 slots per rank)::

    layout = spec.layout()
    weights = [layout.allocate(4) for _ in range(spec.layers)]
    disk = open_checkpoint("/tmp/ckpt", layout, spec.naming, spec.moe_layer_ids)
    agent = build_agent(settings, RankExperts(weights, layout, disk), AgentHooks(),
                        source_timeout_s=5.0)
    agent.run(stop)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from loaders.checkpoint.naming import NamingScheme
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.layout import ExpertLayout, LayerWeights
from loaders.transport import get_transport

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.errors import ConfigError
from elastic_ep.runtime.agent import AgentConfig, RankAgent
from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.runtime.mirror_keeper import MirrorKeeper
from elastic_ep.runtime.serving import ServingMap
from elastic_ep.runtime.slots import ExpertReference, check_checkpoint, fill_rank_slots, mismatched_slots


@dataclass(frozen=True)
class AgentSettings:
    """What a serving process embedding a :class:`RankAgent` takes from its environment
    (``elastic_ep.tools.entrypoint.agent_settings_from_env`` reads ``ELASTIC_EP_*``).

    Attributes:
        config: the agent's :class:`AgentConfig` (etcd, id, node, and the transport's
            name as its endpoint).
        transport: ``torch``, ``nixl`` or ``mooncake``.
        transport_options: keyword options of the transport, e.g. ``{"interface": "eth0"}``
            (gloo otherwise listens on loopback only).
        checkpoint: the model directory (disk fallback), or None.
        mirror_bytes: host memory for the mirror (:mod:`elastic_ep.runtime.mirror_keeper`);
            less than one expert: no mirror.
        mirror_fill_bytes_s: the most bytes a second the mirror's background fill reads.

    Example: ``AgentSettings(AgentConfig(EtcdConfig("etcd-client:2379"), "moe-serving-3"),
    "nixl", checkpoint="/models/DeepSeek-V3")``.
    """

    config: AgentConfig
    transport: str = "torch"
    transport_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    mirror_bytes: int = 0
    mirror_fill_bytes_s: float = float(1 << 30)


@dataclass(frozen=True)
class RankExperts:
    """A rank's expert weights, their layout, and the checkpoint that refills them.

    ``weights[layer]``: the serving tensors ``[slots_per_rank, ...]`` of MoE layer
    ``layer`` (by name or in ``layout`` order), written in place; ``disk``: the
    checkpoint, read for missing experts and as every transfer's last resort;
    ``num_experts``: logical experts per layer, all checked in ``disk`` before each
    registration (None: as many as the checkpoint's first MoE layer holds).
    Example: ``RankExperts([layout.allocate(4)] * 2, layout, disk, 8)`` for 2 layers of 8 experts.
    """

    weights: Sequence[LayerWeights]
    layout: ExpertLayout
    disk: SafetensorsExpertSource
    num_experts: int | None = None


@dataclass(frozen=True)
class AgentHooks:
    """The serving side's callbacks (meanings as in :class:`RankAgent`).

    Attributes:
        load_initial: ``(placement, rank) -> bytes read``; None: fill every slot of the
            rank from the checkpoint (:func:`fill_rank_slots`).
        on_commit: ``(placement, rank)`` at each commit this rank is part of.
        reference: the bytes each slot must hold; given, every ack reports how many
            slots differ from it (reads every slot: tests and debugging).
        load_window: ``() -> [num_layers, num_logical]`` tokens routed since the last call.
        on_fence: ``(why)`` when the agent fences the rank (lease lost, plan failed, no
            longer a member): the weights are not to be served until a plan refills them.
        on_routing: ``(placement, rank, dead ranks)`` when the controller confirmed
            members of the committed placement dead: route around their slots
            (:meth:`~elastic_ep.core.placement.ExpertPlacement.masked`) until the next commit.
        on_serving: ``(serving map, layers)`` when rows of the agent's
            :class:`~elastic_ep.runtime.serving.ServingMap` changed (``busy`` held): the
            router's rows of those layers follow.
    """

    load_initial: Callable[[ExpertPlacement, int], int | None] | None = None
    on_commit: Callable[[ExpertPlacement, int], None] | None = None
    reference: ExpertReference | None = None
    load_window: Callable[[], Any] | None = None
    on_fence: Callable[[str], None] | None = None
    on_routing: Callable[[ExpertPlacement, int, list[int]], None] | None = None
    on_serving: Callable[[ServingMap, list[int]], None] | None = None


def open_checkpoint(
    checkpoint: str | None,
    layout: ExpertLayout,
    naming: NamingScheme | None = None,
    moe_layer_ids: Sequence[int] | None = None,
) -> SafetensorsExpertSource:
    """The disk source of ``checkpoint`` for slots of ``layout``.

    ``naming`` None: ``checkpoint`` is a Hugging Face model directory, read like
    ``elastic-ep inspect`` (naming, MoE layer ids, and a check that its experts have
    ``layout``); else a naming scheme with checkpoint layer numbers ``moe_layer_ids``.
    Raises :class:`ConfigError` when there is no checkpoint or its experts differ.
    """
    if not checkpoint:
        raise ConfigError("the agent needs the model directory (ELASTIC_EP_MODEL) for its disk fallback")
    if naming is None:
        from loaders.checkpoint.hf_model import open_model

        model = open_model(checkpoint)
        if model.expert_layout != layout:
            raise ConfigError(
                f"{checkpoint}: its experts are {[(t.name, t.row_shape, t.dtype) for t in model.expert_layout.tensors]}, "
                f"this engine's slots {[(t.name, t.row_shape, t.dtype) for t in layout.tensors]}; "
                "serve the model the directory holds, or pass layout="
            )
        naming, moe_layer_ids = model.naming, model.moe_layer_ids
    return SafetensorsExpertSource(checkpoint, naming, layout, moe_layer_ids)


def build_agent(
    settings: AgentSettings,
    experts: RankExperts,
    hooks: AgentHooks,
    executor_class: Callable[..., PlanExecutor] = PlanExecutor,
    **executor_options: Any,
) -> RankAgent:
    """A :class:`RankAgent` on ``experts``: the transport ``settings`` names, an executor
    (``executor_class(weights, layout, transport, disk, None, **executor_options)``:
    each plan brings its own store), the callbacks of ``hooks``, and before every
    registration a check that the checkpoint holds every expert of every layer in this
    rank's layout (:func:`check_checkpoint`: a rank that could not serve them never joins).

    The caller closes ``agent.executor.transport`` once the agent has stopped.
    """
    transport = get_transport(settings.transport, experts.layout, **settings.transport_options)
    executor = executor_class(experts.weights, experts.layout, transport, experts.disk, None, **executor_options)
    agent = RankAgent(
        settings.config, executor,
        load_initial=hooks.load_initial or _filler(experts),
        on_commit=hooks.on_commit,
        verify=_checker(experts, hooks.reference) if hooks.reference is not None else None,
        load_window=hooks.load_window,
    )
    agent.preflight = functools.partial(check_checkpoint, experts.disk, len(experts.weights), experts.num_experts)
    agent.on_fence = hooks.on_fence
    agent.on_routing = hooks.on_routing
    agent.on_serving = hooks.on_serving
    agent.mirror = _mirror(settings, experts, executor, agent)
    return agent


def _mirror(settings: AgentSettings, experts: RankExperts, executor: PlanExecutor, agent: RankAgent
            ) -> MirrorKeeper | None:
    """The rank's host-memory mirror, registered with the executor (and so with the
    transport), publishing through the agent; None when the budget holds no expert."""
    rows = settings.mirror_bytes // experts.layout.expert_bytes
    if rows < 1:
        return None
    num_logical = experts.num_experts or check_checkpoint(experts.disk, 1)
    rows = min(rows, len(experts.weights) * num_logical)  # more rows than experts hold nothing
    keeper = MirrorKeeper(rows, experts.layout, experts.disk, num_logical, pin=executor.device.type == "cuda",
                          fill_bytes_s=settings.mirror_fill_bytes_s, publish=agent.publish_mirror)
    executor.register_mirror(keeper.buffer)
    return keeper


def _filler(experts: RankExperts) -> Callable[[ExpertPlacement, int], int]:
    def load_initial(placement: ExpertPlacement, rank: int) -> int:
        return fill_rank_slots(experts.disk, placement, rank, experts.weights)

    return load_initial


def _checker(experts: RankExperts, reference: ExpertReference) -> Callable[[ExpertPlacement, int], int]:
    def verify(placement: ExpertPlacement, rank: int) -> int:
        return len(mismatched_slots(experts.layout, placement, rank, experts.weights, reference))

    return verify
