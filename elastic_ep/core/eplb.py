"""DeepSeek's expert-parallel load balancer (EPLB), vectorised over layers.

Same signature, outputs and tie-breaking as the public reference
(github.com/deepseek-ai/EPLB, ``eplb.py``): items are visited in the order of torch's
``sort(descending=True)``; a pack is the first one of least weight among those with
room; a redundant replica goes to the first expert of greatest ``weight / count``.
Weights accumulate in float32 in the same order, so equal inputs give equal outputs.

The greedy packing is sequential in its items (each choice depends on the previous
ones), so one loop runs over the item *position*; every layer (and every node in the
hierarchical policy) advances together in one array operation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from elastic_ep.errors import ConfigError


def _as_weight(weight: Any) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(weight) if not isinstance(weight, torch.Tensor) else weight)
    if w.ndim != 2:
        raise ConfigError(f"weight must be [num_layers, num_logical_experts], got shape {tuple(w.shape)}")
    w = w.float().cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError("weight (expert load) must be finite and non-negative")
    return w


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each,
    greedily balancing pack weights.

    Parameters:
        weight: [X, n], the weight of each item
        num_packs: number of packs, a divisor of ``n``

    Returns:
        pack_index: [X, n], the pack of each item
        rank_in_pack: [X, n], the position of the item in its pack
    """
    num_rows, num_items = weight.shape
    if num_items % num_packs:
        raise ConfigError(f"{num_items} items cannot be split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)

    order = weight.float().sort(-1, descending=True).indices
    rows = torch.arange(num_rows)
    pack_weight = torch.zeros(num_rows, num_packs, dtype=weight.dtype)
    pack_items = torch.zeros(num_rows, num_packs, dtype=torch.int64)
    pack_index = torch.full((num_rows, num_items), -1, dtype=torch.int64)
    rank_in_pack = torch.full((num_rows, num_items), -1, dtype=torch.int64)
    inf = torch.tensor(float("inf"), dtype=weight.dtype)
    for pos in range(num_items):
        item = order[:, pos]
        # argmin returns the first minimum, as Python's min() over packs in order does.
        pack = torch.where(pack_items < per_pack, pack_weight, inf).argmin(-1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weight[rows, pack] += weight[rows, item]
        pack_items[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate ``num_log`` experts into ``num_phy`` replicas, each extra replica going
    to the expert with the greatest load per replica.

    Parameters:
        weight: [X, num_log]
        num_phy: replicas in total, ``>= num_log``

    Returns:
        phy2log: [X, num_phy], the logical expert of each replica
        rank: [X, num_phy], the replica's index among its expert's replicas
        logcnt: [X, num_log], replicas per logical expert
    """
    n, num_log = weight.shape
    if num_phy < num_log:
        raise ConfigError(f"{num_phy} physical experts cannot hold {num_log} logical experts")
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64)
    logcnt = torch.ones(n, num_log, dtype=torch.int64)
    rows = torch.arange(n)
    # One pick per redundant slot; the count is small (32 for DeepSeek-V3).
    for i in range(num_log, num_phy):
        pick = (weight / logcnt).max(dim=-1).indices
        phy2log[:, i] = pick
        rank[:, i] = logcnt[rows, pick]
        logcnt[rows, pick] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack expert groups to nodes, replicate within nodes, pack replicas to GPUs.

    Parameters:
        weight: [num_moe_layers, num_logical_experts], float32 on CPU
        num_physical_experts: a multiple of ``num_gpus``
        num_groups: expert groups, a divisor of ``num_logical_experts`` and a multiple
            of ``num_nodes``
        num_nodes: server nodes; ``num_gpus`` is a multiple of it

    Returns:
        phy2log: [num_moe_layers, num_physical_experts]
        phyrank: [num_moe_layers, num_physical_experts], replica index of each slot
        logcnt: [num_moe_layers, num_logical_experts]
    """
    num_layers, num_logical = weight.shape
    for ok, msg in (
        (num_groups > 0 and num_logical % num_groups == 0,
         f"num_logical_experts={num_logical} is not a multiple of num_groups={num_groups}"),
        (num_nodes > 0 and num_groups % num_nodes == 0,
         f"num_groups={num_groups} is not a multiple of num_nodes={num_nodes}"),
        (num_gpus > 0 and num_gpus % num_nodes == 0,
         f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}"),
        (num_physical_experts % max(num_gpus, 1) == 0,
         f"num_physical_experts={num_physical_experts} is not a multiple of num_gpus={num_gpus}"),
    ):
        if not ok:
            raise ConfigError(msg)
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes

    # Step 1: pack groups to nodes; mlog = logical ids renumbered node by node.
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate within each node: rows are (layer, node).
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # Step 3: pack each node's replicas to its GPUs.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (
        pphy2mlog.view(num_layers, num_nodes, -1)
        + torch.arange(0, num_logical, log_per_node, dtype=torch.int64).view(1, -1, 1)
    ).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point of the DeepSeek load balancer.

    Hierarchical when ``num_groups % num_nodes == 0`` (then ``num_gpus`` must be a
    multiple of ``num_nodes``), else global (one node, one group).

    Parameters:
        weight: [layers, num_logical_experts] load, a torch tensor or numpy array
        num_replicas: physical experts, a multiple of ``num_gpus``
        num_groups: expert groups
        num_nodes: server nodes (intra-node links are faster)
        num_gpus: GPUs (EP ranks)

    Returns (torch int64):
        phy2log: [layers, num_replicas], the logical expert of each slot
        log2phy: [layers, num_logical_experts, max replicas], slots per expert, -1 padded
        logcnt: [layers, num_logical_experts], replicas per expert
    """
    w = _as_weight(weight)
    num_layers, num_logical = w.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max().item())
    log2phy = torch.full((num_layers, num_logical, width), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1, phy2log * width + phyrank, torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1)
    )
    return phy2log, log2phy, logcnt
