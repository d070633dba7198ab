"""The rank agent against hostile or buggy writers, on a real etcd: forged, replayed and
torn plans; acks that must be failures; an old rank that does not hold the plan's old
slots; a second process started with a live rank's id; a lease that cannot be
refreshed; a checkpoint that does not fit; values that must not stop an agent.

Each test plays the leader itself where it needs a genuine plan: one transaction that
puts ``epoch`` and ``plan`` together, compared on the leader key (what
``Controller.publish`` writes), so what the agent accepts is exactly what the leader's
fenced write looks like and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import zlib
from typing import Any, Callable

import numpy as np
import pytest

from controller.etcd_client import EtcdConfig, connect
from controller import plan_chunks
from controller.records import AckRecord, CommitRecord, PlanRecord, RankRecord, RoutingRecord
from elastic_ep.core.placement import ExpertPlacement, initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.errors import CheckpointError, DuplicateRankError
from elastic_ep.runtime.agent import AgentConfig, AgentState, RankAgent
from elastic_ep.runtime.executor import ExecutionReport
from elastic_ep.tools.polling import wait_for
from elastic_ep.tools.synthetic_rank import SyntheticRank, build_rank_agent
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs an etcd binary")

LEADER = "ctl-a"
LAYERS, EXPERTS, SLOTS = 2, 8, 4
SPEC = SyntheticSpec(layers=LAYERS, experts=EXPERTS, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=11)
LOG = "elastic_ep.runtime.agent"


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    v = wait_for(pred, timeout, 0.01)
    assert v, f"timed out after {timeout} s waiting for {what}"
    return v


class Deployment:
    """One deployment on the shared etcd: a client, its root, a leader key naming
    :data:`LEADER`, and the leader's writes."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.cfg = EtcdConfig(endpoint, deployment=name, timeout_s=2.0)
        self.client = connect(self.cfg)
        self.root = self.cfg.root
        self.client.put(f"{self.root}/leader", LEADER)

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def get(self, name: str) -> tuple[bytes | None, Any]:
        return self.client.get(self.key(name))

    def publish(self, rec: PlanRecord, fenced: bool = True) -> PlanRecord:
        """What the leader's publish writes: the plan's chunks, then ``epoch`` and the
        head in one transaction (``fenced``: compared on the leader key naming
        ``rec.leader``). Returns the head."""
        rec = plan_chunks.write(self.client, self.root, rec)
        tx = self.client.transactions
        cmp = [tx.value(self.key("leader")) == rec.leader] if fenced else []
        ok, _ = self.client.transaction(compare=cmp, success=[tx.put(self.key("epoch"), str(rec.epoch)),
                                                              tx.put(self.key("plan"), rec.to_json())], failure=[])
        assert ok, f"publish of epoch {rec.epoch} refused"
        return rec

    def commit(self, rec: PlanRecord) -> None:
        """What the leader's commit writes, compared on the leader key."""
        tx = self.client.transactions
        c = CommitRecord(rec.epoch, rec.new_members, rec.placement)
        ok, _ = self.client.transaction(compare=[tx.value(self.key("leader")) == LEADER],
                                        success=[tx.put(self.key("committed"), c.to_json())], failure=[])
        assert ok

    def ack(self, rank_id: str, epoch: int) -> AckRecord | None:
        raw, _ = self.get(f"acks/{rank_id}")
        a = None if raw is None else AckRecord.parse(self.key(f"acks/{rank_id}"), raw)
        return a if a is not None and a.epoch == epoch else None

    def registered(self, rank_id: str) -> RankRecord | None:
        raw, _ = self.get(f"ranks/{rank_id}")
        return None if raw is None else RankRecord.parse(self.key(f"ranks/{rank_id}"), raw)


def bootstrap(epoch: int, members: list[str], leader: str = LEADER) -> PlanRecord:
    """A bootstrap plan (every slot from disk) for ``members`` at ``epoch``: one rank
    holds every expert once (8 slots), two ranks 4 slots each."""
    placement = initial_placement(LAYERS, EXPERTS, len(members), EXPERTS // len(members))
    return PlanRecord(epoch, leader, [], members, None, placement, reason="test bootstrap")


@pytest.fixture(scope="module")
def etcd():
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        yield srv


@pytest.fixture
def dep(etcd, request) -> Deployment:
    """A fresh deployment per test (named after the test)."""
    d = Deployment(etcd.endpoint, f"t{zlib.crc32(request.node.nodeid.encode()):08x}")
    yield d
    d.client.close()


class Recorder:
    """An executor and a bootstrap loader that record what they were asked to do.
    ``fail``: raise from every bootstrap load (a disk that keeps failing)."""

    def __init__(self, fail: bool = False) -> None:
        self.loads: list[tuple[ExpertPlacement, int]] = []
        self.executed: list[tuple[int, int | None]] = []
        self.fail = fail

    def load_initial(self, placement: ExpertPlacement, rank: int) -> int:
        if self.fail:
            raise RuntimeError("the disk read failed (test)")
        self.loads.append((placement, rank))
        return 0

    def execute(self, plan: Any, old_rank: int | None = None, new_rank: int | None = None, *, store: Any = None, gone: Any = None, hooks: Any = None):
        self.executed.append((plan.epoch, old_rank))
        n = plan.mapping.old_to_new[old_rank] if old_rank is not None else new_rank
        return ExecutionReport(plan.epoch, old_rank, None if n is None or n < 0 else n, 0, plan.mapping.new_ep_size)


@pytest.fixture
def agents():
    """Agents made by a test, stopped and their leases revoked afterwards."""
    made: list[RankAgent] = []
    yield made
    for a in made:
        a.stop()
        if a.lease is not None:
            try:
                a.client.revoke_lease(a.lease.id)
            except Exception:
                pass


def make_agent(dep: Deployment, agents: list, rid: str = "r0", rec: Recorder | None = None,
               ttl: int = 2, **kw: Any) -> RankAgent:
    rec = rec or Recorder()
    cfg = AgentConfig(dep.cfg, rid, lease_ttl_s=ttl, poll_s=0.02, retry_s=0.1)
    a = RankAgent(cfg, executor=rec, load_initial=rec.load_initial, client=connect(dep.cfg), **kw)  # type: ignore[arg-type]
    a.recorder = rec  # type: ignore[attr-defined]
    agents.append(a)
    return a


def polls(a: RankAgent, seconds: float, every: float = 0.02) -> list[str]:
    """What ``a.poll_once()`` returned, called every ``every`` s for ``seconds``."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(a.poll_once())
        time.sleep(every)
    return out


def errors_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and text in r.getMessage()]


# -- 1. a forged plan moves no epoch ---------------------------------------------------------
def test_a_forged_plan_from_another_leader_moves_no_epoch(dep, agents):
    """A plan at epoch 103 naming another leader is refused and leaves the newest epoch
    where it was, so the next genuine plan (epoch 2) is executed."""
    a = make_agent(dep, agents)
    a.register()
    dep.publish(bootstrap(1, [a.token]))
    assert a.poll_once() == "acked" and len(a.recorder.loads) == 1
    dep.client.put(dep.key("plan"), bootstrap(103, [a.token], leader="mallory").to_json())
    assert {a.poll_once() for _ in range(5)} == {"idle"}
    assert a.last_epoch == 1 and a.epochs_seen == [1] and len(a.recorder.loads) == 1
    dep.publish(bootstrap(2, [a.token]))
    assert a.poll_once() == "acked", "the genuine plan after a forged one is executed"
    assert a.last_epoch == 2 and a.epochs_seen == [1, 2] and len(a.recorder.loads) == 2


# -- 2. a replayed or torn plan is never executed --------------------------------------------
def _plan_only(dep: Deployment, rec: PlanRecord) -> None:
    dep.client.put(dep.key("plan"), rec.to_json())


def _epoch_then_plan(dep: Deployment, rec: PlanRecord) -> None:
    dep.client.put(dep.key("epoch"), str(rec.epoch))
    dep.client.put(dep.key("plan"), rec.to_json())


def _another_leader_in_one_transaction(dep: Deployment, rec: PlanRecord) -> None:
    dep.publish(PlanRecord(rec.epoch, "ctl-old", rec.old_members, rec.new_members, rec.plan, rec.placement),
                fenced=False)


@pytest.mark.parametrize("write", [_plan_only, _epoch_then_plan, _another_leader_in_one_transaction],
                         ids=["plan-only", "epoch-then-plan", "another-leader"])
def test_a_replayed_or_torn_plan_is_never_executed(dep, agents, caplog, write):
    """A copy of plan 1 rewritten as epoch 2 under the current leader's name, without
    the leader's transaction (or by another leader): never executed, the epoch does not
    move, one ERROR per revision however often the agent looks; the next genuine plan
    runs."""
    a = make_agent(dep, agents)
    a.register()
    plan1 = bootstrap(1, [a.token])
    dep.publish(plan1)
    assert a.poll_once() == "acked"
    replay = PlanRecord(2, LEADER, plan1.old_members, plan1.new_members, plan1.plan, plan1.placement)
    with caplog.at_level(logging.INFO, logger=LOG):
        write(dep, replay)
        results = {a.poll_once() for _ in range(20)}
    assert results == {"idle"} and len(a.recorder.loads) == 1, "a replayed plan was executed"
    assert a.last_epoch == 1 and a.epochs_seen == [1]
    refused = errors_about(caplog, "refusing")
    assert len(refused) == 1 and "epoch 2" in refused[0], refused
    dep.publish(bootstrap(3, [a.token]))
    assert a.poll_once() == "acked" and a.epochs_seen == [1, 3]


def test_a_plan_in_flight_survives_a_change_of_leader(dep, agents):
    """The leader published epoch 1 and died; a successor holds the leader key now. The
    plan is still the one the fenced write published, so the agent executes it (the
    successor adopts the plan in flight and waits for its acks)."""
    a = make_agent(dep, agents)
    a.register()
    dep.publish(bootstrap(1, [a.token]))
    dep.client.delete(dep.key("leader"))
    dep.client.put(dep.key("leader"), "ctl-successor")
    assert a.poll_once() == "acked" and a.epochs_seen == [1]
    dep.client.put(dep.key("leader"), LEADER)


# -- 3. success means bit-exact, and a source must hold plan.old -----------------------------
def test_an_ack_with_mismatched_slots_is_a_failure_and_fences(dep, agents):
    a = make_agent(dep, agents, verify=lambda placement, rank: 2)
    a.register()
    first = a.token
    dep.publish(bootstrap(1, [first]))
    assert a.poll_once() == "failed"
    ack = dep.ack("r0", 1)
    assert ack is not None and not ack.ok and ack.mismatched == 2 and "bit-exact" in ack.error, ack
    assert a.holding is None and a.state is AgentState.FENCED, "slots that are not bit-exact are not served"
    assert a.poll_once() == "re-registered" and a.token != first and a.holding is None


def _two_rank_start(dep: Deployment, a: RankAgent) -> PlanRecord:
    """``a`` as rank 0 of a committed 2-rank bootstrap (rank 1 a member that never runs)."""
    boot = bootstrap(1, [a.token, "ghost#0000"])
    dep.publish(boot)
    assert a.poll_once() == "acked"
    dep.commit(boot)
    assert a.poll_once() == "committed as rank 0" and a.holding is not None
    return boot


def test_an_old_rank_that_does_not_hold_plan_old_sends_nothing_and_needs_refill(dep, agents):
    a = make_agent(dep, agents)
    a.register()
    boot = _two_rank_start(dep, a)
    held = boot.placement
    # What the plan believes rank 0 holds: two of its slots swapped in layer 0.
    phy = held.phy2log.copy()
    phy[0, [0, 1]] = phy[0, [1, 0]]
    believed = ExpertPlacement(phy, SLOTS, EXPERTS)
    new = ExpertPlacement(held.phy2log[:, ::-1].copy(), SLOTS, EXPERTS)
    plan = build_plan(believed, new, RankMapping.build(2), SPEC.expert_bytes, epoch=2)
    dep.publish(PlanRecord(2, LEADER, boot.new_members, boot.new_members, plan, new, "test rebalance"))
    token = a.token
    assert a.poll_once() == "failed"
    assert a.recorder.executed == [], "a rank that does not hold plan.old must not execute (nor send) anything"
    ack = dep.ack("r0", 2)
    assert ack is not None and not ack.ok and "needs a refill" in ack.error and "2 of 8 slots" in ack.error, ack
    assert a.holding is None and a.state is AgentState.FENCED
    assert a.poll_once() == "re-registered" and a.token != token, "it comes back as a new member"
    assert a.holding is None


@pytest.mark.parametrize("defect", ["forged", "missing"])
def test_a_chunk_missing_or_failing_its_digest_fails_the_plan_before_anything_runs(dep, agents, defect):
    a = make_agent(dep, agents)
    a.register()
    boot = _two_rank_start(dep, a)
    new = ExpertPlacement(boot.placement.phy2log[:, ::-1].copy(), SLOTS, EXPERTS)
    plan = build_plan(boot.placement, new, RankMapping.build(2), SPEC.expert_bytes, epoch=2)
    head = dep.publish(PlanRecord(2, LEADER, boot.new_members, boot.new_members, plan, new, "test rebalance"))
    key = head.prefix(dep.root) + plan_chunks.part_name(0)
    assert dep.client.get(key)[0] is not None, "rank 0 has a part"
    if defect == "forged":  # same size, other bytes: what a writer without the fence could put there
        raw = bytearray(dep.client.get(key)[0])
        raw[-3] ^= 1
        dep.client.put(key, bytes(raw))
    else:
        dep.client.delete(key)
    assert a.poll_once() == "failed"
    assert a.recorder.executed == [], "nothing of the plan may run"
    ack = dep.ack("r0", 2)
    want = "not the leader's chunk" if defect == "forged" else "is missing"
    assert ack is not None and not ack.ok and want in ack.error, ack
    assert a.holding is None and a.state is AgentState.FENCED


def test_an_old_rank_that_holds_plan_old_executes(dep, agents):
    a = make_agent(dep, agents)
    a.register()
    boot = _two_rank_start(dep, a)
    new = ExpertPlacement(boot.placement.phy2log[:, ::-1].copy(), SLOTS, EXPERTS)
    plan = build_plan(boot.placement, new, RankMapping.build(2), SPEC.expert_bytes, epoch=2)
    dep.publish(PlanRecord(2, LEADER, boot.new_members, boot.new_members, plan, new, "test rebalance"))
    assert a.poll_once() == "acked" and a.recorder.executed == [(2, 0)]
    assert a.holding is not None and a.holding[0] == new


# -- 4. one live process per rank id ---------------------------------------------------------
def test_a_second_process_with_a_live_id_is_refused(dep, agents):
    a = make_agent(dep, agents)
    a.register()
    dep.publish(bootstrap(1, [a.token]))
    assert a.poll_once() == "acked"
    b = make_agent(dep, agents)
    with pytest.raises(DuplicateRankError, match=r"rank id 'r0': .*ranks/r0 is held by another live registration "
                                          rf"\(incarnation {a.incarnation} of pid {os.getpid()}"):
        b.register()
    assert b.poll_once() == "refused: duplicate id" and b.state is AgentState.NEW
    assert dep.registered("r0").incarnation == a.incarnation, "the live rank keeps its key"
    # The load window goes under the lease: it disappears with the registration.
    a.load_window, a.cfg.load_period_s = (lambda: np.ones((LAYERS, EXPERTS))), 0.0
    a.publish_load()
    _, meta = dep.get("load/r0")
    assert meta is not None and meta.lease_id == a.lease.id
    # The second process keeps trying, with backoff, and gets the id once the first is gone.
    stop = threading.Event()
    t = threading.Thread(target=b.run, args=(stop,), daemon=True)
    t.start()
    try:
        time.sleep(0.8)
        assert b.state is AgentState.NEW and dep.registered("r0").incarnation == a.incarnation
        a.stop()
        a.client.revoke_lease(a.lease.id)  # the first process dies; its lease goes
        assert dep.get("load/r0")[0] is None, "the load key went with the lease"
        _wait(lambda: b.state is AgentState.JOINING, 10, "the second process to register once the id is free")
        assert dep.registered("r0").incarnation == b.incarnation
    finally:
        stop.set()
        t.join(5)


def test_an_evicted_rank_stops_serving_and_waits_for_its_id(dep, agents, caplog):
    a = make_agent(dep, agents)
    a.register()
    dep.publish(bootstrap(1, [a.token]))
    assert a.poll_once() == "acked" and a.holding is not None
    # Another registration took the key (a buggy process that evicted this one).
    lease = dep.client.lease(30)
    other = RankRecord("r0", "elsewhere", "cpu", "", "joining", {}, 4242, "intruder")
    dep.client.put(dep.key("ranks/r0"), other.to_json(), lease=lease)
    with caplog.at_level(logging.INFO, logger=LOG):
        assert a.poll_once() == "refused: duplicate id"
        assert a.holding is None and a.state is AgentState.FENCED, "an evicted rank must stop serving"
        results = polls(a, 1.2)
    assert set(results) <= {"backing off", "refused: duplicate id"} and a.holding is None
    tries = results.count("refused: duplicate id") + 1
    print(f"{tries} registration attempts in 1.2 s")
    assert 2 <= tries <= 5, f"{tries} registration attempts in 1.2 s: the retries must back off"
    assert dep.registered("r0").incarnation == "intruder", "an evicted rank never takes the key back"
    dep.client.revoke_lease(lease.id)
    _wait(lambda: a.poll_once() == "re-registered", 10, "the rank to register again once the id is free")
    assert a.state is AgentState.JOINING and a.holding is None
    assert dep.registered("r0").incarnation == a.incarnation


@pytest.mark.parametrize("value, leased", [(b"\xff not a record", True), (None, False)],
                         ids=["garbage-under-a-lease", "record-without-a-lease"])
def test_a_key_no_live_process_holds_is_taken_back(dep, agents, value, leased):
    """The rank's own key overwritten with garbage, or with a record no lease keeps
    alive: no live process holds it, so the rank fences and registers again at once."""
    a = make_agent(dep, agents)
    a.register()
    first = a.token
    lease = dep.client.lease(30) if leased else None
    stale = RankRecord("r0", "elsewhere", "cpu", "", "active", {}, 4242, "stale").to_json()
    dep.client.put(dep.key("ranks/r0"), value if value is not None else stale, lease=lease)
    assert a.poll_once() == "re-registered" and a.token != first
    assert dep.registered("r0").incarnation == a.incarnation and dep.get("ranks/r0")[1].lease_id == a.lease.id
    if lease is not None:
        dep.client.revoke_lease(lease.id)


# -- 5. a lease not refreshed within its TTL fences ------------------------------------------
def test_a_lease_not_refreshed_within_its_ttl_stops_serving(agents):
    """etcd goes away for longer than the TTL: the rank stops serving at the TTL, and
    after etcd is back it registers again as a new member holding nothing (it does not
    serve its old placement until a plan refills it)."""
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        dep = Deployment(srv.endpoint, "lease")
        a = make_agent(dep, agents, ttl=2)
        a.register()
        dep.publish(bootstrap(1, [a.token]))
        assert a.poll_once() == "acked" and a.holding is not None
        first = a.token
        stop = threading.Event()
        t = threading.Thread(target=a.run, args=(stop,), daemon=True)
        t.start()
        try:
            time.sleep(0.5)  # a refresh or two succeed
            t0 = time.monotonic()
            srv.stop()
            _wait(lambda: a.holding is None, 5, "the rank to stop serving")
            stopped = time.monotonic() - t0
            print(f"serving stopped {stopped:.2f} s after etcd went away (TTL 2 s)")
            assert stopped <= 2.0 + 0.3, "serving must stop no later than the TTL"
            time.sleep(max(0.0, 3.0 - stopped))
            srv.start()
            _wait(lambda: a.state is AgentState.JOINING and a.token != first, 30, "registration after etcd is back")
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert a.holding is None, "a re-registered rank serves nothing until a plan refills it"
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(10)
            dep.client.close()


# -- 6. a checkpoint that does not fit, and failures that repeat -----------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


def _truncate_last_shard(directory: str) -> str:
    shard = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[-1]
    path = os.path.join(directory, shard)
    os.truncate(path, os.path.getsize(path) // 2)
    return path


@pytest.mark.parametrize("defect", ["hidden-128", "truncated-shard"])
def test_a_checkpoint_that_does_not_fit_never_registers(dep, ckpt, tmp_path, defect):
    spec, directory = SPEC, ckpt
    if defect == "hidden-128":
        spec = dataclasses.replace(SPEC, hidden=128)
    else:
        directory = str(tmp_path / "ckpt")
        shutil.copytree(ckpt, directory)
        _truncate_last_shard(directory)
    agent, _ = build_rank_agent(SyntheticRank(dep.cfg, "r9", directory, spec, SLOTS, lease_ttl_s=2))
    stop = threading.Event()
    threading.Timer(5.0, stop.set).start()  # bounds the run should it register
    try:
        with pytest.raises(CheckpointError) as e:
            agent.run(stop)
    finally:
        stop.set()
        agent.executor.transport.close()
    print(f"refused: {e.value}")
    assert ("expects BF16 [32, 128]" if defect == "hidden-128" else "truncated") in str(e.value)
    assert agent.state is AgentState.NEW and dep.get("ranks/r9")[0] is None, "it must never register"


def test_a_shard_truncated_while_running_keeps_the_rank_out(dep, ckpt, tmp_path, caplog):
    """The shard is cut after the rank registered: its bootstrap fails, and the rank
    does not register again (its checkpoint is checked first) until the file is whole."""
    directory = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, directory)
    agent, _ = build_rank_agent(SyntheticRank(dep.cfg, "r9", directory, SPEC, EXPERTS, lease_ttl_s=2))
    try:
        agent.register()
        path = _truncate_last_shard(directory)
        dep.publish(bootstrap(1, [agent.token]))
        with caplog.at_level(logging.INFO, logger=LOG):
            assert agent.poll_once() == "failed"
            ack = dep.ack("r9", 1)
            assert ack is not None and not ack.ok and "truncated" in ack.error, ack
            results = polls(agent, 1.2)
        print(f"{results.count('refused: checkpoint')} checks of the checkpoint in 1.2 s")
        assert "re-registered" not in results and dep.get("ranks/r9")[0] is None
        assert agent.state is AgentState.FENCED and agent.holding is None
        assert 1 <= results.count("refused: checkpoint") <= 5, results
        assert any("checkpoint does not fit" in m and "truncated" in m for m in errors_about(caplog, path))
        shutil.copy(os.path.join(ckpt, os.path.basename(path)), path)  # the file is whole again
        _wait(lambda: agent.poll_once() == "re-registered", 10, "registration once the checkpoint is whole")
    finally:
        agent.stop()
        if agent.lease is not None:
            agent.client.revoke_lease(agent.lease.id)
        agent.executor.transport.close()


def test_repeated_plan_failures_back_off_exponentially(dep, agents):
    """A rank whose every plan fails re-registers at once after the first failure, then
    waits 0.1, 0.2, 0.4 s (retry_s=0.1, doubling): it cannot churn epochs."""
    a = make_agent(dep, agents, rec=Recorder(fail=True))
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,), daemon=True)
    t.start()
    gaps, tokens = [], set()
    try:
        failed_at = None
        for epoch in range(1, 6):
            _wait(lambda: a.state is AgentState.JOINING and a.token not in tokens, 10, f"registration {epoch}")
            if failed_at is not None:
                gaps.append(time.monotonic() - failed_at)
            tokens.add(a.token)
            dep.publish(bootstrap(epoch, [a.token]))
            _wait(lambda: dep.ack("r0", epoch), 10, f"the failed ack of epoch {epoch}")
            failed_at = time.monotonic()
    finally:
        stop.set()
        t.join(5)
    print("waits before registering again:", [round(g, 3) for g in gaps])
    assert gaps[3] >= 0.35 and gaps[2] >= 0.15 and gaps[3] > gaps[0] + 0.2, gaps


# -- 7. no value in etcd stops an agent -------------------------------------------------------
HOSTILE = [
    ("plan", b"\xff\xfe\x00 not json"),
    ("plan", b"[" * 200_000),
    ("plan", b'{"schema": 1, "epoch": 1e400, "leader": "ctl-a"}'),
    ("plan", json.dumps({"schema": 1, "epoch": 9, "leader": LEADER, "old_members": [], "new_members": [[]],
                         "plan": None, "placement": {"phy2log": "x"}}).encode()),
    ("committed", b"{"),
    ("committed", b"[" * 200_000),
    ("committed", json.dumps({"schema": 1, "epoch": 10**30, "members": [], "placement": {}}).encode()),
    ("leader", b"\xff" * 8),
    ("leader", b"x" * 100_000),
    ("epoch", b"-1"),
    ("epoch", b"9" * 5000),
    ("epoch", b"1e3"),
]


@pytest.mark.parametrize("name, value", HOSTILE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(HOSTILE)])
def test_no_value_stops_an_agent(dep, agents, caplog, name, value):
    a = make_agent(dep, agents)
    a.register()
    boot = bootstrap(1, [a.token])
    dep.publish(boot)
    assert a.poll_once() == "acked"
    dep.commit(boot)
    assert a.poll_once() == "committed as rank 0" and a.state is AgentState.ACTIVE
    before = dep.get(name)[0]
    with caplog.at_level(logging.INFO, logger=LOG):
        dep.client.put(dep.key(name), value)
        results = {a.poll_once() for _ in range(20)}
        # A newer plan is refused while the leader or epoch key is bad.
        if name in ("leader", "epoch"):
            dep.publish(bootstrap(2, [a.token]), fenced=False)
            dep.client.put(dep.key(name), value)
            results |= {a.poll_once() for _ in range(20)}
    assert results == {"idle"} and a.state is AgentState.ACTIVE and a.holding is not None, results
    assert len(errors_about(caplog, f"{dep.root}/{name}")) <= 2, "a bad value is logged once per revision"
    dep.client.put(dep.key(name), before)
    dep.publish(bootstrap(3, [a.token]))
    assert a.poll_once() == "acked", "the agent acts on the next genuine plan"


def test_the_run_loop_outlives_bad_values_and_failing_passes(dep, agents, caplog):
    """``run`` with every key the leader writes hostile at once, and a commit callback
    that raises: the loop logs, backs off, and executes the next genuine plan."""
    calls = []

    def on_commit(placement: ExpertPlacement, rank: int) -> None:
        calls.append(rank)
        raise RuntimeError("the engine refused the placement (test)")

    a = make_agent(dep, agents, on_commit=on_commit)
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,), daemon=True)
    t.start()
    try:
        _wait(lambda: a.state is AgentState.JOINING, 10, "registration")
        boot = bootstrap(1, [a.token])
        dep.publish(boot)
        _wait(lambda: dep.ack("r0", 1), 10, "the bootstrap ack")
        with caplog.at_level(logging.INFO, logger=LOG):
            dep.commit(boot)
            _wait(lambda: calls, 10, "the commit callback")
            for name, value in (("plan", b"[" * 200_000), ("committed", b"\x00"), ("leader", b"\xff"),
                                ("epoch", b"nope")):
                dep.client.put(dep.key(name), value)
            time.sleep(0.5)
        assert t.is_alive() and a.state is AgentState.ACTIVE
        assert any("agent pass failed" in r.getMessage() for r in caplog.records), "the failing pass is logged"
        dep.client.put(dep.key("leader"), LEADER)
        dep.publish(bootstrap(2, [a.token]))
        _wait(lambda: dep.ack("r0", 2), 10, "the ack of the next genuine plan")
    finally:
        stop.set()
        t.join(5)


def test_routing_around_dead_members_reaches_the_engine_and_a_forged_one_hides_no_live_rank(dep, agents):
    a = make_agent(dep, agents)
    got: list[tuple[int, list[int]]] = []
    a.on_routing = lambda placement, rank, dead: got.append((rank, dead))
    a.register()
    b = make_agent(dep, agents, "r1")
    b.register()
    boot = bootstrap(1, [a.token, b.token, "ghost#0000", "ghost2#0000"])
    dep.publish(boot)
    assert a.poll_once() == "acked" and b.poll_once() == "acked"
    dep.commit(boot)
    assert a.poll_once() == "committed as rank 0"
    # A routing record naming r1, which is registered: refused.
    dep.client.put(dep.key("routing"), RoutingRecord(1, [b.token]).to_json())
    assert a.poll_once() == "idle" and got == []
    # The ghost never registered (a confirmed death): its slots are routed around.
    dep.client.put(dep.key("routing"), RoutingRecord(1, ["ghost#0000"]).to_json())
    assert a.poll_once() == "routing around ranks [2]" and got == [(0, [2])]
    assert a.poll_once() == "idle" and len(got) == 1, "once per value"
    masked = boot.placement.masked([2])
    assert (masked.phy2log[:, 4:6] == -1).all() and (masked.phy2log[:, :4] == boot.placement.phy2log[:, :4]).all()
    assert masked.logcnt.sum() == boot.placement.logcnt.sum() - 2 * LAYERS
