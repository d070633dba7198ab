"""Plans as a fenced head plus chunks: sizes at production scale, each participant's
part, the whole plan again, digests, and the removal of older epochs' chunks (against
a real etcd)."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest

from controller import plan_chunks
from controller.etcd_client import EtcdConfig, connect
from controller.records import MAX_BYTES, CommitRecord, PlanRecord
from elastic_ep.core.mirrors import assign_mirrors, min_mirror_rows
from elastic_ep.core.packed import pack, unpack
from elastic_ep.core.placement import initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.errors import MalformedValueError, PlacementError, PlanError

DSV3 = (58, 256, 88_080_384)
KIMI_K2 = (60, 384, 44_040_192)


def _members(n: int, inc: str = "a") -> list[str]:
    return [f"rank-{i:03d}#{inc}" for i in range(n)]


def _record(layers: int, experts: int, ranks: int, slots: int, seed: int, policy: str = "deepseek",
            dead: tuple[int, ...] = (1,), joining: int = 0, expert_bytes: int = 1024, mirrors: bool = False
            ) -> PlanRecord:
    """A plan record; ``mirrors``: ranks in nodes of 8, each with the fewest mirror rows
    that cover any node's loss, every mirror of the old placement ready (the largest
    head and chunks: every expert assigned a mirror, every missing one read from one)."""
    rng = np.random.default_rng(seed)
    print(f"seed {seed}")
    load = rng.gamma(0.5, 1.0, (layers, experts)) + 1e-3
    old = get_policy("deepseek").rebalance(initial_placement(layers, experts, ranks, slots),
                                           RankMapping.build(ranks), load)
    mapping = RankMapping.build(ranks, dead=list(dead), num_joining=joining)
    new = get_policy(policy).rebalance(old, mapping, load)
    ready = assigned = None
    if mirrors:
        nodes = [f"n{r // 8}" for r in range(ranks)]
        ready = assign_mirrors(old, nodes, [min_mirror_rows(old, nodes)] * ranks, load)
        new_nodes = [nodes[o] for o in mapping.new_to_old()[: mapping.num_surviving]] + ["nj"] * joining
        assigned = assign_mirrors(new, new_nodes, [min_mirror_rows(new, new_nodes)] * new.ep_size, load,
                                  ready.renumbered(mapping.old_to_new))
    plan = build_plan(old, new, mapping, expert_bytes, epoch=2, mirrors=ready)
    members = _members(ranks)
    new_members = [members[o] for o in mapping.new_to_old()[: mapping.num_surviving]]
    new_members += [f"join-{j}#b" for j in range(joining)]
    return PlanRecord(2, "ctl-a", members, new_members, plan, new, "test", mirrors=assigned)


def _one_record_bytes(rec: PlanRecord) -> int:
    """The plan as one JSON record in the form it had before heads and chunks: the
    placement three times as lists, every transfer as a row."""
    p = rec.plan
    rows = [[t.layer, t.dst_rank, t.dst_slot, t.logical, [[s.rank, s.slot] for s in t.sources]] for t in p.transfers]
    return len(json.dumps({"old_members": rec.old_members, "new_members": rec.new_members,
                           "plan": {"old": p.old.phy2log.tolist(), "new": p.new.phy2log.tolist(), "transfers": rows},
                           "placement": rec.placement.phy2log.tolist()}))


# -- packed arrays ------------------------------------------------------------------------
def test_packed_arrays_round_trip_in_the_narrowest_dtype() -> None:
    a = np.array([[0, 255], [-1, 7]])
    d = pack(a)
    assert d["dtype"] == "int16" and np.array_equal(unpack(d, "x", 4), a)
    assert pack(np.array([[1, 2]]))["dtype"] == "int8"


@pytest.mark.parametrize("defect", ["bomb", "short", "dtype", "shape", "text", "keys"])
def test_a_bad_packed_array_is_refused_by_name(defect: str) -> None:
    d = pack(np.zeros((4, 4), dtype=np.int64))
    if defect == "bomb":  # far more bytes than the shape: inflation stops at the shape's size
        d["z"] = base64.b64encode(zlib.compress(b"\0" * (64 << 20))).decode()
    elif defect == "short":
        d["shape"] = [4, 5]
    elif defect == "dtype":
        d["dtype"] = "float64"
    elif defect == "shape":
        d["shape"] = [1 << 40, 1 << 40]
    elif defect == "text":
        d["z"] = "%%%"
    else:
        d["extra"] = 1
    with pytest.raises(PlacementError, match="layer map"):
        unpack(d, "layer map", 1 << 20)


# -- sizes at production scale -------------------------------------------------------------
@pytest.mark.parametrize(("model", "ranks", "slots", "policy"), [
    ("dsv3", 64, 9, "deepseek"), ("dsv3", 256, 9, "min_migration"), ("dsv3", 320, 1, "deepseek"),
    ("kimi", 256, 2, "min_migration")])
def test_production_plans_with_mirrors_fit_etcd_as_head_and_chunks(model: str, ranks: int, slots: int,
                                                                   policy: str) -> None:
    layers, experts, eb = DSV3 if model == "dsv3" else KIMI_K2
    rec = _record(layers, experts, ranks, slots, seed=ranks, policy=policy, expert_bytes=eb, mirrors=True)
    values = plan_chunks.encode(rec)
    head = plan_chunks.head(rec, values, "00" * 8)
    head_bytes = len(head.to_json())
    largest = max(len(v) for v in values.values())
    assert rec.mirrors is not None
    mirrored = sum(1 for t in rec.plan.transfers if t.route == "mirror")
    print(f"{model} {ranks}x{slots} {policy}: {len(rec.plan.transfers)} transfers ({mirrored} from mirrors), "
          f"{rec.mirrors.count()} mirrors assigned; one JSON record {len(rec.plan.to_json()) / 1024:.0f} KiB; "
          f"head {head_bytes / 1024:.0f} KiB, {len(values)} chunks, largest {largest / 1024:.0f} KiB")
    assert head_bytes <= 512 * 1024 and largest <= 512 * 1024
    parsed = PlanRecord.parse("/ep/plan", head.to_json())
    assert parsed.mirrors == rec.mirrors
    commit = CommitRecord(2, rec.new_members, rec.placement, {}, {}, rec.mirrors, eb).to_json()
    assert len(commit) <= 512 * 1024, f"commit record {len(commit)} B"


def test_a_plan_too_large_for_one_record_splits_into_parts_that_give_it_back() -> None:
    layers, experts, eb = DSV3
    rec = _record(layers, experts, 64, 9, seed=7, expert_bytes=eb)
    assert _one_record_bytes(rec) > 1.5 * (1 << 20), "as one record etcd would refuse it"
    values = plan_chunks.encode(rec)
    head = plan_chunks.head(rec, values, "ab" * 8)
    received = []
    for p, (o, n) in enumerate(plan_chunks.participant_ranks(rec.mapping)):
        want = rec.plan.part_of(o, n)
        want.validate()
        got = values.get(plan_chunks.part_name(p))
        assert (got is None) == (not want.transfers)
        if got is not None:
            rows = unpack(json.loads(got)["rows"], "rows", 1 << 22)
            assert len(rows) == len(want.transfers)
            received += [r for r in rows.tolist() if r[1] == n]
    assert len(received) == len(rec.plan.transfers), "every transfer is in its receiver's part once"
    assert head.participants() == rec.participants()


def test_a_part_with_a_transfer_of_another_rank_is_refused() -> None:
    rec = _record(2, 16, 4, 6, seed=3)
    plan = rec.plan
    part = plan.part_of(0, 0)
    stranger = next(t for t in plan.transfers if t.dst_rank != 0 and t.sources[0].rank != 0)
    with pytest.raises(PlanError, match="is not part of"):
        part.with_transfers(part.transfers + (stranger,), (0, 0)).validate()
    dropped = plan.part_of(None, 2)
    assert dropped.transfers, "new rank 2 receives something"
    with pytest.raises(PlanError, match="does not give its new slots"):
        dropped.with_transfers(dropped.transfers[1:], (None, 2)).validate()


# -- in etcd --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd():
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        yield srv


def test_parts_and_the_whole_plan_read_back_from_etcd(etcd) -> None:
    cfg = EtcdConfig(etcd.endpoint, deployment="chunks")
    client = connect(cfg)
    rec = _record(4, 16, 6, 4, seed=11, dead=(1, 4), joining=1)
    head = plan_chunks.write(client, cfg.root, rec)
    parsed = PlanRecord.parse("/x/plan", head.to_json())
    assert parsed.plan is None and parsed.chunks == head.chunks
    for p, token in enumerate(parsed.participants()):
        o, n = plan_chunks.participant_ranks(rec.mapping)[p]
        part = plan_chunks.load_part(client, cfg.root, parsed, token).plan
        assert part is not None and part.part == (o, n)
        assert part.transfers == rec.plan.part_of(o, n).transfers
    whole = plan_chunks.load_plan(client, cfg.root, parsed).plan
    assert whole is not None and whole.transfers == rec.plan.transfers and whole.missing == rec.plan.missing
    assert whole.old == rec.plan.old and whole.new == rec.plan.new


def test_a_chunk_over_the_cap_is_not_written(etcd, monkeypatch) -> None:
    client = connect(EtcdConfig(etcd.endpoint, deployment="cap"))
    monkeypatch.setitem(MAX_BYTES, "chunk", 64)
    with pytest.raises(PlanError, match="more than the 64 a chunk may hold"):
        plan_chunks.write(client, "/elastic-ep/cap", _record(2, 8, 3, 4, seed=1))
    assert not list(client.get_prefix("/elastic-ep/cap/plans/"))


def test_older_epochs_chunks_are_removed_and_the_committed_ones_kept(etcd) -> None:
    cfg = EtcdConfig(etcd.endpoint, deployment="cleanup")
    client = connect(cfg)
    heads = []
    for epoch in (2, 3, 10):
        rec = _record(2, 8, 3, 4, seed=epoch)
        heads.append(plan_chunks.write(client, cfg.root, PlanRecord(
            epoch, rec.leader, rec.old_members, rec.new_members, rec.plan, rec.placement)))
    plan_chunks.remove_before(client, cfg.root, 10)
    left = {m.key.decode() for _, m in client.get_prefix(f"{cfg.root}/plans/")}
    assert left and all(k.startswith(heads[2].prefix(cfg.root)) for k in left), left
    with pytest.raises(MalformedValueError, match="is missing"):
        plan_chunks.load_part(client, cfg.root, heads[0], heads[0].participants()[0])
