import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.core.fault_domains import node_ids, shared_node_experts, shared_node_mask
from elastic_ep.core.load_stats import zipf_load
from elastic_ep.errors import ConfigError
from elastic_ep.core.placement import ExpertPlacement, balance
from elastic_ep.core.plan import build_plan, lower_bound_bytes, moved_bytes
import elastic_ep.core.policy as policy_module
from elastic_ep.core.policy import (DeepSeekPolicy, MinMigrationPolicy, _excess, _Layers, _pick, _true_indices,
                                    get_policy, keep_local_slots)
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


@pytest.mark.parametrize("seed", range(12))
def test_min_migration_moves_and_balances_as_before(seed):
    """Batched over layers, min_migration moves no more bytes and balances no worse
    than the per-layer algorithm it replaced (the reference below), on seeded cases
    of failures, drains and joins."""
    rng = np.random.default_rng(seed)
    L, E, R = 4, int(rng.integers(8, 40)), int(rng.integers(3, 9))
    S = -(-E // R) + int(rng.integers(0, 4))
    load = rng.zipf(1.4, (L, E)).astype(np.float64) if seed % 2 else rng.random((L, E)) + 0.05
    old = ExpertPlacement(rebalance_experts(load, R * S, 1, 1, R)[0], S, E)
    dead = sorted(rng.choice(R, int(rng.integers(0, 3)), replace=False).tolist())
    joining = int(rng.integers(0, 2))
    while (R - len(dead) + joining) * S < E:
        dead.pop()
    m = RankMapping.build(R, dead=dead, num_joining=joining)
    for policy in (MinMigrationPolicy(), MinMigrationPolicy(min_gain=0.0, max_moves_per_layer=4)):
        new = policy.rebalance(old, m, load)
        carry = m.carry_over(old)
        ref_rows = [_reference_layer(carry[layer], load[layer], S, policy.min_gain, policy.max_moves_per_layer)
                    for layer in range(L)]
        ref = ExpertPlacement(keep_local_slots(carry, np.stack(ref_rows), S), S, E)
        moved, ref_moved = (moved_bytes(build_plan(old, p, m, 1)) for p in (new, ref))
        assert moved <= ref_moved, (seed, policy)
        assert balance(new, load) >= balance(ref, load) - 1e-9, (seed, policy)


@settings(max_examples=40, deadline=None)
@given(placement_and_change())
def test_min_migration_replica_table_follows_every_change(case):
    """min_migration keeps each expert's replicas per rank in a table instead of
    comparing slots; after every step it matches a recount from the slots."""
    old, m, load = case
    s = _Layers.start(m.carry_over(old), load, old.slots_per_rank)

    def assert_counts_match_slots() -> None:
        want = np.zeros(s.held.shape, dtype=np.int64)
        lay, slot = np.nonzero(s.row >= 0)
        np.add.at(want, (lay, s.row[lay, slot], slot // s.spr), 1)
        assert (s.held == want).all()
        assert (s.cnt == want.sum(axis=2)).all()

    assert_counts_match_slots()
    s.home_missing()
    assert_counts_match_slots()
    s.fill_empty()
    assert_counts_match_slots()
    MinMigrationPolicy(min_gain=0.0, max_moves_per_layer=6)._moves_that_pay(s)  # replicas and swaps
    assert_counts_match_slots()


def test_min_migration_scores_layers_in_batches_without_changing_a_choice(rng, monkeypatch):
    L, E, R, S = 6, 48, 8, 8
    load = rng.zipf(1.5, (L, E)).astype(np.float64)
    old = ExpertPlacement(rebalance_experts(load, R * S, 1, 1, R)[0], S, E)
    m = RankMapping.build(R, dead=[1], num_joining=1)
    policy = MinMigrationPolicy(min_gain=0.0, max_moves_per_layer=6)
    whole = policy.rebalance(old, m, load)
    monkeypatch.setattr(policy_module, "_CHUNK", 1)  # one layer per batch
    assert policy.rebalance(old, m, load) == whole


def test_min_migration_sums_few_candidates_in_full_as_the_approximation_would(rng):
    """With at most _NEAR candidate slots for a missing expert, step 1 sums each in
    full and skips the approximate pass: the slot is the one that pass leads to."""
    checked = 0
    for _ in range(30):
        L, R, S = 4, int(rng.integers(4, 9)), 6
        E = int(rng.integers(8, (R - 2) * S + 1))  # room for all once two ranks are gone
        load = rng.integers(1, 4, (L, E)).astype(np.float64)  # equal loads: ties to break alike
        old = ExpertPlacement(rebalance_experts(load, R * S, 1, 1, R)[0], S, E)
        m = RankMapping.build(R, dead=sorted(rng.choice(R, 2, replace=False).tolist()))
        s = _Layers.start(m.carry_over(old), load, S)
        missing = s.cnt == 0
        ls = np.flatnonzero(missing.any(axis=1))
        if ls.size == 0:
            continue
        e = np.argmax(np.where(missing[ls], load[ls], -1.0), axis=1)
        rl = s.rank_loads(ls)
        # no rank took a missing expert yet: the candidates are all redundant slots
        slots = _true_indices(np.take_along_axis(s.cnt[ls], s.row[ls], 1) >= 2, s.row.shape[1])
        assert slots.shape[1] <= policy_module._NEAR
        approx = s.excess_after_replacing(ls, e[:, None], slots, rl)
        assert (s._slot_to_replace(ls, e, rl) == s._least_excess(ls, e[:, None], slots, rl, approx)[0]).all()
        checked += ls.size
    assert checked > 20


def test_true_indices_and_pick():
    mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    assert _true_indices(mask, 3).tolist() == [[1, 2, 4], [-1, -1, -1], [0, 1, 2]]
    assert _true_indices(mask, 10).tolist() == [[1, 2, 4, -1, -1], [-1] * 5, [0, 1, 2, 3, 4]]
    x = np.arange(12).reshape(3, 4)
    assert _pick(x, np.array([[3, 0], [1, 1], [2, 3]])).tolist() == [[3, 0], [5, 5], [10, 11]]
    assert _pick(x, np.array([[0], [3]]), np.array([2, 0])).tolist() == [[8], [3]]
    assert _pick(x, np.array([[[1, 2]], [[0, 0]]]), np.array([1, 2])).tolist() == [[[5, 6]], [[8, 8]]]


def test_deepseek_runs_the_global_policy_when_groups_do_not_divide_over_nodes():
    load = np.array([[1.0, 1.0, 1.0, 3.0]])
    old = ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1]]), 2, 4)
    new = get_policy("deepseek", num_groups=2, num_nodes=3).rebalance(old, RankMapping.build(3), load)
    glob = rebalance_experts(load, 6, 1, 1, 3)[0].numpy()
    for r in range(3):
        assert sorted(new.rank_slots(r)[0].tolist()) == sorted(glob[0, 2 * r : 2 * r + 2].tolist())
    assert all(len(set(new.rank_slots(r)[0].tolist())) == 2 for r in range(3))  # no expert twice on a rank


def test_deepseek_takes_the_node_count_of_the_new_ranks(rng):
    load = rng.random((2, 16))
    old = ExpertPlacement(rebalance_experts(load, 32, 4, 4, 8)[0], 4, 16)
    m = RankMapping.build(8, dead=[6, 7])  # one node of four left: 3 nodes of 2 ranks
    policy = DeepSeekPolicy(num_groups=4, num_nodes=4)
    for nodes, want in ((None, (4, 1, 6)), (3, (1, 1, 6)), (2, (4, 2, 6))):
        new = policy.rebalance(old, m, load, nodes=nodes)
        ref = rebalance_experts(load, 24, *want)[0].numpy()
        for r in range(6):
            assert (np.sort(new.rank_slots(r), axis=1) == np.sort(ref[:, r * 4 : (r + 1) * 4], axis=1)).all(), nodes
    with pytest.raises(ConfigError, match="nodes=7 must be between 1 and the new rank count 6"):
        policy.rebalance(old, m, load, nodes=7)


# -- fault-aware placement: replicas spread over nodes ---------------------------------------
SPREAD_POLICIES = [DeepSeekPolicy(), MinMigrationPolicy(), MinMigrationPolicy(max_moves_per_layer=0)]


@st.composite
def case_with_nodes(draw, labels: tuple[str, ...] = ("a", "b", "c", "")):
    """A placement, a change and a load, with one node label per new rank."""
    old, m, load = draw(placement_and_change())
    return old, m, load, draw(st.lists(st.sampled_from(labels), min_size=m.new_ep_size, max_size=m.new_ep_size))


def _confined(row: np.ndarray, spr: int, node_of: list[str], e: int) -> bool:
    """Expert ``e`` of one layer's ``row`` has >= 2 replicas, all on labeled ranks of one node."""
    nodes = [node_of[s // spr] for s in np.flatnonzero(row == e)]
    return len(nodes) >= 2 and "" not in nodes and len(set(nodes)) == 1


def _allowed_swap(row: np.ndarray, carry: np.ndarray, spr: int, node_of: list[str], ex: int) -> tuple[int, int] | None:
    """A swap that :func:`spread_over_nodes` allows for confined expert ``ex``, found by
    trying every pair of slots (its definition written out), or None."""
    kept = set(carry[carry >= 0].tolist())
    for x in np.flatnonzero(row == ex):
        for y in range(row.size):
            r1, r2, ey = x // spr, y // spr, int(row[y])
            if not node_of[r2] or node_of[r2] == node_of[r1] or (ey in kept) != (ex in kept):
                continue
            if ex in row[r2 * spr:(r2 + 1) * spr] or ey in row[r1 * spr:(r1 + 1) * spr]:
                continue
            after = row.copy()
            after[x], after[y] = ey, ex
            if not _confined(after, spr, node_of, ey):
                return int(x), int(y)
    return None


@settings(max_examples=80, deadline=None)
@given(case_with_nodes())
def test_spread_keeps_every_invariant_and_leaves_no_confined_expert_with_a_swap(case):
    """With node labels, each policy's placement is still valid (every rank full, every
    expert placed, kept slots kept), confines no more (layer, expert) pairs to one node
    than without labels, and every pair still confined has no allowed swap left: no
    slot of it can trade places with a slot on another labeled node without putting
    an expert twice on a rank, confining the partner, or moving a disk read."""
    old, m, load, node_of = case
    carry = m.carry_over(old)
    for policy in SPREAD_POLICIES:
        plain = policy.rebalance(old, m, load)
        new = policy.rebalance(old, m, load, node_of=node_of)
        new.validate()
        assert new.phy2log.shape == plain.phy2log.shape
        assert_slots_kept(old, new, m)
        assert shared_node_experts(new, node_of) <= shared_node_experts(plain, node_of)
        for layer, e in zip(*np.nonzero(shared_node_mask(new, node_of))):
            row = new.phy2log[layer]
            assert _confined(row, old.slots_per_rank, node_of, e)
            swap = _allowed_swap(row, carry[layer], old.slots_per_rank, node_of, e)
            assert swap is None, (policy, layer, e, swap)


@settings(max_examples=60, deadline=None)
@given(case_with_nodes(labels=("n0", "")), st.booleans())
def test_one_node_or_no_label_changes_nothing(case, blank):
    """One node, no label, or a mix of one label and unknown ones: the same placement
    as without ``node_of``."""
    old, m, load, node_of = case
    node_of = [""] * len(node_of) if blank else node_of
    for policy in SPREAD_POLICIES:
        assert policy.rebalance(old, m, load, node_of=node_of) == policy.rebalance(old, m, load)


@pytest.mark.parametrize("policy", SPREAD_POLICIES[:2], ids=lambda p: p.name)
def test_spread_leaves_nothing_confined_on_two_nodes(policy, rng):
    """On node-local placements (DeepSeek's hierarchical policy replicates inside each
    node) with a rank lost, room on both nodes: no expert stays on one node."""
    L, E, R, S = 6, 32, 8, 6
    load = rng.zipf(1.5, (L, E)).astype(np.float64)
    old = ExpertPlacement(rebalance_experts(load, R * S, 4, 2, R)[0], S, E)
    before = [f"n{r // 4}" for r in range(R)]
    assert shared_node_experts(old, before) > 0
    for m in (RankMapping.build(R, dead=[1]), RankMapping.build(R, num_joining=1), RankMapping.build(R)):
        node_of = [before[o] if o >= 0 else "n1" for o in m.new_to_old()]
        new = policy.rebalance(old, m, load, node_of=node_of)
        assert shared_node_experts(new, node_of) == 0
        assert balance(new, load) >= balance(policy.rebalance(old, m, load), load) - 0.1


def test_spread_searching_windows_first_keeps_the_guarantee(rng, monkeypatch):
    """Large searches look among the slots of closest load first, then among all:
    forced on small cases (tiny windows), the guarantee is the same."""
    import elastic_ep.core.fault_domains as fault_domains

    monkeypatch.setattr(fault_domains, "_SCAN", 0)
    monkeypatch.setattr(fault_domains, "_WINDOW", 3)
    for _ in range(25):
        L, E, R = 3, int(rng.integers(6, 20)), int(rng.integers(3, 8))
        S = -(-E // R) + int(rng.integers(0, 3))
        load = rng.zipf(1.5, (L, E)).astype(np.float64)
        old = ExpertPlacement(rebalance_experts(load, R * S, 1, 1, R)[0], S, E)
        m = RankMapping.build(R, dead=[int(rng.integers(R))] if (R - 1) * S >= E else [])
        node_of = rng.choice(["a", "b", "c", ""], m.new_ep_size).tolist()
        carry = m.carry_over(old)
        for policy in SPREAD_POLICIES[:2]:
            new = policy.rebalance(old, m, load, node_of=node_of)
            assert_slots_kept(old, new, m)
            for layer, e in zip(*np.nonzero(shared_node_mask(new, node_of))):
                assert _allowed_swap(new.phy2log[layer], carry[layer], S, node_of, e) is None


def test_deepseek_v3_spreads_over_four_nodes_in_modest_time():
    """58 layers x 256 experts on 32 ranks x 9 slots, 4 nodes of 8, one rank lost, from
    DeepSeek's hierarchical (node-local) placement: nothing confined afterwards."""
    L, E, R, S = 58, 256, 32, 9
    load = zipf_load(L, E, 0.6, 0)
    old = ExpertPlacement(rebalance_experts(load, R * S, 8, 4, R)[0], S, E)
    m = RankMapping.build(R, dead=[5])
    node_of = [f"n{o // 8}" for o in m.new_to_old()]
    for policy in (DeepSeekPolicy(num_groups=8, num_nodes=4), MinMigrationPolicy()):
        t = time.perf_counter()
        plain = policy.rebalance(old, m, load, nodes=4)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        new = policy.rebalance(old, m, load, nodes=4, node_of=node_of)
        t_spread = time.perf_counter() - t
        moved = [moved_bytes(build_plan(old, p, m, 1)) for p in (plain, new)]
        print(f"{policy.name}: {t_plain:.3f}s -> {t_spread:.3f}s with node labels; shared-node "
              f"{shared_node_experts(plain, node_of)} -> {shared_node_experts(new, node_of)}; moved slots "
              f"{moved[0]} -> {moved[1]}; balance {balance(plain, load):.4f} -> {balance(new, load):.4f}")
        assert shared_node_experts(new, node_of) == 0
        assert_slots_kept(old, new, m)


def test_shared_node_experts_and_node_ids():
    p = ExpertPlacement(np.array([[0, 1, 0, 2], [0, 1, 1, 2]]), 2, 3)
    assert shared_node_experts(p, ["a", "a"]) == 2  # expert 0 in layer 0, expert 1 in layer 1
    assert shared_node_mask(p, ["a", "a"]).tolist() == [[True, False, False], [False, True, False]]
    assert shared_node_experts(p, ["a", "b"]) == 0
    assert shared_node_experts(p, ["a", ""]) == 0  # unknown: no information, not counted
    assert node_ids(["a", "", "b", "a"], 4).tolist() == [0, -1, 1, 0]
    with pytest.raises(ConfigError, match="one node label"):
        node_ids(["a"], 2)
    with pytest.raises(ConfigError, match="one node label"):
        MinMigrationPolicy().rebalance(p, RankMapping.build(2), np.ones((2, 3)), node_of=["a", "b", "c"])


def test_decide_gives_the_policy_each_new_rank_s_node():
    from controller.decide import _new_nodes, _node_count

    nodes = ["a", "a", "b", "", "c"]  # four old ranks, then one joining
    m = RankMapping.build(4, dead=[1], num_joining=1)
    assert _new_nodes(m, nodes) == ["a", "b", "", "c"]
    assert _node_count(m, nodes) == 3
    assert _node_count(RankMapping.build(2), ["", ""]) is None


# -- the min_migration of before its layers were batched: a reference for its outputs ------
def _replicas_on_rank(row: np.ndarray, slot_rank: np.ndarray, num_logical: int, ranks: int) -> np.ndarray:
    """``[num_logical, ranks]``: replicas of each expert on each rank."""
    out = np.zeros((num_logical, ranks))
    filled = row >= 0
    np.add.at(out, (row[filled], slot_rank[filled]), 1.0)
    return out


def _loads_after_replacing(
    row: np.ndarray, cnt: np.ndarray, w: np.ndarray, rl: np.ndarray, slot_rank: np.ndarray, cand: np.ndarray, h: int,
    on_rank: np.ndarray,
) -> np.ndarray:
    """Rank loads ``[len(cand), ranks]`` after putting expert ``h`` in each candidate
    slot instead of its current expert ``a`` (which must keep another replica).

    Every replica of ``h`` sheds load (its count grows), every other replica of ``a``
    takes more, and the candidate's rank swaps ``a``'s share for ``h``'s.
    ``on_rank``: :func:`_replicas_on_rank` of ``row``.
    """
    base = rl - on_rank[h] * (w[h] / cnt[h] - w[h] / (cnt[h] + 1)) if cnt[h] else rl
    a = row[cand]
    grow = w[a] / (cnt[a] - 1) - w[a] / cnt[a]
    new = base[None, :] + on_rank[a] * grow[:, None]
    new[np.arange(cand.size), slot_rank[cand]] += w[h] / (cnt[h] + 1) - w[a] / cnt[a] - grow
    return new


def _reference_layer(carry_row: np.ndarray, w: np.ndarray, spr: int, min_gain: float, max_moves: int) -> np.ndarray:
    row = carry_row.copy()
    E, P = w.size, row.size
    ranks = P // spr
    slot_rank = np.arange(P) // spr
    cnt = np.bincount(row[row >= 0], minlength=E)

    def rank_load() -> np.ndarray:
        filled = row >= 0
        per = w[row[filled]] / cnt[row[filled]]
        return np.bincount(slot_rank[filled], weights=per, minlength=ranks)

    # 1. Every expert without a replica gets a slot, heaviest first: an empty slot
    #    (a joining rank's, which must be filled anyway) if there is one, else the
    #    slot of a redundant replica on a rank that took the fewest such experts so
    #    far, so that their (disk or peer) reads spread over the ranks.
    homeless = np.flatnonzero(cnt == 0)
    homeless = homeless[np.argsort(-w[homeless], kind="stable")]
    taken = np.zeros(ranks, dtype=np.int64)
    for e in homeless:
        rl = rank_load()
        free = np.flatnonzero(row < 0)
        if free.size:
            slot = free[np.argmin(rl[slot_rank[free]])]
        else:
            cand = np.flatnonzero(cnt[row] >= 2)
            cand = cand[taken[slot_rank[cand]] == taken[slot_rank[cand]].min()]
            # Of the redundant replicas there, replace the one that leaves the
            # least excess load.
            on_rank = _replicas_on_rank(row, slot_rank, E, ranks)
            slot = cand[np.argmin(_excess(_loads_after_replacing(row, cnt, w, rl, slot_rank, cand, e, on_rank)))]
            cnt[row[slot]] -= 1
        row[slot] = e
        cnt[e] += 1
        taken[slot_rank[slot]] += 1

    # 2. Empty slots (joining ranks) take replicas of the experts with the greatest
    #    load per replica, on the least loaded rank not already holding that expert.
    while (row < 0).any():
        e = int(np.argmax(w / np.maximum(cnt, 1)))
        free = np.flatnonzero(row < 0)
        holders = np.zeros(ranks, dtype=bool)
        holders[slot_rank[row == e]] = True
        pref = free[~holders[slot_rank[free]]]
        if pref.size:
            free = pref
        rl = rank_load()
        slot = free[np.argmin(rl[slot_rank[free]])]
        row[slot] = e
        cnt[e] += 1

    # 3. Moves that pay for balance, while the budget lasts: re-home a replica of
    #    an expert of the peak rank, or swap a slot of the peak rank with another,
    #    whichever lowers the layer's excess load (sum over ranks of load above the
    #    mean) most per transfer it adds, if by at least min_gain x mean. Excess
    #    rather than peak, so that lowering one of several equal peaks counts.
    #    Only experts that kept a replica on a surviving rank get new copies, and
    #    a swap never raises the most disk reads a rank makes: no move adds to or
    #    concentrates the disk reads.
    ctx = _ReferenceMoves(carry_row, row, cnt, w, spr, taken, int(taken.max(initial=0)))
    spent = 0
    for _ in range(4 * max_moves + spr):  # each accepted move lowers excess
        rl = rank_load()
        moves = [m for m in (ctx.best_replicate(rl), ctx.best_swap(rl)) if m is not None]
        if not moves:
            break
        gain, cost, apply = max(moves, key=lambda m: m[0] / max(m[1], 1e-9))
        if cost > 0 and (gain / cost < min_gain * rl.mean() or spent + cost > max_moves):
            break
        apply()
        spent += max(cost, 0)
    return row


@dataclass
class _ReferenceMoves:
    """One layer's state while min_migration looks for moves that pay.

    ``carry``/``row``: ``[P]`` experts before any transfer / now; ``cnt``: ``[E]``
    replicas now; ``w``: ``[E]`` load; ``taken``: ``[ranks]`` experts without a live
    replica placed on each rank; ``disk_cap``: the most any rank may take.
    """

    carry: np.ndarray
    row: np.ndarray
    cnt: np.ndarray
    w: np.ndarray
    spr: int
    taken: np.ndarray
    disk_cap: int

    def __post_init__(self) -> None:
        self.slot_rank = np.arange(self.row.size) // self.spr
        self.kept = np.isin(np.arange(self.w.size), self.carry)

    def best_replicate(self, rl: np.ndarray):
        """(gain, cost, apply) for giving an expert of the peak rank another copy in the
        place of a redundant replica of another expert; None if none helps."""
        row, cnt, slot_rank = self.row, self.cnt, self.slot_rank
        hi = int(np.argmax(rl))
        now = float(_excess(rl))
        best: tuple[float, int, int] | None = None
        on_rank = _replicas_on_rank(row, slot_rank, self.w.size, rl.size)
        redundant = cnt[row] >= 2
        for h in np.unique(row[hi * self.spr : (hi + 1) * self.spr]):
            if not self.kept[h]:
                continue
            cand = np.flatnonzero(redundant & (on_rank[h][slot_rank] == 0))
            if cand.size == 0:
                continue
            excess = _excess(_loads_after_replacing(row, cnt, self.w, rl, slot_rank, cand, int(h), on_rank))
            c = int(np.argmin(excess))
            if best is None or excess[c] < best[0]:
                best = (float(excess[c]), int(cand[c]), int(h))
        if best is None or not now - best[0] > 0:
            return None
        _, slot, h = best
        cost = int(row[slot] == self.carry[slot])  # replacing a slot already changing is free

        def apply() -> None:
            cnt[row[slot]] -= 1
            row[slot] = h
            cnt[h] += 1

        return now - best[0], cost, apply

    def best_swap(self, rl: np.ndarray):
        """(gain, cost, apply) for exchanging a slot of the peak rank with a slot of
        another rank; None if none lowers the excess."""
        row, slot_rank, carry = self.row, self.slot_rank, self.carry
        hi = int(np.argmax(rl))
        xs = np.arange(hi * self.spr, (hi + 1) * self.spr)
        per = self.w[row] / self.cnt[row]
        delta = per[xs][:, None] - per[None, :]  # [spr, P]: load hi sheds, slot y's rank takes
        mean = rl.mean()
        ry = slot_rank
        before = max(rl[hi] - mean, 0.0) + np.clip(rl[ry] - mean, 0.0, None)[None, :]
        after = np.clip(rl[hi] - delta - mean, 0.0, None) + np.clip(rl[ry][None, :] + delta - mean, 0.0, None)
        # Never swap within the peak rank or put a second copy of an expert on a rank.
        holds = _replicas_on_rank(row, slot_rank, self.w.size, rl.size) > 0
        bad = (ry == hi)[None, :] | holds[row[xs]][:, ry] | holds[row][:, hi][None, :]
        # Experts without a live replica moving between ranks: keep within disk_cap.
        hx = (~self.kept[row[xs]]).astype(np.int64)[:, None]
        hy = (~self.kept[row]).astype(np.int64)[None, :]
        bad |= (self.taken[ry][None, :] + hx - hy > self.disk_cap) | (self.taken[hi] - hx + hy > self.disk_cap)
        changed = row != carry
        cost = (
            (row[None, :] != carry[xs][:, None]).astype(np.int64)
            + (row[xs][:, None] != carry[None, :])
            - changed[xs][:, None]
            - changed[None, :]
        )
        gain = np.where(bad, -np.inf, before - after)
        score = gain / np.maximum(cost, 1e-9)
        i, j = np.unravel_index(np.argmax(np.where(gain > 0, score, -np.inf)), gain.shape)
        if not gain[i, j] > 0:
            return None
        x, y = int(xs[i]), int(j)
        taken = self.taken

        def apply() -> None:
            taken[hi] += int(hy[0, y] - hx[i, 0])
            taken[slot_rank[y]] += int(hx[i, 0] - hy[0, y])
            row[x], row[y] = row[y], row[x]

        return float(gain[i, j]), int(cost[i, j]), apply


