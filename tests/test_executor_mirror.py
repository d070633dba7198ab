"""A plan that reads a host-memory mirror row, executed in this process on a real
checkpoint: the row's bytes are kept only while its rank still reports the row with
that expert after the read; a row reported empty or with another expert (rewritten
meanwhile) is read from disk instead, and the slot is bit-exact either way."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import DISK, Source, Transfer, TransferPlan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.runtime.slots import model_reference
from elastic_ep.tools.synthetic_rank import allocate_weights
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(layers=1, experts=2, hidden=64, intermediate=32, dtype="bf16", shards=1, seed=3)
LAYOUT = SPEC.layout()
EB = LAYOUT.expert_bytes


@pytest.fixture(scope="module")
def disk(tmp_path_factory: Any) -> SafetensorsExpertSource:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return SafetensorsExpertSource(d, SPEC.naming, LAYOUT, SPEC.moe_layer_ids)


def plan() -> TransferPlan:
    """Rank 1 (holding expert 1 twice) dies; rank 0 takes expert 1 into its slot 1 from
    row 0 of its own mirror (source slot 2 = slots_per_rank + 0), else disk."""
    old = ExpertPlacement(np.array([[0, 0, 1, 1]]), 2, 2)
    new = ExpertPlacement(np.array([[0, 1]]), 2, 2)
    t = Transfer(0, 0, 1, 1, (Source(0, 2, "mirror"), Source(DISK, -1, "disk")))
    p = TransferPlan(5, RankMapping.build(2, dead=[1]), old, new, EB, (t,), ((),))
    p.validate()
    return p


@pytest.mark.parametrize(("row_bytes", "reported", "route"), [
    ("expert 1", 1, "mirror"),   # still reported with expert 1: kept
    ("garbage", -1, "disk"),     # reported empty: being rewritten
    ("garbage", 0, "disk"),      # reported with another expert: rewritten
    ("garbage", None, "disk"),   # no report (etcd cannot say)
])
def test_a_mirror_read_is_kept_only_while_its_row_is_still_reported(
        disk: SafetensorsExpertSource, row_bytes: str, reported: int | None, route: str) -> None:
    weights = allocate_weights(LAYOUT, SPEC.layers, 2)
    ex = PlanExecutor(weights, LAYOUT, None, disk, dist.HashStore(), heartbeat_s=0.05, dead_after_s=1.0)
    mirror = torch.empty(EB, dtype=torch.uint8)
    if row_bytes == "expert 1":
        disk.read_packed([(0, 1)], mirror, [0])
    else:
        mirror.fill_(0xAB)
    ex.register_mirror(mirror)
    asked: list[int] = []

    def rows(old_rank: int) -> Any:
        asked.append(old_rank)
        return None if reported is None else np.array([reported])

    ex.mirror_rows = rows
    report = ex.execute(plan(), old_rank=0)
    assert asked == [0]
    assert [o.route for o in report.outcomes] == [route]
    want = model_reference(SPEC, LAYOUT)(0, [1])[0]
    got = LAYOUT.pack_slot(weights[0], 1, out=torch.empty(EB, dtype=torch.uint8))
    assert torch.equal(got, want), "the slot holds expert 1's bytes"
