"""The control plane against a real etcd server: bootstrap, SIGKILL of a rank, graceful
leave, leader fencing, malformed and hostile values, ack deadlines, an unreachable etcd."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from controller.controller import Controller, ControllerConfig, ModelShape
from controller.decide import Kind
from controller.etcd_client import EtcdConfig, connect
from elastic_ep.tools.etcd_server import EtcdServer, free_port
from elastic_ep.tools.invariants import check_commit, require
from controller import plan_chunks
from controller.records import AckRecord, CommitRecord, PlanRecord, RankRecord, member_id
from controller.store import EtcdStore
from controller.view import read_view
from elastic_ep.core.placement import initial_placement
from elastic_ep.errors import EpochMovedError, EtcdUnavailableError, MalformedValueError, NotLeaderError
from elastic_ep.tools.polling import wait_for
from elastic_ep.tools.synthetic_rank import SyntheticRank, run_agent
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint
from tests.procs import read_committed

SPEC = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=3)
SLOTS = 4


@pytest.fixture
def etcd():
    with EtcdServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


def _cfg(srv: EtcdServer, deployment: str = "t") -> EtcdConfig:
    return EtcdConfig(srv.endpoint, deployment=deployment, timeout_s=2.0)


def _controller(srv, cid="ctl-a", min_ranks=3, **kw) -> Controller:
    return Controller(ControllerConfig(_cfg(srv), ModelShape(SPEC.layers, SPEC.experts, SLOTS, SPEC.expert_bytes),
                                       id=cid, min_ranks=min_ranks, settle_s=0.3, leader_ttl_s=2, **kw))


def _spawn_agents(srv, ckpt, ids, transport="torch"):
    ctx = mp.get_context("spawn")
    procs = {}
    for rid in ids:
        rank = SyntheticRank(_cfg(srv), rid, ckpt, SPEC, SLOTS, transport, lease_ttl_s=2)
        p = ctx.Process(target=run_agent, args=(rank,), daemon=True)
        p.start()
        procs[rid] = p
    return procs


def _wait(pred, timeout: float, what: str, poll: float = 0.05):
    v = wait_for(pred, timeout, poll)
    assert v, f"timed out after {timeout} s waiting for {what}"
    return v


def _register(client, root: str, rid: str, inc: str = "a", state: str = "active", ttl: int = 60) -> int:
    """Put rank ``rid``'s registration under a fresh lease (not kept alive: ``ttl``
    outlasts the test); its lease id."""
    lease = client.lease(ttl)
    client.put(f"{root}/ranks/{rid}", RankRecord(rid, "h", "cpu", "n0", state, incarnation=inc).to_json(), lease=lease)
    return lease.id



def _acks(client, root, epoch) -> list[AckRecord]:
    acks = [AckRecord.parse(m.key.decode(), v) for v, m in client.get_prefix(f"{root}/acks/")]
    return [a for a in acks if a.epoch == epoch]


@pytest.fixture
def cluster(etcd, ckpt):
    """A leader controller in a thread and 3 agent processes, bootstrapped."""
    ctl = _controller(etcd)
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    procs = _spawn_agents(etcd, ckpt, ["r0", "r1", "r2"])
    client = connect(_cfg(etcd))
    root = _cfg(etcd).root
    try:
        c = _wait(lambda: read_committed(client, root), 90, "bootstrap commit")
        yield ctl, procs, client, root, c
    finally:
        stop.set()
        t.join(10)
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)


def _check_invariants(client, root, c: CommitRecord) -> None:
    """The invariants of docs/DESIGN.md on the deployment as committed at ``c``."""
    v = read_view(client, root, whole_plan=True, loads=True)
    assert v.committed is not None and v.committed.epoch == c.epoch, (v.committed, c.epoch)
    require(check_commit(v))


def test_bootstrap_then_sigkill_recovers(cluster):
    ctl, procs, client, root, c1 = cluster
    assert len(c1.members) == 3
    _check_invariants(client, root, c1)
    victim = c1.members[1].split("#")[0]
    t0 = time.monotonic()
    os.kill(procs[victim].pid, signal.SIGKILL)
    c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, 60, "recovery commit")
    print(f"recovered in {time.monotonic() - t0:.2f} s; phases {c2.phases}; bytes {c2.bytes}")
    assert len(c2.members) == 2 and all(not m.startswith(victim + "#") for m in c2.members)
    _check_invariants(client, root, c2)
    # Experts only on the victim came from disk; everything else from peers or locally.
    plan = plan_chunks.load_plan(client, root, PlanRecord.parse("plan", client.get(f"{root}/plan")[0]))
    missing = sum(len(m) for m in plan.plan.missing)
    assert c2.bytes.get("disk", 0) >= missing * SPEC.expert_bytes
    assert {"detect", "plan", "transfer"} <= set(c2.phases)


def test_graceful_leave_and_join(cluster, etcd, ckpt):
    ctl, procs, client, root, c1 = cluster
    # A new rank joins: a scale-up plan fills it from peers.
    procs.update(_spawn_agents(etcd, ckpt, ["r3"]))
    c2 = _wait(lambda: (c := read_committed(client, root)) and len(c.members) == 4 and c, 60, "scale-up commit")
    _check_invariants(client, root, c2)
    assert c2.bytes.get("peer", 0) > 0 and c2.bytes.get("disk", 0) == 0
    # r0 drains: set its state; it sends, then deletes its key after the commit.
    key = f"{root}/ranks/r0"
    rec = json.loads(client.get(key)[0])
    rec["state"] = "draining"
    lease_id = client.get(key)[1].lease_id
    client.put(key, json.dumps(rec), lease=lease_id)
    c3 = _wait(lambda: (c := read_committed(client, root)) and len(c.members) == 3 and c, 60, "scale-down commit")
    _check_invariants(client, root, c3)
    assert c3.bytes.get("disk", 0) == 0, "a drained rank's experts must come from it, not disk"


def test_stale_leader_publish_refused(etcd):
    a = _controller(etcd, "ctl-a", min_ranks=1)
    b = _controller(etcd, "ctl-b", min_ranks=1)
    assert a.election.campaign() and not b.election.campaign()
    rec = PlanRecord(1, "ctl-a", [], ["x#1"], None, initial_placement(SPEC.layers, SPEC.experts, 2, SLOTS), "test")
    # a's lease is lost (as after a long pause); b takes over.
    a.client.revoke_lease(a.election.lease.id)
    assert _wait(lambda: b.election.campaign(), 10, "b to win")
    with pytest.raises(NotLeaderError, match="ctl-a lost leadership"):
        a.publish(rec, 0)
    assert not a.election.is_leader()
    b.publish(PlanRecord(1, "ctl-b", [], rec.new_members, None, rec.placement, "test"), 0)
    # b cannot publish on a stale epoch either; it learns that the epoch moved, and
    # keeps leading.
    with pytest.raises(EpochMovedError, match="moved since it was read"):
        b.publish(PlanRecord(1, "ctl-b", [], rec.new_members, None, rec.placement, "test"), 0)
    assert b.election.is_leader()
    b.election.resign()


def test_etcd_store_keys_of_one_plan(etcd):
    """A plan's store keys sit under ``<root>/store/<epoch>/`` once, and the commit's
    cleanup of ``<root>/store/`` removes them."""
    client = connect(_cfg(etcd))
    root = _cfg(etcd).root
    store = EtcdStore(client, root, timeout_s=5, scope="7")
    store.set("exec/hb/0", b"1")
    assert store.add("exec/hb/0", 2) == 3 and store.check(["exec/hb/0"]) and not store.check(["exec/hb/1"])
    keys = [m.key.decode() for _, m in client.get_prefix(f"{root}/store/")]
    assert keys == [f"{root}/store/7/exec/hb/0"], keys


def test_malformed_values_reported_not_fatal(etcd):
    ctl = _controller(etcd, min_ranks=5)
    root = ctl.root
    ctl.client.put(f"{root}/ranks/bad", "{not json")
    ctl.client.put(f"{root}/ranks/wrong", json.dumps({"schema": 1, "id": "wrong", "host": "h", "device": "cpu", "node": "", "state": "zombie"}))
    ctl.client.put(f"{root}/plan", json.dumps({"schema": 99}))
    assert ctl.election.campaign()
    action = ctl.step()
    assert action.kind is Kind.WAIT_BOOTSTRAP and action.ranks == (), action
    v = ctl.view()
    assert len(v.malformed) == 3 and any("zombie" in m for m in v.malformed) and any("schema 99" in m for m in v.malformed)
    ctl.election.resign()


def test_step_acts_on_each_decision(etcd):
    """Ranks and acks written by hand: each pass's action, and what it wrote to etcd."""
    ctl = _controller(etcd, min_ranks=3)
    root, client = ctl.root, ctl.client
    for rid in ("r0", "r1", "r2"):
        _register(client, root, rid)
    assert ctl.election.campaign()

    def ack_all(epoch: int, members: list[str]) -> None:
        for m in members:
            client.put(f"{root}/acks/{m.split('#')[0]}", AckRecord(epoch, m, True, {"peer": 10}).to_json())

    try:
        assert ctl.step().kind is Kind.WAIT_BOOTSTRAP
        time.sleep(0.3)
        boot = ctl.step()
        assert boot.kind is Kind.BOOTSTRAP and ctl.view().plan.epoch == 1 and ctl.view().epoch == 1
        assert ctl.step().kind is Kind.WAIT_ACKS
        ack_all(1, boot.record.new_members)
        assert ctl.step().kind is Kind.COMMIT and read_committed(client, root).epoch == 1
        assert ctl.step().kind is Kind.STEADY
        client.delete(f"{root}/ranks/r1")  # r1's lease expired
        assert ctl.step().kind is Kind.SETTLING
        time.sleep(0.3)
        pub = ctl.step()
        assert pub.kind is Kind.PUBLISH and pub.epoch == 2 and ctl.view().plan.new_members == pub.record.new_members
        ack_all(2, pub.record.participants())
        assert ctl.step().kind is Kind.COMMIT
        c = read_committed(client, root)
        assert c.epoch == 2 and len(c.members) == 2 and {"detect", "plan", "transfer"} <= set(c.phases)
        assert c.phases["detect"] >= 0.3 and c.bytes == {"peer": 20}
        assert 'elastic_ep_epoch 2.0' in ctl.metrics.text().decode()
    finally:
        ctl.election.resign()


def test_unreachable_etcd_is_typed():
    with pytest.raises(EtcdUnavailableError, match="unreachable|UNAVAILABLE|DEADLINE"):
        connect(EtcdConfig(f"127.0.0.1:{free_port()}", timeout_s=1.0))


def test_imbalance_triggers_rebalance_without_membership_change(etcd, ckpt):
    """Ranks publish a skewed load; a controller with a balance threshold rebalances the
    committed placement in place (same ranks, identity mapping), bit-exact."""
    ctl = _controller(etcd, min_ranks=2, imbalance_threshold=0.99, rebalance_cooldown_s=0.0)
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    procs = _spawn_agents(etcd, ckpt, ["r0", "r1"])
    client = connect(_cfg(etcd))
    root = _cfg(etcd).root
    try:
        c1 = _wait(lambda: read_committed(client, root), 90, "bootstrap commit")
        # The bootstrap used a uniform load (no windows yet); the agents' skewed windows
        # arrive within load_period_s and push balance below 0.99.
        c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, 60, "rebalance commit")
        plan = PlanRecord.parse("plan", client.get(f"{root}/plan")[0])
        assert plan.mapping.is_identity and "imbalance" in plan.reason
        assert c2.members == c1.members
        _check_invariants(client, root, c2)
    finally:
        stop.set()
        t.join(10)
        for p in procs.values():
            p.kill()
            p.join(5)


def test_metrics_and_health_endpoint():
    import urllib.request

    from controller.metrics import ControllerMetrics, serve

    m = ControllerMetrics()
    m.epoch.set(7)
    m.bytes.labels(route="peer").inc(1024)
    srv = serve(m, "127.0.0.1", 0, stale_s=0.5)
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert "elastic_ep_epoch 7.0" in body and 'elastic_ep_transfer_bytes_total{route="peer"} 1024.0' in body
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        time.sleep(0.6)  # no reconcile pass since: stale
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
    finally:
        srv.shutdown()


def test_standby_controller_stays_healthy(etcd):
    """Two replicas, one leader: both answer /healthz 200 for longer than the stale
    window (a liveness probe must not restart the standby), and only one leads."""
    import urllib.request

    from controller.metrics import serve

    ctls = [_controller(etcd, cid) for cid in ("ctl-a", "ctl-b")]
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in ctls]
    servers = [serve(c.metrics, "127.0.0.1", 0, stale_s=1.0) for c in ctls]
    try:
        for t in threads:
            t.start()
        _wait(lambda: sum(c.election.is_leader() for c in ctls) == 1, 15, "one leader")
        deadline = time.monotonic() + 3.0  # three stale windows
        while time.monotonic() < deadline:
            for s in servers:
                assert urllib.request.urlopen(f"http://127.0.0.1:{s.server_port}/healthz", timeout=5).status == 200
            time.sleep(0.2)
        assert sum(c.election.is_leader() for c in ctls) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for s in servers:
            s.shutdown()


# -- hostile values, ack deadlines, bounded plans: a live controller and hand-written ranks --
class HandRanks:
    """Ranks written by hand, each under its own lease, and a thread that acks every plan
    they take part in as agents do (ok, bit-exact): the rank protocol without weights,
    so a live controller can be driven in a second."""

    def __init__(self, client, root: str, ids: list[str]) -> None:
        self.client, self.root = client, root
        self.leases = {rid: _register(client, root, rid) for rid in ids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ack_once(self, acked: set) -> None:
        v, _ = self.client.get(f"{self.root}/plan")
        if v is None:
            return
        try:
            rec = PlanRecord.parse("plan", v)
        except MalformedValueError:
            return
        for m in rec.participants():
            if member_id(m) in self.leases and (rec.epoch, m) not in acked:
                self.client.put(f"{self.root}/acks/{member_id(m)}", AckRecord(rec.epoch, m, True, mismatched=0).to_json())
                acked.add((rec.epoch, m))

    def _run(self) -> None:
        acked: set = set()
        while not self._stop.wait(0.05):
            with contextlib.suppress(Exception):  # etcd hiccups: the next look tries again
                self._ack_once(acked)

    def kill(self, rid: str) -> None:
        """Rank ``rid`` dies: its lease goes, and with it its key."""
        self.client.revoke_lease(self.leases.pop(rid))

    def __enter__(self) -> "HandRanks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def _running(ctl: Controller):
    """``ctl.run`` in a thread; on exit, checks that the loop was still alive."""
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    try:
        yield t
        assert t.is_alive(), "the controller loop ended"
    finally:
        stop.set()
        t.join(10)


def _sample(ctl: Controller, name: str) -> float:
    return ctl.metrics.registry.get_sample_value(name) or 0.0


HOSTILE = [  # (key, raw value, under a lease): what a rank's credentials (or a buggy rank) wrote
    ("acks/r0", '{"schema": 1, "epoch": 1, "id": "r0#a", "ok": true, "mismatched": "x"}', False),
    ("acks/r0", '{"schema": 1, "epoch": 1, "id": "r0#a", "ok": true, "mismatched": null}', False),
    ("acks/r0", '{"schema": 1, "epoch": 1, "id": "r0#a", "ok": true, "mismatched": 1e400}', False),
    ("load/r1", '{"schema": 1, "id": "r1", "load": [[1], [1, 2]], "window_s": 1}', False),
    ("load/r1", '{"schema": 1, "id": "r1", "load": [%s], "window_s": 1}' % ",".join(["[1e400" + ", 1" * 7 + "]"] * 2),
     False),
    ("ranks/r8", "[" * 100_000, True),
    ("ranks/r9", '{"a":' * 50_000, False),
    ("plan", '{"schema": 1, "epoch": 1, "leader": "ctl-a", "old_members": [], "new_members": ["r0#a"], "plan": null, '
             '"placement": {"slots_per_rank": 4, "num_logical": 8, "phy2log": [[%d, 1e400, 0, 0]]}}' % 10**30, False),
]


def test_hostile_values_never_stop_the_controller(etcd):
    """Every value that once killed controllers, written while one leads: it keeps
    leading, reports each value, ``elastic-ep status`` still answers, and the next
    membership change is planned and committed (a 1e400 load no longer poisons plans)."""
    from elastic_ep.tools.cli import status

    ctl = _controller(etcd, min_ranks=3)
    client, root = ctl.client, ctl.root
    with _running(ctl), HandRanks(client, root, ["r0", "r1", "r2"]) as ranks:
        c1 = _wait(lambda: read_committed(client, root), 30, "bootstrap commit")
        lease = client.lease(60)
        for key, raw, leased in HOSTILE:
            client.put(f"{root}/{key}", raw, lease=lease if leased else None)
            time.sleep(0.2)  # a pass or two on each
        assert ctl.election.is_leader()
        assert _sample(ctl, "elastic_ep_malformed_values_total") >= len({k for k, _, _ in HOSTILE}) - 1
        assert status(_cfg(etcd))["malformed"], "status reports, never fails"
        ranks.kill("r2")
        c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, 30, "commit after r2 died")
        assert c2.members == ["r0#a", "r1#a"] and ctl.election.is_leader()
        assert _sample(ctl, "elastic_ep_reconcile_errors_total") == 0


def test_malformed_value_logged_once_per_key_and_revision(etcd, caplog):
    ctl = _controller(etcd, min_ranks=5)
    client, root = ctl.client, ctl.root
    assert ctl.election.campaign()
    caplog.set_level(logging.ERROR, logger="controller.controller")
    try:
        client.put(f"{root}/ranks/r1", '{"schema": 1, "id": "r1", "state": 1e400}')
        for _ in range(3):
            ctl.step()
        client.put(f"{root}/ranks/r1", '{"schema": 1, "id": "r1", "state": NaN}')  # a new bad value, same key
        for _ in range(3):
            ctl.step()
        logged = [r.getMessage() for r in caplog.records if "ranks/r1" in r.getMessage()]
        assert len(logged) == 2 and "not finite" in logged[0] and "NaN" in logged[1], logged
        assert _sample(ctl, "elastic_ep_malformed_values_total") == 2
        assert _sample(ctl, "elastic_ep_malformed_values_now") == 1
    finally:
        ctl.election.resign()


def _bootstrapped(ctl: Controller, ids=("r0", "r1", "r2"), ack: bool = True) -> dict[str, int]:
    """Ranks ``ids`` registered under leases and the bootstrap plan published (and, with
    ``ack``, acked and committed) by hand-driven passes; their leases."""
    client, root = ctl.client, ctl.root
    leases = {rid: _register(client, root, rid) for rid in ids}
    assert ctl.election.campaign()
    assert ctl.step().kind is Kind.WAIT_BOOTSTRAP
    time.sleep(ctl.cfg.settle_s)
    boot = ctl.step()
    assert boot.kind is Kind.BOOTSTRAP, boot
    if ack:
        for m in boot.record.new_members:
            client.put(f"{root}/acks/{member_id(m)}", AckRecord(1, m, True, mismatched=0).to_json())
        assert ctl.step().kind is Kind.COMMIT
    return leases


def test_mismatched_ack_is_neverread_committed(etcd):
    """Bit-exactness is part of success: r2 acks ok with 2 slots wrong. Nothing commits;
    r2 registers again, and the next plan refills its slots without reading from it."""
    ctl = _controller(etcd, min_ranks=3)
    client, root = ctl.client, ctl.root
    try:
        _bootstrapped(ctl, ack=False)
        for rid in ("r0", "r1"):
            client.put(f"{root}/acks/{rid}", AckRecord(1, f"{rid}#a", True, mismatched=0).to_json())
        client.put(f"{root}/acks/r2", AckRecord(1, "r2#a", True, mismatched=2).to_json())
        a = ctl.step()
        assert a.kind is Kind.WAIT_FAILED and a.failed == ("r2#a",) and read_committed(client, root) is None
        _register(client, root, "r2", inc="b", state="joining")  # it fenced itself and registered again
        a = ctl.step()
        assert a.kind is Kind.PUBLISH and a.dead == ("r2#a",) and read_committed(client, root) is None
        plan = plan_chunks.load_plan(client, root, PlanRecord.parse("plan", client.get(f"{root}/plan")[0]))
        assert plan.plan.mapping.dead == {2} and plan.new_members[-1] == "r2#b"
        assert all(s.rank != 2 for t in plan.plan.transfers for s in t.sources)
    finally:
        ctl.election.resign()


def test_ack_timeout_revokes_the_silent_and_plans_without_them(etcd):
    ctl = _controller(etcd, min_ranks=3, ack_timeout_s=0.5)
    client, root = ctl.client, ctl.root
    try:
        leases = _bootstrapped(ctl, ack=False)
        for rid in ("r0", "r1"):
            client.put(f"{root}/acks/{rid}", AckRecord(1, f"{rid}#a", True, mismatched=0).to_json())
        assert ctl.step().kind is Kind.WAIT_ACKS
        time.sleep(0.6)
        a = ctl.step()
        assert a.kind is Kind.ACK_TIMEOUT and a.ranks == ("r2#a",) and a.leases == (leases["r2"],)
        assert client.get(f"{root}/ranks/r2")[0] is None, "the fence: r2's key went with its lease"
        assert _sample(ctl, "elastic_ep_revoked_leases_total") == 1
        a = ctl.step()
        assert a.kind is Kind.PUBLISH and a.dead == ("r2#a",) and a.record.new_members == ["r0#a", "r1#a"]
    finally:
        ctl.election.resign()


def test_leaseless_ranks_are_ignored_and_joiners_capped(etcd):
    """2000 lease-less joining keys once made a 2004-rank plan; now they are reported and
    ignored, and leased joiners enter ``max_joiners_per_plan`` at a time, oldest first."""
    ctl = _controller(etcd, min_ranks=3, max_joiners_per_plan=2)
    client, root = ctl.client, ctl.root
    try:
        _bootstrapped(ctl)
        for i in range(200):
            client.put(f"{root}/ranks/x{i:03d}", RankRecord(f"x{i:03d}", "h", "cpu", "n0", "joining").to_json())
        assert ctl.step().kind is Kind.STEADY
        assert _sample(ctl, "elastic_ep_malformed_values_total") == 200
        for rid in ("j5", "j3", "j9", "j1"):  # registration order, not id order
            _register(client, root, rid, inc="z", state="joining")
        assert ctl.step().kind is Kind.SETTLING
        time.sleep(ctl.cfg.settle_s)
        a = ctl.step()
        assert a.kind is Kind.PUBLISH and a.record.new_members[3:] == ["j3#z", "j5#z"], a.record.new_members
    finally:
        ctl.election.resign()


def test_malformed_epoch_value_does_not_move_leadership(etcd):
    """An ``epoch`` key of ``abc``: the fence compares the key's mod revision, so the
    leader keeps leading and its next publish overwrites the value (max epoch + 1)."""
    ctl = _controller(etcd, min_ranks=3)
    client, root = ctl.client, ctl.root
    with _running(ctl), HandRanks(client, root, ["r0", "r1", "r2"]) as ranks:
        c1 = _wait(lambda: read_committed(client, root), 30, "bootstrap commit")
        client.put(f"{root}/epoch", "abc")
        time.sleep(1.0)
        ranks.kill("r1")
        c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, 30, "commit after r1 died")
        assert c2.epoch == 2 and client.get(f"{root}/epoch")[0] == b"2"
        assert ctl.election.is_leader() and _sample(ctl, "elastic_ep_fenced_writes_total") == 0


def test_controller_started_before_etcd_waits_for_it():
    """A standby started during an etcd outage must not exit: it waits and then leads."""
    srv = EtcdServer()
    ctl = Controller(ControllerConfig(EtcdConfig(srv.endpoint, deployment="t", timeout_s=1.0),
                                      ModelShape(SPEC.layers, SPEC.experts, SLOTS, SPEC.expert_bytes), id="ctl-a",
                                      leader_ttl_s=2))
    assert ctl.client is None and ctl.election is None
    try:
        with _running(ctl) as t:
            time.sleep(1.5)
            assert t.is_alive() and _sample(ctl, "elastic_ep_etcd_unavailable_total") >= 1
            srv.start()
            _wait(lambda: ctl.election is not None and ctl.election.is_leader(), 30, "leadership once etcd is up")
    finally:
        srv.close()
