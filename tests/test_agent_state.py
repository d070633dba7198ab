"""The rank agent's state machine: the transition table, the registration record that
follows the state in a real etcd, and the fencing signal turned into a new incarnation."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import pytest

from controller.etcd_client import EtcdConfig
from controller.records import STATES
from elastic_ep.errors import ElasticEPError
from elastic_ep.errors import AgentStateError
from elastic_ep.runtime.agent import TRANSITIONS, AgentConfig, AgentState, RankAgent

S = AgentState
ALLOWED = {
    (S.NEW, S.JOINING),
    (S.JOINING, S.ACTIVE), (S.JOINING, S.DRAINING), (S.JOINING, S.FENCED),
    (S.ACTIVE, S.DRAINING), (S.ACTIVE, S.FENCED),
    (S.DRAINING, S.LEFT), (S.DRAINING, S.FENCED),
    (S.FENCED, S.JOINING),
}


def test_the_table_is_the_documented_one():
    assert set(TRANSITIONS) == set(AgentState)
    assert {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts} == ALLOWED
    assert not TRANSITIONS[S.LEFT], "leaving is final"


def test_record_states_are_the_wire_states():
    wire = {s: s.record_state for s in AgentState if s.record_state is not None}
    assert wire == {S.JOINING: "joining", S.ACTIVE: "active", S.DRAINING: "draining"}
    assert set(wire.values()) == set(STATES)


needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs an etcd binary")


@pytest.fixture(scope="module")
def etcd_cfg():
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        yield EtcdConfig(srv.endpoint, deployment="agent-state", timeout_s=2.0)


@pytest.fixture
def agent(etcd_cfg):
    a = RankAgent(AgentConfig(etcd_cfg, "r0", lease_ttl_s=5), executor=None, load_initial=lambda p, r: 0)  # type: ignore[arg-type]
    yield a
    a.stop()
    if a.lease is not None:  # the next test registers "r0" again: free the id now, not after the TTL
        a.client.revoke_lease(a.lease.id)
    a.client.close()


def _wire_state(agent: RankAgent) -> str | None:
    raw, _ = agent.client.get(agent.key)
    return None if raw is None else json.loads(raw)["state"]


@needs_etcd
@pytest.mark.parametrize("old, new", list(itertools.product(AgentState, AgentState)),
                         ids=lambda s: s.value)
def test_every_transition_is_allowed_or_refused_by_the_table(agent, old, new, caplog):
    agent.register()  # a lease for the record
    agent.state = old
    if (old, new) in ALLOWED:
        with caplog.at_level(logging.INFO, logger="elastic_ep.runtime.agent"):
            agent._transition(new, "test")
        assert agent.state is new
        assert f"rank {agent.token} epoch 0: {old.value} -> {new.value} (test)" in caplog.text
        if new.record_state is not None:
            assert _wire_state(agent) == new.record_state
        assert agent.left.is_set() == (new is S.LEFT)
    else:
        before = _wire_state(agent)
        with pytest.raises(AgentStateError, match=f"r0#.* epoch 0: {old.value} -> {new.value}") as e:
            agent._transition(new, "test")
        assert isinstance(e.value, ElasticEPError)
        assert agent.state is old and _wire_state(agent) == before, "a refused transition changes nothing"


@needs_etcd
def test_drain_before_registering_or_twice_is_refused(agent):
    with pytest.raises(AgentStateError, match="new -> draining"):
        agent.drain()
    agent.register()
    agent.drain()
    assert agent.state is S.DRAINING and _wire_state(agent) == "draining"
    with pytest.raises(AgentStateError, match="draining -> draining"):
        agent.drain()


@needs_etcd
def test_a_fenced_rank_registers_again_as_a_new_incarnation(agent):
    agent.register()
    first = agent.token
    agent.fenced.set()  # what the lease thread does when the lease expired
    assert agent.poll_once() == "re-registered"
    assert agent.state is S.JOINING and agent.token != first and not agent.fenced.is_set()
    raw, _ = agent.client.get(agent.key)
    assert json.loads(raw)["incarnation"] == agent.token.split("#")[1]
