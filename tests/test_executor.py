"""Plans executed by real processes through each transport, checked bit-exactly against
the synthetic checkpoint; a source rank SIGKILLed in the middle of a layer. Also, in
this process: which peer sources a one-sided and a two-sided transport try per layer,
a poisoned staging buffer retired, and where a plan's store keys go."""

from __future__ import annotations

import importlib
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist

from elastic_ep.errors import StaleEpochError, TransportError
from elastic_ep.runtime.executor import Participants, PlanExecutor
from elastic_ep.core.plan import TransferPlan
from elastic_ep.tools.synthetic_rank import FaultPoint, RankJob, allocate_weights, load_rank, scenario
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint
from loaders.transport import (
    OneSidedTransport,
    PeerRead,
    PeerSend,
    PeerSource,
    Receive,
    ReceiveOutcome,
    TwoSidedTransport,
)
from loaders.transport.base import OpenPeer, PeerReadOp, ReadRound
from tests.procs import check_exact, run_jobs

SPEC = SyntheticSpec(layers=3, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=7, dense_layers=1)

_MODULES = {"torch": "torch.distributed", "nixl": "nixl", "mooncake": "mooncake.engine"}


def _backend(name: str):
    try:
        importlib.import_module(_MODULES[name])
        marks = []
    except Exception as e:  # not installed, or a system library missing (libibverbs1)
        why = f"{_MODULES[name]} cannot be imported ({e}); pip install 'elastic-ep[{name}]'"
        marks = [pytest.mark.skip(reason=why)]
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [_backend(n) for n in ("torch", "nixl", "mooncake")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield s
    del s


def _jobs(plan: TransferPlan, transport: str, store, ckpt: str, **kw) -> list[RankJob]:
    parts = Participants.of(plan.mapping)
    base = dict(transport=transport, store_host="127.0.0.1", store_port=store.port, ckpt_dir=ckpt, spec=SPEC,
                plan_json=plan.to_json(), **kw)
    return [RankJob(old_rank=r, **base) for r in parts.old] + [RankJob(old_rank=None, new_rank=n, **base) for n in parts.joining]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fail", "leave", "join"])
def test_plan_moves_every_slot_bit_exact(backend, kind, store, ckpt, rng):
    plan = scenario(rng, kind, processes=4, layers=SPEC.layers, experts=SPEC.experts, slots_per_rank=3,
                    expert_bytes=SPEC.expert_bytes)
    plan.validate()
    out = run_jobs(_jobs(plan, backend, store, ckpt), store)
    check_exact(plan, out)
    planned = plan.bytes_by_route()
    moved = {route: sum(r["report"]["bytes"][route] for r in out.values()) for route in planned}
    # Nothing failed, so every transfer took its planned route, and disk read exactly
    # the missing experts.
    assert moved == planned
    assert all(r["report"]["fallbacks"] == 0 for r in out.values())
    missing_bytes = sum(len(m) for m in plan.missing) * SPEC.expert_bytes
    assert moved["disk"] >= missing_bytes if kind == "fail" else moved["disk"] == 0
    for r in out.values():
        n = r["report"]["new_rank"]
        most = max((len(plan.receives(n, layer)) for layer in range(SPEC.layers)), default=0) if n is not None else 0
        assert r["report"]["peak_staging_bytes"] <= max(most * SPEC.expert_bytes, 1)


def _victim_and_layer(plan: TransferPlan) -> tuple[int, int]:
    """A (source rank, layer >= 1) with the most planned peer reads, so the kill hits readers."""
    best = max(
        ((len(plan.peer_reads_from(r, layer)), -layer, r) for layer in range(1, plan.new.num_layers)
         for r in sorted(plan.mapping.live_sources)),
    )
    assert best[0] > 0, "scenario has no peer reads after layer 0"
    return best[2], -best[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_killed_mid_layer_receivers_fall_through(backend, store, ckpt, rng):
    for _ in range(20):
        plan = scenario(rng, "leave", processes=4, layers=SPEC.layers, experts=SPEC.experts, slots_per_rank=3,
                        expert_bytes=SPEC.expert_bytes)
        if any(plan.peer_reads_from(r, layer) for layer in range(1, SPEC.layers) for r in plan.mapping.live_sources):
            break
    victim, layer = _victim_and_layer(plan)
    print(f"victim old rank {victim} killed at the start of layer {layer}'s peer reads")
    fault = FaultPoint("peer", layer, victim)
    jobs = _jobs(plan, backend, store, ckpt, fault=fault, source_timeout_s=3.0, dead_after_s=1.0)
    out = run_jobs(jobs, store, fault=fault)
    check_exact(plan, {k: r for k, r in out.items()})
    hit = [o for r in out.values() for o in r["outcomes"]
           if o["layer"] >= layer and o["planned"] == "peer" and
           next(t for t in plan.receives(r["report"]["new_rank"], o["layer"]) if t.dst_slot == o["dst_slot"]).sources[0].rank == victim]
    assert hit, "no transfer planned from the victim at or after the kill"
    for o in hit:
        assert o["source"] != victim and o["attempts"] >= 2, o
    vidx = Participants.of(plan.mapping).of_old(victim)
    for r in out.values():
        # One-sided transports blame only the dead peer; a torch group breaks as a
        # whole, so its members may also fail reads from live peers (then disk).
        if backend != "torch":
            assert set(r["report"]["failed_peers"]) <= {victim}, r["report"]["failed_peers"]
        assert any(vidx in v for v in r["report"]["excluded"].values()), r["report"]["excluded"]


def test_single_process_stale_epoch_refused(store, ckpt, rng):
    """One process, a plan onto itself from disk (every other rank dead), then the
    same epoch again: refused."""
    from elastic_ep.core.placement import ExpertPlacement
    from elastic_ep.core.plan import build_plan
    from elastic_ep.core.policy import get_policy
    from elastic_ep.core.rank_mapping import RankMapping

    # Experts 6 and 7 live only on rank 1, which dies.
    old = ExpertPlacement(np.array([[0, 1, 2, 3, 4, 5, 0, 1, 6, 7, 2, 3, 4, 5, 6, 7]] * SPEC.layers), 8, SPEC.experts)
    mapping = RankMapping.build(2, dead=[1])
    new = get_policy("min_migration").rebalance(old, mapping, np.ones((SPEC.layers, SPEC.experts)))
    plan = build_plan(old, new, mapping, SPEC.expert_bytes, epoch=5)
    layout = SPEC.layout()
    disk = SafetensorsExpertSource(ckpt, SPEC.naming, layout, SPEC.moe_layer_ids)
    weights = allocate_weights(layout, SPEC.layers, 8)
    load_rank(disk, old, 0, weights)
    ex = PlanExecutor(weights, layout, None, disk, store, dead_after_s=1.0)
    report = ex.execute(plan, old_rank=0)
    assert report.bytes_by_route()["disk"] == sum(len(m) for m in plan.missing) * SPEC.expert_bytes > 0
    from elastic_ep.tools.synthetic_rank import mismatched_slots

    assert mismatched_slots(SPEC, layout, new, 0, weights) == []
    with pytest.raises(StaleEpochError, match="epoch 5"):
        ex.execute(plan, old_rank=0)
    # The constructor's store holds each plan's keys under <prefix>/<epoch>/; a store
    # given to execute is the plan's own, and its keys repeat neither.
    assert store.check(["elastic-ep/5/exec/hb/0", "elastic-ep/5/exec/layer/0/done/0"])
    again = build_plan(new, new, RankMapping.build(1, dead=[]), SPEC.expert_bytes, epoch=6)
    ex.execute(again, old_rank=0, store=dist.PrefixStore("plan-6", store))
    assert store.check(["plan-6/exec/hb/0", f"plan-6/exec/layer/{SPEC.layers - 1}/done/0"])
    assert not store.check(["plan-6/elastic-ep/6/exec/hb/0"])


# -- which candidates a transport tries, without processes --------------------------------
class _Scripted:
    """A transport whose rounds fail every read from a participant in ``dead`` and
    deliver the others; ``rounds`` records each round's reads and sends."""

    name = "scripted"

    def __init__(self, dead: set[int], poison: bool = False) -> None:
        super().__init__(SPEC.layout())  # type: ignore[call-arg]
        self.dead, self.poison = dead, poison
        self.rounds: list[tuple[list[PeerRead], list[PeerSend]]] = []

    def _register_weights(self) -> None:
        pass

    def _register_staging(self) -> None:
        pass

    def transfer(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        self.rounds.append((list(reads), list(sends)))
        self.staging_poisoned = self.poison
        return [TransportError(f"participant {r.src} is dead") if r.src in self.dead else None for r in reads]


class ScriptedOneSided(_Scripted, OneSidedTransport):
    def _open_peer(self, index: int, endpoint: dict[str, Any]) -> Any:
        raise NotImplementedError("scripted rounds open no peer")

    def _start(self, rnd: ReadRound, peer: int, open_peer: OpenPeer, idx: list[int]) -> PeerReadOp:
        raise NotImplementedError("scripted rounds start nothing")

    def _poll(self, op: PeerReadOp) -> tuple[bool, str | None]:
        raise NotImplementedError("scripted rounds poll nothing")

    def _abandon(self, rnd: ReadRound, op: PeerReadOp) -> str:
        raise NotImplementedError("scripted rounds abandon nothing")


class ScriptedTwoSided(_Scripted, TwoSidedTransport):
    pass


EB = SPEC.expert_bytes
RECEIVES = [
    Receive(0, (PeerSource(1, 0), PeerSource(2, 1))),  # its first source dies, the second delivers
    Receive(EB, (PeerSource(1, 2),)),  # its only peer source dies
    Receive(2 * EB, (PeerSource(3, 0), PeerSource(1, 1))),  # delivered by the planned one
]
SENDS = [PeerSend(dst=2, src_slot=1)]


def _outcomes(out: list[ReceiveOutcome]) -> list[tuple[int | None, list[int]]]:
    return [(o.delivered, [k for k, _ in o.failures]) for o in out]


def test_one_sided_falls_through_candidates_and_skips_failed_peers() -> None:
    tp = ScriptedOneSided(dead={1})
    out = tp.exchange(0, RECEIVES, SENDS, timeout=1.0)
    assert _outcomes(out) == [(1, [0]), (None, [0]), (0, [])]
    assert [o.attempts for o in out] == [2, 1, 1]
    # Round 1: every planned source; round 2: the next candidate of the failed one.
    assert [[(r.src, r.src_slot, r.dst_offset) for r in reads] for reads, _ in tp.rounds] == [
        [(1, 0, 0), (1, 2, EB), (3, 0, 2 * EB)],
        [(2, 1, 0)],
    ]
    assert all(sends == [] for _, sends in tp.rounds)  # readers fetch; sources post nothing
    # Later in the epoch the failed peer is not tried again.
    tp.rounds.clear()
    out = tp.exchange(1, [Receive(0, (PeerSource(1, 3), PeerSource(0, 3)))], [], timeout=1.0)
    assert _outcomes(out) == [(1, [])] and out[0].attempts == 1
    assert [[r.src for r in reads] for reads, _ in tp.rounds] == [[0]]


def test_two_sided_tries_the_planned_source_only_and_posts_the_sends_once() -> None:
    tp = ScriptedTwoSided(dead={1})
    out = tp.exchange(0, RECEIVES, SENDS, timeout=1.0)
    assert _outcomes(out) == [(None, [0]), (None, [0]), (0, [])]
    assert len(tp.rounds) == 1 and tp.rounds[0][1] == SENDS
    # A participant with nothing to receive still posts what it is asked to send.
    tp.rounds.clear()
    assert tp.exchange(1, [], SENDS, timeout=1.0) == []
    assert tp.rounds == [([], SENDS)]


def test_a_poisoned_staging_buffer_is_retired_and_its_bytes_kept() -> None:
    tp = ScriptedOneSided(dead=set(), poison=True)
    staging = torch.arange(3 * EB, dtype=torch.int64).to(torch.uint8)
    tp.register_staging(staging)
    tp.exchange(0, RECEIVES[2:], [], timeout=1.0)
    assert tp.staging is not staging and torch.equal(tp.staging, staging)
    assert len(tp.retired_staging) == 1 and tp.retired_staging[0] is staging
    assert tp.held_staging_bytes() == 2 * staging.numel()


def _report_then_linger(job: Any, results: Any) -> None:
    """A rank that reports at once and exits only a second after the harness's deadline,
    as a rank tearing down slowly on a loaded machine does."""
    import time

    results.put({"old_rank": job.old_rank, "new_rank": None})
    time.sleep(max(0.0, job.deadline - time.time()) + 1.0)


def test_harness_lets_ranks_that_reported_exit_after_the_deadline():
    import time
    from types import SimpleNamespace

    timeout = 8.0
    job = SimpleNamespace(old_rank=0, new_rank=None, deadline=time.time() + timeout)
    out = run_jobs([job], timeout=timeout, target=_report_then_linger)
    assert list(out) == [0]
