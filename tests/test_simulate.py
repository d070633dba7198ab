"""Simulated ranks (``elastic_ep/tools/simulate.py``) against a real etcd and a real
controller: bootstrap, a killed rank recovered without it, and the ``simulate-ranks``
command's life (register, take a kill command, leave on SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from controller.controller import Controller, ControllerConfig, ModelShape
from controller.etcd_client import EtcdConfig, connect
from controller.records import member_id
from controller.view import read_view
from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.core.load_stats import zipf_load
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.errors import PlanError
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.polling import wait_for
from elastic_ep.tools.simulate import CountingExecutor, SimShape, SimulatedRanks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = SimShape(num_layers=4, num_logical=16, slots_per_rank=3, expert_bytes=4096)
RANKS = 12


@pytest.fixture
def etcd():
    with EtcdServer() as srv:
        yield srv


def _cfg(srv: EtcdServer, deployment: str = "sim") -> EtcdConfig:
    return EtcdConfig(srv.endpoint, deployment=deployment, timeout_s=2.0)


def _wait(pred, timeout: float, what: str):
    v = wait_for(pred, timeout, 0.1)
    assert v, f"timed out after {timeout} s waiting for {what}"
    return v


def _commit_with(client, root: str, pred):
    """The committed record when ``pred(commit)`` holds, else None."""
    c = read_view(client, root).committed
    return c if c is not None and pred(c) else None


def test_counting_executor_counts_every_receive_once():
    """Summed over every participant, the counted bytes are the plan's bytes by route."""
    old = ExpertPlacement(rebalance_experts(zipf_load(4, 16, 0.6, 1), 8 * 3, 1, 1, 8)[0], 3, 16)
    mapping = RankMapping.build(8, dead=[2], num_joining=1)
    new = get_policy("min_migration").rebalance(old, mapping, zipf_load(4, 16, 0.6, 1))
    plan = build_plan(old, new, mapping, SHAPE.expert_bytes, epoch=2)
    total = dict.fromkeys(plan.bytes_by_route(), 0)
    for old_rank in sorted(mapping.live_sources):
        for route, n in CountingExecutor(SHAPE).execute(plan, old_rank).bytes_by_route().items():
            total[route] += n
    joiner = CountingExecutor(SHAPE).execute(plan, None, mapping.new_ep_size - 1)
    for route, n in joiner.bytes_by_route().items():
        total[route] += n
    assert total == plan.bytes_by_route()
    assert sum(total.values()) > 0
    with pytest.raises(PlanError, match="dead"):
        CountingExecutor(SHAPE).execute(plan, 2)
    with pytest.raises(PlanError, match="layers"):
        CountingExecutor(SimShape(5, 16, 3, SHAPE.expert_bytes)).execute(plan, 0)


def test_simulated_ranks_bootstrap_then_a_killed_rank_is_planned_out(etcd):
    cfg = _cfg(etcd)
    shape = ModelShape(SHAPE.num_layers, SHAPE.num_logical, SHAPE.slots_per_rank, SHAPE.expert_bytes)
    ctl = Controller(ControllerConfig(cfg, shape, id="ctl-sim", min_ranks=RANKS, settle_s=0.3, leader_ttl_s=2))
    stop = threading.Event()
    ctl_thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    ctl_thread.start()
    client = connect(cfg)
    ranks = SimulatedRanks(cfg, SHAPE, node_size=4, lease_ttl_s=2, client=client)
    try:
        ids = ranks.start(RANKS)
        c1 = _wait(lambda: _commit_with(client, cfg.root, lambda c: len(c.members) == RANKS), 60, "bootstrap commit")
        v = read_view(client, cfg.root)
        assert sorted(member_id(m) for m in c1.members) == sorted(ids)
        assert {rid: v.ranks[rid].node for rid in ids} == {f"sim-{i}": f"node-{i // 4}" for i in range(RANKS)}
        require(check_commit(v))

        assert ranks.kill("sim-5") == ["sim-5"]
        assert "sim-5" not in ranks.alive()
        # The kill happened: the key went with the revoked lease, before any recovery.
        _wait(lambda: "sim-5" not in read_view(client, cfg.root).ranks, 10, "sim-5's key to go")
        c2 = _wait(lambda: _commit_with(client, cfg.root, lambda c: c.epoch > c1.epoch), 60, "recovery commit")
        assert len(c2.members) == RANKS - 1
        assert "sim-5" not in {member_id(m) for m in c2.members}
        v2 = read_view(client, cfg.root, whole_plan=True, loads=True)  # the invariants check the whole plan
        require(check_commit(v2, exact_disk=True))
        assert all(v2.acks[m].ok for m in c2.members)
    finally:
        stop.set()  # the controller first, so that it does not plan the teardown
        ctl_thread.join(10)
        ranks.close()
    assert not ranks.alive()


def test_simulate_ranks_command_registers_takes_a_kill_and_exits_on_sigterm(etcd):
    cfg = _cfg(etcd, "cli")
    cmd = [sys.executable, "-m", "elastic_ep.tools.cli", "simulate-ranks", "--etcd", etcd.endpoint,
           "--deployment", "cli", "--count", "4", "--start-index", "10", "--node-size", "2",
           "--layers", "2", "--experts", "8", "--slots", "3", "--expert-bytes", "1024", "--lease-ttl", "2",
           "--stdin-commands"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    client = connect(cfg)
    want = {f"sim-{i}" for i in range(10, 14)}
    try:
        _wait(lambda: set(read_view(client, cfg.root).ranks) == want, 60, f"ranks {sorted(want)} registered")
        assert read_view(client, cfg.root).ranks["sim-13"].node == "node-6"
        proc.stdin.write("kill sim-11\n")
        proc.stdin.flush()
        _wait(lambda: set(read_view(client, cfg.root).ranks) == want - {"sim-11"}, 20, "sim-11's key to go")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "killed sim-11" in out
    # Leaving revokes every lease: the keys are gone at once, not after the TTL.
    assert read_view(client, cfg.root).ranks == {}
