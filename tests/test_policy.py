import numpy as np
import pytest
from hypothesis import given, settings

from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.errors import ConfigError
from elastic_ep.core.placement import ExpertPlacement, balance
from elastic_ep.core.plan import build_plan, lower_bound_bytes, moved_bytes
from elastic_ep.core.policy import DeepSeekPolicy, MinMigrationPolicy, get_policy, keep_local_slots
from elastic_ep.core.rank_mapping import RankMapping

from strategies import placement_and_change

POLICIES = [DeepSeekPolicy(), MinMigrationPolicy(), MinMigrationPolicy(max_moves_per_layer=0)]


def assert_slots_kept(old: ExpertPlacement, new: ExpertPlacement, m: RankMapping) -> None:
    """An expert on a surviving rank before and after keeps (at least) its old slots."""
    for new_rank, old_rank in enumerate(m.new_to_old()):
        if old_rank < 0:
            continue
        before, after = old.rank_slots(old_rank), new.rank_slots(new_rank)
        for layer in range(old.num_layers):
            for e in set(before[layer].tolist()) & set(after[layer].tolist()):
                kept = int(((before[layer] == e) & (after[layer] == e)).sum())
                want = min(int((before[layer] == e).sum()), int((after[layer] == e).sum()))
                assert kept == want, f"layer {layer} rank {new_rank}: expert {e} moved inside the rank"


@settings(max_examples=60, deadline=None)
@given(placement_and_change())
def test_policies_keep_invariants(case):
    old, m, load = case
    for policy in POLICIES:
        new = policy.rebalance(old, m, load)
        new.validate()  # every logical expert has a replica, ids in range
        assert new.ep_size == m.new_ep_size and new.slots_per_rank == old.slots_per_rank
        assert_slots_kept(old, new, m)


@settings(max_examples=60, deadline=None)
@given(placement_and_change())
def test_min_migration_without_moves_hits_lower_bound(case):
    old, m, load = case
    new = MinMigrationPolicy(max_moves_per_layer=0).rebalance(old, m, load)
    plan = build_plan(old, new, m, expert_bytes=100)
    assert moved_bytes(plan) == lower_bound_bytes(old, m, 100)


def test_min_migration_moves_pay_and_stay_bounded(rng):
    L, E, R, S = 8, 64, 8, 10
    load = (1.0 / np.arange(1, E + 1) ** 0.8)[rng.permuted(np.tile(np.arange(E), (L, 1)), axis=1)]
    p, _, _ = rebalance_experts(load, R * S, 1, 1, R)
    old = ExpertPlacement(p, S, E)
    m = RankMapping.build(R, dead=[3])
    lazy = MinMigrationPolicy(max_moves_per_layer=0).rebalance(old, m, load)
    tuned = MinMigrationPolicy(max_moves_per_layer=6).rebalance(old, m, load)
    lb = lower_bound_bytes(old, m, 1)
    moved = moved_bytes(build_plan(old, tuned, m, 1))
    assert lb <= moved <= lb + 6 * L
    assert balance(tuned, load) > balance(lazy, load)


def test_min_migration_spreads_disk_reads_after_a_failure(rng):
    L, E, R, S = 6, 40, 8, 8
    load = rng.random((L, E)) + 0.1
    old = ExpertPlacement(rebalance_experts(load, R * S, 1, 1, R)[0], S, E)
    for dead in ([2], [2, 5], [0, 1, 7]):
        m = RankMapping.build(R, dead=dead)
        plan = build_plan(old, MinMigrationPolicy().rebalance(old, m, load), m, 1)
        assert plan.bytes_by_route()["disk"] > 0
        carry = m.carry_over(old)
        for layer in range(L):
            disk = [t.dst_rank for t in plan.layer_transfers(layer) if t.route == "disk"]
            assert len(disk) == len(plan.missing[layer])
            # Ranks holding a redundant replica can take one; they share the reads (one
            # more where a rank's redundant replicas run out first).
            cnt = np.bincount(carry[layer], minlength=E)
            able = sum((cnt[carry[layer, r * S : (r + 1) * S]] >= 2).any() for r in range(m.new_ep_size))
            share = -(-len(disk) // able) + 1
            assert max(np.bincount(disk, minlength=m.new_ep_size)) <= share, (dead, layer, disk)


def test_deepseek_policy_is_the_reference_up_to_slot_order(rng):
    load = rng.random((3, 32))
    old = ExpertPlacement(rebalance_experts(load, 48, 4, 2, 8)[0], 6, 32)
    m = RankMapping.build(8, dead=[2, 5])
    new = DeepSeekPolicy(num_groups=4, num_nodes=2).rebalance(old, m, load)
    ref = rebalance_experts(load, 36, 4, 2, 6)[0].numpy()
    for r in range(6):
        assert (np.sort(new.rank_slots(r), axis=1) == np.sort(ref[:, r * 6 : (r + 1) * 6], axis=1)).all()


def test_keep_local_slots():
    before = np.array([[3, 1, 2, -1]])
    after = np.array([[1, 5, 7, 3]])
    assert keep_local_slots(before, after, 2).tolist() == [[5, 1, 7, 3]]


def test_identity_mapping_on_balanced_layout_moves_nothing():
    load = np.ones((2, 8))
    old = ExpertPlacement(np.tile(np.arange(8), (2, 1)), 2, 8)
    new = MinMigrationPolicy().rebalance(old, RankMapping.build(4), load)
    assert new == old


def test_registry_and_bad_input():
    assert isinstance(get_policy("deepseek", num_groups=8, num_nodes=4), DeepSeekPolicy)
    assert isinstance(get_policy("min_migration"), MinMigrationPolicy)
    with pytest.raises(ConfigError, match="unknown rebalance policy 'eplb'.*deepseek"):
        get_policy("eplb")
    with pytest.raises(ConfigError, match="bad options for policy 'deepseek'"):
        get_policy("deepseek", nodes=3)
    old = ExpertPlacement(np.tile(np.arange(8), (1, 1)), 2, 8)
    with pytest.raises(ConfigError, match=r"load must be \[num_layers=1, num_logical=8\]"):
        MinMigrationPolicy().rebalance(old, RankMapping.build(4), np.ones((2, 8)))
    with pytest.raises(ConfigError, match="cannot hold 8 logical experts"):
        MinMigrationPolicy().rebalance(old, RankMapping.build(4, dead=[0]), np.ones((1, 8)))
