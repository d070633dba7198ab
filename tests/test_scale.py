"""The control plane at production size: 64 simulated ranks of DeepSeek-V3 (58 MoE
layers x 256 experts, 9 slots a rank) in front of the real controller with the
``deepseek`` policy, whose plan after one death would be over etcd's 1.5 MiB as one
record. Bootstrap, kill a rank, and check the commit against every invariant, each
record's size, and that every rank read only its own part. Then 40 such ranks in 5
nodes, where 152 experts of each layer have one GPU replica, each rank with a
host-memory mirror: lose a whole node of 8 ranks and read nothing from disk."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from controller.controller import Controller, ControllerConfig, ModelShape
from controller.coverage import mirrors_filled
from controller.etcd_client import EtcdConfig, connect
from controller.records import member_id
from controller.view import read_view
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.polling import wait_until as _wait
from elastic_ep.tools.simulate import SimShape, SimulatedRanks
from tests.procs import read_committed

RANKS = 64
SHAPE = SimShape(58, 256, 9, 88_080_384)
LIMIT = 512 * 1024
MIRROR_ROWS = 300
"""Above the rows per rank (about 58 x 152 / 40 = 221) that cover any node's loss."""


@pytest.fixture(scope="module")
def etcd():
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        yield srv



def _one_record_bytes(view: Any) -> int:
    """The plan as the single JSON record it used to be: placements as lists, every
    transfer as a row."""
    p = view.plan.plan
    rows = [[t.layer, t.dst_rank, t.dst_slot, t.logical, [[s.rank, s.slot] for s in t.sources]] for t in p.transfers]
    return len(json.dumps({"old_members": view.plan.old_members, "new_members": view.plan.new_members,
                           "plan": {"old": p.old.phy2log.tolist(), "new": p.new.phy2log.tolist(), "transfers": rows},
                           "placement": p.new.phy2log.tolist()}))


def _largest_value(client: Any, root: str) -> tuple[int, str]:
    return max((len(v), m.key.decode()) for v, m in client.get_prefix(root + "/"))


def test_40_deepseek_v3_ranks_lose_a_node_and_read_nothing_from_disk(etcd):
    cfg = EtcdConfig(etcd.endpoint, deployment="dsv3-40", timeout_s=10.0)
    shape = ModelShape(SHAPE.num_layers, SHAPE.num_logical, SHAPE.slots_per_rank, SHAPE.expert_bytes)
    # A node's ranks die together; a 1 s settle window puts them all in one plan (plans
    # made between its deaths may place experts on its ranks still alive).
    ctl = Controller(ControllerConfig(cfg, shape, id="ctl-mirrors", min_ranks=40, settle_s=1.0, confirm_settle_s=1.0,
                                      leader_ttl_s=5))
    stop = threading.Event()
    ctl_thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    ctl_thread.start()
    client = connect(cfg)
    ranks = SimulatedRanks(cfg, SHAPE, node_size=8, lease_ttl_s=10, ranks_per_client=10, mirror_rows=MIRROR_ROWS)
    try:
        ranks.start(40)
        c1 = _wait(lambda: (c := read_committed(client, cfg.root)) and len(c.members) == 40 and c, 240,
                   "the bootstrap commit of 40 ranks")
        assert c1.mirrors is not None and c1.mirrors.count() > 5000, "most experts have one replica: mirrored"
        cov = _wait(lambda: mirrors_filled(read_view(client, cfg.root)), 120,
                    "every mirror reported ready")
        assert cov.ready == c1.mirrors.count() and cov.worst_experts == 0, (cov.ready, cov.worst_experts)
        node = [f"sim-{i}" for i in range(24, 32)]
        assert len(ranks.kill(*node)) == 8
        c2 = _wait(lambda: (c := read_committed(client, cfg.root)) and c.epoch > c1.epoch
                   and not set(node) & {member_id(m) for m in c.members} and c, 240, "the recovery from the node loss")
        v = read_view(client, cfg.root, whole_plan=True, loads=True)
        require(check_commit(v, exact_disk=True))
        mirrored = sum(1 for t in v.plan.plan.transfers if t.route == "mirror")
        size, key = _largest_value(client, cfg.root)
        print(f"node of 8 lost: {cov.ready} mirror rows were ready; {len(v.plan.plan.transfers)} transfers, "
              f"{mirrored} from mirrors; bytes {c2.bytes}; head {len(v.plan.to_json()) / 1024:.0f} KiB; "
              f"largest value {size / 1024:.0f} KiB ({key})")
        assert c2.bytes.get("disk", 0) == 0 and c2.bytes.get("mirror", 0) == mirrored * SHAPE.expert_bytes > 0
        assert size <= LIMIT, (size, key)
    finally:
        stop.set()
        ctl_thread.join(15)
        ranks.close()


def test_64_deepseek_v3_ranks_recover_a_plan_too_large_for_one_record(etcd):
    cfg = EtcdConfig(etcd.endpoint, deployment="dsv3-64", timeout_s=10.0)
    shape = ModelShape(SHAPE.num_layers, SHAPE.num_logical, SHAPE.slots_per_rank, SHAPE.expert_bytes)
    ctl = Controller(ControllerConfig(cfg, shape, id="ctl-scale", min_ranks=RANKS, settle_s=0.5, leader_ttl_s=5,
                                      policy="deepseek", policy_options={"num_groups": 8, "num_nodes": 8}))
    stop = threading.Event()
    ctl_thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    ctl_thread.start()
    client = connect(cfg)
    ranks = SimulatedRanks(cfg, SHAPE, node_size=8, lease_ttl_s=10, ranks_per_client=16)
    try:
        ranks.start(RANKS)
        c1 = _wait(lambda: (c := read_committed(client, cfg.root)) and len(c.members) == RANKS and c, 240,
                   "the bootstrap commit of 64 ranks")
        victim = member_id(c1.members[17])
        assert ranks.kill(victim) == [victim]
        c2 = _wait(lambda: (c := read_committed(client, cfg.root)) and c.epoch > c1.epoch and c, 240,
                   "the recovery commit")
        v = read_view(client, cfg.root, whole_plan=True, loads=True)
        assert v.plan is not None and v.plan.plan is not None, v.plan_error
        one = _one_record_bytes(v)
        size, key = _largest_value(client, cfg.root)
        print(f"{len(v.plan.plan.transfers)} transfers; as one record {one / 2**20:.2f} MiB; head "
              f"{len(v.plan.to_json()) / 1024:.0f} KiB, {len(v.plan.chunks)} chunks; largest value {size / 1024:.0f} KiB "
              f"({key})")
        assert one > 1.5 * 2**20, "the plan would not fit one etcd request"
        assert size <= LIMIT, (size, key)
        assert len(c2.members) == RANKS - 1 and victim not in {member_id(m) for m in c2.members}
        require(check_commit(v, exact_disk=True))
        # Each participant read its own part: its ack counts exactly its receives' bytes.
        plan = v.plan.plan
        for n, m in enumerate(c2.members):
            want = sum(1 for t in plan.receives(n) if t.route != "local") * SHAPE.expert_bytes
            got = sum(b for route, b in v.acks[m].bytes.items() if route != "local")
            assert got == want, (m, got, want)
        left = {mk.key.decode().split("/")[-3] for _, mk in client.get_prefix(f"{cfg.root}/plans/")}
        assert left == {f"{c2.epoch:020d}"}, f"only the committed epoch's chunks remain: {left}"
    finally:
        stop.set()
        ctl_thread.join(15)
        ranks.close()
