"""Watches that outlive etcd: a :class:`KeyWatch` and a rank agent waiting on one keep
waking after an etcd restart and after the revision they would resume from was
compacted; an idle agent reads only its own key."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from controller.etcd_client import EtcdConfig, connect
from controller.records import AckRecord
from controller.watch import KeyWatch
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime.agent import AgentConfig, RankAgent
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.polling import wait_until as _wait

from tests.test_agent_hostile import LEADER, SLOTS, EXPERTS, SPEC, Deployment, Recorder, bootstrap


@pytest.fixture
def etcd():
    with EtcdServer() as srv:
        yield srv


def _restart_writing_meanwhile(etcd: EtcdServer, client: Any, key: str, compact: bool) -> None:
    """Restart etcd; once it is back, write ``key`` and (``compact``) compact the
    history up to now, before any watcher could resume."""
    etcd.stop()
    etcd.start()
    _wait(lambda: _try(lambda: client.status()), 20, "etcd back")
    client.put(key, "while-away")
    if compact:
        client.put(key, "again")
        client.compact(_revision(client))


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn() or True
    except Exception:
        return None


def _revision(client: Any) -> int:
    return client.get_response("/").header.revision


@pytest.mark.parametrize("compact", [False, True], ids=["restart", "restart+compaction"])
def test_a_key_watch_wakes_again_after_a_restart_and_a_compaction(etcd, compact):
    client = connect(EtcdConfig(etcd.endpoint, timeout_s=2.0))
    wake = threading.Event()
    w = KeyWatch(client, wake, keys=["/w/a"], prefixes=["/w/p/"])
    assert w.ensure() and w.armed
    client.put("/w/p/x", "1")
    assert wake.wait(5), "a put under the prefix wakes"
    wake.clear()
    assert w.revision > 0
    _restart_writing_meanwhile(etcd, client, "/w/a", compact)
    _wait(lambda: not w.armed, 20, "the broken stream to be noticed")
    wake.clear()
    # A resume from a compacted revision is refused by etcd after the watch was created:
    # the refusal arrives as a callback, and the next arming watches from now.
    want = 1 if compact else 0
    _wait(lambda: w.ensure() and w.compacted == want, 20, f"the watch to arm again ({want} compaction seen)")
    assert wake.is_set(), "arming again wakes the reader for a resync read"
    assert w.rearmed >= 1 + want, (w.rearmed, w.compacted)
    wake.clear()
    client.put("/w/a", "after")
    assert wake.wait(5), "the re-armed watch wakes on the next change"
    w.close()


def test_an_agent_acts_on_plans_published_after_an_etcd_restart_and_compaction(etcd):
    dep = Deployment(etcd.endpoint, "watch")
    rec = Recorder()
    cfg = AgentConfig(dep.cfg, "r0", lease_ttl_s=10, poll_s=0.02, retry_s=0.1, resync_s=30.0)
    agent = RankAgent(cfg, executor=rec, load_initial=rec.load_initial, client=connect(dep.cfg))  # type: ignore[arg-type]
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    try:
        _wait(lambda: agent.incarnation, 10, "registration")
        boot = bootstrap(1, [agent.token, "ghost#0000"])
        dep.publish(boot)
        _wait(lambda: dep.ack("r0", 1), 10, "the bootstrap ack")
        dep.commit(boot)
        _wait(lambda: agent.holding is not None, 10, "the commit")
        # With a 30 s resync only the watch can make the agent act within the waits below.
        etcd.stop()
        etcd.start()
        _wait(lambda: _try(lambda: dep.client.status()), 20, "etcd back")
        for _ in range(3):
            dep.client.put(dep.key("scratch"), "x")
        dep.client.compact(_revision(dep.client))
        new = ExpertPlacement(boot.placement.phy2log[:, ::-1].copy(), SLOTS, EXPERTS)
        plan = build_plan(boot.placement, new, RankMapping.build(2), SPEC.expert_bytes, epoch=2)
        from controller.records import PlanRecord

        dep.publish(PlanRecord(2, LEADER, boot.new_members, boot.new_members, plan, new, "after restart"))
        ack: AckRecord = _wait(lambda: dep.ack("r0", 2), 15, "the ack of the plan published after the restart")
        assert ack.ok and rec.executed[-1] == (2, 0)
        assert agent.watch.rearmed >= 1
    finally:
        stop.set()
        agent.stop()
        t.join(10)


def test_an_idle_agent_reads_only_its_own_key(etcd):
    dep = Deployment(etcd.endpoint, "idle")
    rec = Recorder()
    cfg = AgentConfig(dep.cfg, "r0", lease_ttl_s=10, poll_s=0.02, retry_s=0.1, resync_s=0.05)
    agent = RankAgent(cfg, executor=rec, load_initial=rec.load_initial, client=connect(dep.cfg))  # type: ignore[arg-type]
    agent.register()
    boot = bootstrap(1, [agent.token, "ghost#0000"])
    dep.publish(boot)
    assert agent.poll_once() == "acked"
    dep.commit(boot)
    assert agent.poll_once() == "committed as rank 0"
    reads: list[str] = []
    real = agent.client.transaction

    def counting(compare: Any, success: Any, failure: Any) -> Any:
        ok, resp = real(compare=compare, success=success, failure=failure)
        reads.append("small" if ok and compare else "full")
        return ok, resp

    agent.client.transaction = counting  # type: ignore[method-assign]
    for _ in range(20):
        assert agent.poll_once() == "idle"
    assert reads == ["small"] * 20, reads
    dep.client.put(dep.key("leader"), LEADER)  # a write to a key it acts on: one full read
    agent.poll_once()
    assert reads[-1] == "full"
    agent.stop()
    agent.client.revoke_lease(agent.lease.id)
