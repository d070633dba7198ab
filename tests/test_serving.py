"""Serving beside a plan: the router's map per layer (elastic_ep.core.layer_switch) and
a real plan executed while every slot the map names is checked against the
checkpoint's bytes at every phase of every layer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from elastic_ep.core.layer_switch import in_old_numbering, transition, uncovered, without_ranks
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime import slots
from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.runtime.serving import PlanSwitch, ServingMap
from elastic_ep.tools.synthetic_rank import allocate_weights, load_rank
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(layers=4, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=3)


def test_the_rows_of_a_switch():
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 2, 4)
    new = ExpertPlacement(np.array([[0, 2, 1, 3]]), 2, 4)
    target = in_old_numbering(new, RankMapping.build(2))
    assert target.tolist() == [[0, 2, 1, 3]]
    assert transition(old.phy2log, target).tolist() == [[0, -1, -1, 3]]
    assert uncovered(transition(old.phy2log, target), 4) == [[1, 2]]
    # Rank 1 of 3 dead: old rank 2 becomes new rank 1; a joiner is not in the old numbering.
    new3 = ExpertPlacement(np.array([[0, 1, 2, 3, 1, 2]]), 2, 4)
    mapping = RankMapping.build(3, dead=[1], num_joining=1)
    assert in_old_numbering(new3, mapping).tolist() == [[0, 1, -1, -1, 2, 3]]
    assert without_ranks(np.array([[0, 1, 2, 3]]), {0}, 2).tolist() == [[-1, -1, 2, 3]]
    m = ServingMap.of(old, 0, {1})
    assert m.routes(0, 1).tolist() == [1] and m.routes(0, 2).size == 0 and m.unavailable() == [[2, 3]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_slot_the_map_names_holds_its_expert_throughout_a_plan(ckpt, seed):
    rng = np.random.default_rng(seed)
    print(f"seed {seed}")
    spr, layout = 10, SPEC.layout()
    # One rank rebalanced in place: every expert once plus two replicas, before and after,
    # so slots move locally, and come from disk where the new replica was not held.
    def row() -> list[int]:
        return rng.permutation(list(range(SPEC.experts)) + rng.choice(SPEC.experts, 2).tolist()).tolist()

    old = ExpertPlacement(np.array([row() for _ in range(SPEC.layers)]), spr, SPEC.experts)
    new = ExpertPlacement(np.array([row() for _ in range(SPEC.layers)]), spr, SPEC.experts)
    mapping = RankMapping.build(1)
    plan = build_plan(old, new, mapping, SPEC.expert_bytes, epoch=3)
    disk = SafetensorsExpertSource(ckpt, SPEC.naming, layout, SPEC.moe_layer_ids)
    weights = allocate_weights(layout, SPEC.layers, spr)
    load_rank(disk, old, 0, weights)
    reference = slots.model_reference(SPEC, layout)
    lock = threading.Lock()
    switch = PlanSwitch.start(plan, 0, lock)
    checked, wrong = [0], []

    def check(phase: str = "", layer: int = -1) -> None:
        with lock:  # as an engine's step: the map and the bytes it names, together
            row = switch.current.phy2log
            for lay in range(SPEC.layers):
                for s in range(spr):
                    e = int(row[lay, s])
                    if e < 0:
                        continue
                    got = layout.pack_slot(weights[lay], s, out=torch.empty(layout.expert_bytes, dtype=torch.uint8))
                    checked[0] += 1
                    if not torch.equal(got, reference(lay, [e])[0]):
                        wrong.append((phase, layer, lay, s, e))

    stop = threading.Event()
    def read() -> None:
        while not stop.wait(0.002):
            check()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    ex = PlanExecutor(weights, layout, None, disk, store, dead_after_s=1.0, on_phase=check)
    ex.execute(plan, old_rank=0, hooks=switch)
    stop.set()
    reader.join(10)
    check("end")
    assert wrong == [] and checked[0] > 0
    assert np.array_equal(switch.current.phy2log, in_old_numbering(new, mapping))
    changed = sum(int(np.any(old.phy2log[lay, :spr] != new.phy2log[lay, :spr])) for lay in range(SPEC.layers))
    assert changed > 0, "the plan rewrites slots of rank 0"
    # One pause per layer's write (it also switches the rows around it), one for the last rows.
    assert len(switch.pauses.seconds) == SPEC.layers + 1
    assert switch.current.unavailable() == [[]] * SPEC.layers
