"""Seeded chaos schedules over real processes (etcd, 2 controllers, 5 ranks); after each
step every invariant of docs/DESIGN.md is checked (see elastic_ep/tools/chaos.py). Each
step must do what its name says (kills proven, the leader found and killed, disk reads
after every holder of an expert died) or say why it did less."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

from bench.soak import Tally, report
from elastic_ep.tools.chaos import (
    DEEP,
    ETCD_MAX_REQUEST_BYTES,
    FAULTS,
    ChaosCluster,
    StepResult,
    hostile_keys,
    random_schedule,
)

# Together these cover every fault; each runs on a fresh cluster.
SCHEDULES = {
    "kills": ["kill_one", "kill_holders", "join_after_failure"],
    "control-plane": ["kill_leader", "restart_etcd", "kill_in_transfer"],
    "overlapping": ["double_failure", "kill_two"],
    "hostile": ["hostile_values", "kill_one"],
    "suspicion": ["stall_short", "cut_link", "stall_long", "node_loss"],
    "mirrors": ["mirrored_node_loss", "kill_holders"],
}

KILLS = {"kill_one": 1, "kill_two": 2, "kill_holders": 1, "kill_in_transfer": 2, "kill_leader": 1,
         "restart_etcd": 0, "join_after_failure": 1, "double_failure": 2, "hostile_values": 1, "stall_short": 0,
         "stall_long": 0, "cut_link": 1, "node_loss": 3, "mirrored_node_loss": 3}
"""Processes each fault kills at least (when not downgraded, one kill less at most): the
cut link's reporter once it has been shown harmless, the lost node's ranks once it has
been recovered from."""


def test_schedules_cover_every_fault():
    assert {f for s in SCHEDULES.values() for f in s} == set(FAULTS) == set(KILLS)


def check_did_what_it_says(r: StepResult, controllers_before: set[str]) -> None:
    assert len(r.killed) >= KILLS[r.fault] - (1 if r.downgraded else 0), r
    if r.fault == "kill_leader":
        assert len(r.killed) == 1 and r.killed[0] in controllers_before, r
    elif r.killed:
        assert all(k.startswith("r") for k in r.killed), r
    if r.fault == "kill_holders" and not r.downgraded:
        assert r.disk_experts > 0 and r.disk_bytes >= r.planned_disk_bytes > 0, r
    if r.fault == "hostile_values":
        assert r.hostile_writes > 100, r


def run(c: ChaosCluster, schedule: list[str]) -> None:
    try:
        for fault in schedule:
            controllers = set(c.live_controllers())
            r = c.step(fault)
            check_did_what_it_says(r, controllers)
            assert not set(r.killed) & {n for n in c.procs if c.procs[n].poll() is None}, "a victim is alive"
    except BaseException:
        print(c.logs())
        raise


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule(name, tmp_path):
    seed = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or zlib.crc32(name.encode())
    print(f"seed={seed} schedule={SCHEDULES[name]}")
    with ChaosCluster(str(tmp_path), seed=seed) as c:
        run(c, SCHEDULES[name])
    assert [r.fault for r in c.results] == SCHEDULES[name]
    assert all(r.seconds < 90 for r in c.results)


def test_random_schedule(tmp_path):
    seed = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or 20261123
    schedule = random_schedule(np.random.default_rng(seed), 3)
    print(f"seed={seed} schedule={schedule}")
    with ChaosCluster(str(tmp_path), seed=seed) as c:
        run(c, schedule)
    epochs = [r.epoch for r in c.results]
    assert epochs == sorted(epochs)


# -- without processes -------------------------------------------------------------------
def test_hostile_values_reach_every_limit():
    tokens = ["r1#a", "r2#b"]
    keys = hostile_keys(np.random.default_rng(0), tokens, 3, layers=2, experts=8)
    kinds = {k.key.split("/")[0] for k in keys}
    assert kinds == {"ranks", "load", "acks"}
    assert any(k.final is None for k in keys) and any(k.final is not None for k in keys)  # leased or not
    assert "load/r1" in {k.key for k in keys} and "acks/r1" in {k.key for k in keys}  # a real member's keys
    for k in keys:
        sizes = [len(v) for v in k.values]
        assert max(sizes) <= ETCD_MAX_REQUEST_BYTES - 4096 and max(sizes) > ETCD_MAX_REQUEST_BYTES - 16384, k.key
        assert DEEP in k.values
    acks = next(k for k in keys if k.key == "acks/hostile-0")
    docs = [json.loads(v) for v in acks.values if v.startswith(b'{"schema": 1') and len(v) < 10_000]
    assert {json.dumps(d.get("mismatched")) for d in docs} >= {'"x"', "null", "Infinity", str(10**30)}
    assert json.loads(acks.final)["id"] in tokens and json.loads(acks.final)["epoch"] == 4  # forged, next epoch
    loads = next(k for k in keys if k.key == "load/hostile-0")
    assert [[1.0, 2.0], [3.0]] == json.loads(loads.final)["load"]  # ragged
    rank = next(k for k in keys if k.key == "ranks/hostile-0")
    assert json.loads(rank.final)["id"] == "hostile-0"  # valid-looking, under no lease


def test_soak_table_keeps_planned_disk_reads_apart_from_fallbacks():
    t = Tally(schedules=1, rank_kills=4, controller_kills=1)
    t.faults.update(["kill_holders", "kill_two", "kill_leader", "kill_in_transfer"])
    t.steps = [
        StepResult("kill_holders", "", 3.0, 2, killed=("r1", "r2"), disk_experts=2, planned_disk_bytes=2 << 20,
                   disk_bytes=2 << 20),
        StepResult("kill_two", "", 5.0, 3, killed=("r3",), downgraded="kill_two downgraded to one kill: capacity"),
        StepResult("kill_leader", "", 1.0, 3, killed=("ctl-0",)),
        StepResult("kill_in_transfer", "", 9.0, 5, True, killed=("r4", "r5"), unplanned_disk_bytes=1 << 20,
                   disk_bytes=1 << 20),
        StepResult("stall_short", "", 20.0, 5),  # watched, not a recovery
    ]
    table = "\n".join(report(t))
    print(table)
    assert "planned disk reads      2 experts, 2.00 MiB planned, 3.00 MiB read (kill_holders: 2 experts" in table
    assert "unplanned fallbacks     1 steps, 1.00 MiB" in table
    assert "1 x kill_two downgraded to one kill: capacity" in table
    assert "controllers killed      1" in table
    assert "median 4.00 s, worst 9.00 s (kill_in_transfer)" in table
