"""Seeded chaos schedules over real processes (etcd, 2 controllers, 5 ranks); after each
step every invariant of docs/DESIGN.md is checked (see elastic_ep/tools/chaos.py)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from elastic_ep.tools.chaos import FAULTS, ChaosCluster, random_schedule

# Together these cover every fault; each runs on a fresh cluster.
SCHEDULES = {
    "kills": ["kill_one", "kill_holders", "join_after_failure"],
    "control-plane": ["kill_leader", "restart_etcd", "kill_in_transfer"],
    "overlapping": ["double_failure", "kill_two"],
}


def test_schedules_cover_every_fault():
    assert {f for s in SCHEDULES.values() for f in s} == set(FAULTS)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule(name, tmp_path):
    seed = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or zlib.crc32(name.encode())
    print(f"seed={seed} schedule={SCHEDULES[name]}")
    with ChaosCluster(str(tmp_path), seed=seed) as c:
        try:
            for fault in SCHEDULES[name]:
                c.step(fault)
        except BaseException:
            print(c.logs())
            raise
    assert [r.fault for r in c.results] == SCHEDULES[name]
    assert all(r.seconds < 90 for r in c.results)


def test_random_schedule(tmp_path):
    seed = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or 20261123
    schedule = random_schedule(np.random.default_rng(seed), 3)
    print(f"seed={seed} schedule={schedule}")
    with ChaosCluster(str(tmp_path), seed=seed) as c:
        try:
            for fault in schedule:
                c.step(fault)
        except BaseException:
            print(c.logs())
            raise
    epochs = [r.epoch for r in c.results]
    assert epochs == sorted(epochs)
