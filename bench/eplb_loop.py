"""A straightforward loop implementation of DeepSeek's EPLB algorithm.

It walks every layer, item and pack in Python, the way the published reference does,
and serves two purposes: the oracle that tests compare the vectorised
``elastic_ep.core.eplb`` against (same outputs, ties included), and the baseline that
``bench_policy.py`` times it against.
"""

from __future__ import annotations

import torch


def pack_loop(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return torch.arange(n).expand(weight.shape), torch.zeros_like(weight, dtype=torch.int64)
    order = weight.float().sort(-1, descending=True).indices
    pack_index = torch.full((rows, n), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, n), -1, dtype=torch.int64)
    for r in range(rows):
        load = [torch.tensor(0.0)] * num_packs
        count = [0] * num_packs
        for item in order[r].tolist():
            best = -1
            for p in range(num_packs):
                if count[p] < per_pack and (best < 0 or load[p] < load[best]):
                    best = p
            pack_index[r, item] = best
            rank_in_pack[r, item] = count[best]
            load[best] = load[best] + weight[r, item]
            count[best] += 1
    return pack_index, rank_in_pack


def replicate_loop(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, num_log = weight.shape
    phy2log = torch.zeros(rows, num_phy, dtype=torch.int64)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    for r in range(rows):
        for i in range(num_phy):
            if i < num_log:
                phy2log[r, i] = i
                continue
            per_replica = weight[r] / logcnt[r]
            best = 0
            for e in range(1, num_log):
                if per_replica[e] > per_replica[best]:
                    best = e
            phy2log[r, i] = best
            rank[r, i] = logcnt[r, best]
            logcnt[r, best] += 1
    return phy2log, rank, logcnt


def rebalance_loop(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``elastic_ep.core.eplb.rebalance_experts``."""
    weight = torch.as_tensor(weight).float().cpu()
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_replicas // num_nodes
    phy_per_gpu = num_replicas // num_gpus
    gpus_per_node = num_gpus // num_nodes

    phy2log = torch.zeros(layers, num_replicas, dtype=torch.int64)
    phyrank = torch.zeros(layers, num_replicas, dtype=torch.int64)
    logcnt = torch.zeros(layers, num_log, dtype=torch.int64)
    group_w = weight.view(layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = pack_loop(group_w, num_nodes)
    for layer in range(layers):
        # Node-major renumbering of logical experts (mlog) and its inverse.
        mlog2log = [0] * num_log
        for g in range(num_groups):
            base = (int(group_pack[layer, g]) * groups_per_node + int(group_rank[layer, g])) * group_size
            for j in range(group_size):
                mlog2log[base + j] = g * group_size + j
        for node in range(num_nodes):
            local = mlog2log[node * log_per_node : (node + 1) * log_per_node]
            w_node = weight[layer, local].view(1, -1)
            p2m, prank, mcnt = replicate_loop(w_node, phy_per_node)
            per_phy = (w_node / mcnt).gather(-1, p2m)
            pack, rank_in_pack = pack_loop(per_phy, gpus_per_node)
            for phy in range(phy_per_node):
                slot = node * phy_per_node + int(pack[0, phy]) * phy_per_gpu + int(rank_in_pack[0, phy])
                phy2log[layer, slot] = local[int(p2m[0, phy])]
                phyrank[layer, slot] = prank[0, phy]
            for m, log in enumerate(local):
                logcnt[layer, log] = mcnt[0, m]
    width = int(logcnt.max())
    log2phy = torch.full((layers, num_log, width), -1, dtype=torch.int64)
    for layer in range(layers):
        for slot in range(num_replicas):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot
    return phy2log, log2phy, logcnt
