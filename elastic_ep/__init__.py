"""elastic-ep: elastic expert parallelism for Mixture-of-Experts serving.

The public API, importable from here (loaded on first use, so that importing one
part does not pull in etcd, torch.distributed or a transport):

==========================  =============================================
name                        what it is
==========================  =============================================
``ExpertPlacement``         per-layer ``phy2log`` with ``log2phy``/``logcnt``
``RankMapping``             old rank -> new rank or -1; joining ranks
``rebalance_experts``       DeepSeek's EPLB, vectorised
``RebalancePolicy``         the policy interface; ``get_policy(name)``
``TransferPlan``            per changed slot, its sources in order; ``build_plan``
``MirrorAssignment``        which rank mirrors which expert; ``assign_mirrors``
``ExpertLayout``            one expert's serving tensors, packed and unpacked
``PeerTransport``           the transport interface; ``get_transport(name)``
``SafetensorsExpertSource`` the disk fallback; ``open_model(dir)``
``EtcdConfig``              how to reach etcd (TLS, auth)
``Controller``              the control loop; ``ControllerConfig``, ``ModelShape``
``ClusterView``             one read of a deployment; ``read_view``
``decide``                  the controller's pure decision (``Action``, ``Memory``)
``RankAgent``               the agent in a serving process; ``AgentConfig``
``PlanExecutor``            applies a plan to one process's weights
``VllmExpertAdapter``       embeds the agent in a vLLM-style engine
``build_agent``             settings -> transport -> executor -> agent
``ElasticEPError``          the root of :mod:`elastic_ep.errors`
==========================  =============================================
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ExpertPlacement": "elastic_ep.core.placement",
    "RankMapping": "elastic_ep.core.rank_mapping",
    "rebalance_experts": "elastic_ep.core.eplb",
    "RebalancePolicy": "elastic_ep.core.policy",
    "get_policy": "elastic_ep.core.policy",
    "TransferPlan": "elastic_ep.core.plan",
    "build_plan": "elastic_ep.core.plan",
    "MirrorAssignment": "elastic_ep.core.mirrors",
    "assign_mirrors": "elastic_ep.core.mirrors",
    "ExpertLayout": "loaders.layout",
    "PeerTransport": "loaders.transport",
    "get_transport": "loaders.transport",
    "SafetensorsExpertSource": "loaders.checkpoint.safetensors_source",
    "open_model": "loaders.checkpoint.hf_model",
    "EtcdConfig": "controller.etcd_client",
    "Controller": "controller.controller",
    "ControllerConfig": "controller.controller",
    "ModelShape": "controller.controller",
    "ClusterView": "controller.view",
    "read_view": "controller.view",
    "decide": "controller.decide",
    "Action": "controller.decide",
    "Memory": "controller.decide",
    "RankAgent": "elastic_ep.runtime.agent",
    "AgentConfig": "elastic_ep.runtime.agent",
    "PlanExecutor": "elastic_ep.runtime.executor",
    "VllmExpertAdapter": "elastic_ep.runtime.vllm_adapter",
    "build_agent": "elastic_ep.runtime.wiring",
    "AgentSettings": "elastic_ep.runtime.wiring",
    "ElasticEPError": "elastic_ep.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'elastic_ep' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
