"""Peer-detected failures against real rank processes: leases are long (30 s) and the
membership settle window too (10 s), so a recovery within the waits below can only
come from peer suspicion confirmed by the controller (a closed liveness connection
reported, then a failed probe or a quorum), fenced by revoking the lease, and settled
in the short confirmed-death window. A rank stopped for less than the stall tolerance
is not removed; one stopped longer is, and comes back as a new member. A rank whose
every watcher died with it is left to its lease."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from controller.controller import Controller, ControllerConfig, ModelShape
from controller.etcd_client import EtcdConfig, connect
from controller.records import member_id
from controller.view import read_view
from elastic_ep.runtime.liveness import monitored_peers
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.polling import wait_until as _wait
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.synthetic_rank import SyntheticRank
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint
from tests.procs import read_committed, running_deployment

SPEC = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=5)
SLOTS, LEASE_S, SETTLE_S = 4, 30, 10.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


@pytest.fixture
def cluster(ckpt):
    """etcd, a controller in this process, and 4 rank processes with 30 s leases."""
    with _running(ckpt, 4, LEASE_S, SETTLE_S, 0.05) as c:
        yield c


def _running(ckpt: str, ranks: int, lease_s: int, settle_s: float, confirm_settle_s: float):
    """:func:`running_deployment` of rank processes r0, r1, ... with ``lease_s`` leases."""
    return running_deployment(SPEC, SLOTS, [f"r{i}" for i in range(ranks)],
                              lambda cfg, rid: SyntheticRank(cfg, rid, ckpt, SPEC, SLOTS, lease_ttl_s=lease_s),
                              settle_s, confirm_settle_s)


def _confirmed(ctl: Controller) -> float:
    return sum(s.value for m in ctl.metrics.confirmed.collect() for s in m.samples if s.name.endswith("_total"))


def test_a_killed_rank_is_confirmed_by_its_peers_and_replaced_long_before_its_lease(cluster):
    ctl, procs, client, root, c1 = cluster
    victim = member_id(c1.members[1])
    t0 = time.monotonic()
    os.kill(procs[victim].pid, signal.SIGKILL)
    c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, LEASE_S / 2,
               "a recovery commit (the lease alone would take 30 s, the settle window 10 s)")
    print(f"kill -> committed {time.monotonic() - t0:.2f} s; phases {c2.phases}")
    assert victim not in {member_id(m) for m in c2.members} and len(c2.members) == 3
    assert _confirmed(ctl) >= 1
    routing = read_view(client, root).routing
    assert routing is not None and routing.epoch == c1.epoch and routing.dead == [c1.members[1]], routing
    require(check_commit(read_view(client, root, whole_plan=True, loads=True)))


def test_a_short_stall_is_tolerated_and_a_long_one_fenced(cluster):
    ctl, procs, client, root, c1 = cluster
    victim = member_id(c1.members[2])
    pid = procs[victim].pid
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.3)  # well under the 1 s stall tolerance
    os.kill(pid, signal.SIGCONT)
    time.sleep(3.0)
    now = read_committed(client, root)
    assert now is not None and now.epoch == c1.epoch and now.members == c1.members, "a short stall evicts no one"
    assert _confirmed(ctl) == 0
    os.kill(pid, signal.SIGSTOP)
    try:
        c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, LEASE_S / 2,
                   "the stalled rank planned out")
        assert victim not in {member_id(m) for m in c2.members}
    finally:
        os.kill(pid, signal.SIGCONT)
    # Resumed, it finds its lease revoked, stops serving and joins again as a new member.
    c3 = _wait(lambda: (c := read_committed(client, root)) and victim in {member_id(m) for m in c.members}
               and c.epoch > c2.epoch and c, 60, "the resumed rank back as a new member")
    old = next(m for m in c1.members if member_id(m) == victim)
    assert old not in c3.members, "it came back under a new incarnation"
    require(check_commit(read_view(client, root, whole_plan=True, loads=True)))


def test_one_reporter_with_a_cut_link_evicts_no_one():
    """Three in-process agents; r0 drops every heartbeat from r1 (a cut link), so r0
    reports r1 silent. One reporter is not a quorum and r1 answers the controller's
    probe: r1 stays a member, and no plan is made."""
    from elastic_ep.runtime.agent import AgentConfig, RankAgent
    from tests.test_agent_hostile import Recorder

    with EtcdServer() as srv:
        cfg = EtcdConfig(srv.endpoint, deployment="cut", timeout_s=2.0)
        ctl = Controller(ControllerConfig(cfg, ModelShape(2, 8, 4, 1024), id="ctl-a", min_ranks=3, settle_s=0.2,
                                          leader_ttl_s=3))
        stop = threading.Event()
        threads = [threading.Thread(target=ctl.run, args=(stop,), daemon=True)]
        agents = []
        for rid in ("r0", "r1", "r2"):
            rec = Recorder()
            a = RankAgent(AgentConfig(cfg, rid, lease_ttl_s=10, stall_tolerance_s=0.3), executor=rec,  # type: ignore[arg-type]
                          load_initial=rec.load_initial, client=connect(cfg))
            agents.append(a)
            threads.append(threading.Thread(target=a.run, args=(stop,), daemon=True))
        agents[0].heartbeat_drop = lambda token: token.startswith("r1#")
        for t in threads:
            t.start()
        client = connect(cfg)
        try:
            c1 = _wait(lambda: read_committed(client, cfg.root), 30, "the bootstrap commit")
            _wait(lambda: agents[0].suspected, 10, "r0's report on r1")
            assert [(member_id(t), k) for t, k, _ in agents[0].suspected] == [("r1", "silent")]
            time.sleep(2.0)  # passes of the controller that see the report
            c = read_committed(client, cfg.root)
            assert c is not None and c.epoch == c1.epoch and c.members == c1.members
            assert _confirmed(ctl) == 0 and client.get(f"{cfg.root}/routing")[0] is None
            assert not agents[1].suspected and not agents[2].suspected
        finally:
            stop.set()
            for a in agents:
                a.stop()
            for t in threads:
                t.join(10)


def test_a_rank_whose_every_watcher_died_with_it_is_removed_by_its_lease(ckpt):
    """A whole node lost: the rank is stopped (a lost node closes no connection) and
    the two ranks that watch it are killed at the same moment. Nobody is left to report
    it; the settle windows (8 s) hold the plan that would give it new watchers, so its
    registration can only go with its 2 s lease: after about the TTL, with no report of
    it and no confirmation but its watchers'. Then the deployment recovers on the two
    ranks left."""
    lease_s, settle_s = 2, 8.0
    with _running(ckpt, 5, lease_s, settle_s, settle_s) as (ctl, procs, client, root, c1):
        members = list(c1.members)
        victim = members[2]
        watchers = [m for m in members if m != victim and victim in monitored_peers(members, m, {})]
        assert [member_id(w) for w in watchers] == [member_id(m) for m in members[:2]], watchers
        reports: set[str] = set()

        def gone() -> bool:
            reports.update(m.key.decode() for _, m in client.get_prefix(f"{root}/suspects/")
                           if m.key.decode().endswith(f"/{member_id(victim)}"))
            return client.get(f"{root}/ranks/{member_id(victim)}")[0] is None

        os.kill(procs[member_id(victim)].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for w in watchers:
            os.kill(procs[member_id(w)].pid, signal.SIGKILL)
        _wait(gone, lease_s + 5, f"{victim}'s registration to go")
        after = time.monotonic() - t0
        print(f"{victim} unwatched from the strike; its registration went {after:.2f} s later; reports {reports}")
        # Refreshed every third of the TTL, the lease had at least 2/3 of it left.
        assert after >= lease_s * 2 / 3 - 0.1, after
        assert not reports and _confirmed(ctl) <= len(watchers), (reports, _confirmed(ctl))
        c2 = _wait(lambda: (c := read_committed(client, root)) and c.epoch > c1.epoch and c, settle_s + 60,
                   "the recovery commit")
        assert sorted(c2.members) == sorted(set(members) - {victim, *watchers}), c2.members
        assert _confirmed(ctl) == len(watchers)
        require(check_commit(read_view(client, root, whole_plan=True, loads=True)))
