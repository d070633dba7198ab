"""Hypothesis strategies shared by the core's property tests."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.rank_mapping import RankMapping


@st.composite
def placements(draw, max_layers: int = 3, max_logical: int = 12, max_ranks: int = 6) -> ExpertPlacement:
    """A valid random placement: every expert once, the rest random redundant copies."""
    L = draw(st.integers(1, max_layers))
    E = draw(st.integers(2, max_logical))
    R = draw(st.integers(2, max_ranks))
    spr = math.ceil(E / R) + draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(L):
        row = np.concatenate([np.arange(E), rng.integers(0, E, R * spr - E)])
        rows.append(rng.permutation(row))
    return ExpertPlacement(np.stack(rows), spr, E)


@st.composite
def changes(draw, placement: ExpertPlacement) -> RankMapping:
    """A random membership change that leaves room for every logical expert."""
    R, spr, E = placement.ep_size, placement.slots_per_rank, placement.num_logical
    removed = draw(st.lists(st.integers(0, R - 1), unique=True, max_size=R - 1))
    joining = draw(st.integers(0, 2))
    while (R - len(removed) + joining) * spr < E:
        removed = removed[:-1]
    leaving = [r for r in removed if draw(st.booleans())]
    dead = [r for r in removed if r not in leaving]
    return RankMapping.build(R, dead=dead, leaving=leaving, num_joining=joining)


@st.composite
def placement_and_change(draw) -> tuple[ExpertPlacement, RankMapping, np.ndarray]:
    p = draw(placements())
    m = draw(changes(p))
    seed = draw(st.integers(0, 2**32 - 1))
    load = np.random.default_rng(seed).zipf(1.6, (p.num_layers, p.num_logical)).astype(np.float64)
    return p, m, np.minimum(load, 1e4)
