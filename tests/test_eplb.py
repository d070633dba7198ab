import numpy as np
import pytest
import torch

from bench.eplb_loop import rebalance_loop
from elastic_ep.core.eplb import balanced_packing, rebalance_experts
from elastic_ep.errors import ConfigError

CASES = [
    # layers, logical, replicas, groups, nodes, gpus
    (3, 16, 24, 4, 2, 4),    # hierarchical
    (2, 12, 16, 3, 2, 4),    # groups % nodes != 0 -> global
    (2, 8, 8, 2, 2, 2),      # no redundancy
    (4, 32, 48, 8, 4, 8),    # hierarchical, DeepSeek-like ratios
    (2, 20, 30, 5, 1, 6),    # one node
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["float", "int_ties", "zeros"])
def test_matches_loop_reference(case, kind, rng):
    L, E, P, G, N, R = case
    if kind == "float":
        w = torch.from_numpy(rng.random((L, E)).astype(np.float32) * 100)
    elif kind == "int_ties":  # many equal loads: tie-breaking decides
        w = torch.from_numpy(rng.integers(0, 4, (L, E)))
    else:
        w = torch.zeros(L, E)
    got = rebalance_experts(w, P, G, N, R)
    want = rebalance_loop(w, P, G, N, R)
    for g, x, name in zip(got, want, ("phy2log", "log2phy", "logcnt")):
        assert g.dtype == torch.int64, name
        assert torch.equal(g, x), f"{name} differs for {case} {kind}"


def test_outputs_are_consistent_and_numpy_accepted(rng):
    w = rng.zipf(1.5, (4, 64)).astype(np.float64)
    phy2log, log2phy, logcnt = rebalance_experts(w, 80, 8, 2, 8)
    assert phy2log.shape == (4, 80) and logcnt.shape == (4, 64)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == 80).all()
    for layer in range(4):
        counts = torch.bincount(phy2log[layer], minlength=64)
        assert torch.equal(counts, logcnt[layer])
        for e in range(64):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert (phy2log[layer, slots] == e).all() and slots.numel() == logcnt[layer, e]
    # The heaviest expert of each layer gets the most replicas.
    assert (logcnt.gather(1, torch.from_numpy(w).argmax(1, keepdim=True)).squeeze(1) == logcnt.max(1).values).all()


def test_packing_is_balanced():
    w = torch.tensor([[9.0, 7, 6, 5, 4, 1]])
    pack, rank = balanced_packing(w, 2)
    loads = [w[0][pack[0] == p].sum().item() for p in range(2)]
    assert sorted(loads) == [15.0, 17.0]  # greedy: 9 7 | 6->B 5->A 4->B (full) 1->A
    assert sorted(rank[0].tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "args, match",
    [
        ((16, 3, 1, 4), "not a multiple of num_groups"),
        ((18, 4, 2, 4), "num_physical_experts=18 is not a multiple of num_gpus=4"),
        ((16, 4, 2, 3), "num_gpus=3 is not a multiple of num_nodes=2"),
        ((6, 4, 2, 2), "cannot hold"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        rebalance_experts(torch.ones(1, 8), *args)


def test_bad_weight():
    with pytest.raises(ConfigError, match="finite and non-negative"):
        rebalance_experts(torch.tensor([[1.0, -1.0]]), 2, 1, 1, 1)
    with pytest.raises(ConfigError, match="must be"):
        rebalance_experts(torch.ones(4), 4, 1, 1, 1)


def test_reference_readme_example():
    """The documented output of the public DeepSeek EPLB README example."""
    weight = torch.tensor(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
         [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.sum(-1).tolist() == [16, 16] and log2phy.shape == (2, 12, 2)
