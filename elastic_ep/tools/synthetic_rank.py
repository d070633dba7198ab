"""A stand-alone rank holding expert weights in plain tensors: what the demo, the chaos
tests and the transfer benchmark run in each process in place of a serving engine.

It loads its slots from a checkpoint through the disk loader (as a serving process
loads its weights at start-up): a synthetic one, or a Hugging Face model directory. It
executes plans with :class:`PlanExecutor` and checks every slot bit-exactly against the
checkpoint's expert (:class:`loaders.checkpoint.model.ExpertModel`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch

from loaders.layout import ExpertLayout
from loaders.checkpoint.safetensors_source import ExpertRequest, SafetensorsExpertSource
from loaders.checkpoint.model import ExpertModel

from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan

FILL_BYTE = 0xA5  # what an unfilled slot holds, so a missed write shows


def allocate_weights(layout: ExpertLayout, num_layers: int, slots_per_rank: int, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    return [layout.allocate(slots_per_rank, device, fill_byte=FILL_BYTE) for _ in range(num_layers)]


def load_rank(
    source: SafetensorsExpertSource, placement: ExpertPlacement, rank: int, weights: list[dict[str, torch.Tensor]]
) -> int:
    """Fill ``rank``'s slots of ``placement`` from the checkpoint; returns bytes read."""
    total = 0
    for layer in range(placement.num_layers):
        reqs = [ExpertRequest(layer, int(e), s) for s, e in enumerate(placement.rank_slots(rank)[layer])]
        total += source.load(reqs, weights).bytes_read if reqs else 0
    return total


def mismatched_slots(
    spec: ExpertModel, layout: ExpertLayout, placement: ExpertPlacement, rank: int, weights: list[dict[str, torch.Tensor]]
) -> list[tuple[int, int, int]]:
    """``(layer, slot, logical)`` of every slot whose bytes differ from its expert's."""
    bad = []
    for layer in range(placement.num_layers):
        for slot, e in enumerate(placement.rank_slots(rank)[layer]):
            want = spec.expected_row(layer, int(e))
            for name, w in weights[layer].items():
                if not torch.equal(w[slot].cpu().view(torch.uint8), want[name].view(torch.uint8)):
                    bad.append((layer, slot, int(e)))
                    break
    return bad


@dataclass(frozen=True)
class FaultPoint:
    """Stop at ``(phase, layer)`` of plan execution: the ``victim`` announces itself
    under ``<key>/at`` and sleeps (to be SIGKILLed by whoever watches), every other
    participant waits there for ``<key>/go``. Example: ``FaultPoint("peer", 2, victim=1)``."""

    phase: str
    layer: int
    victim: int  # old rank
    key: str = "elastic-ep/fault"
    wait_s: float = 60.0


@dataclass(frozen=True)
class RankJob:
    """One process's part in executing ``plan_json`` (picklable, for spawned processes).

    ``old_rank`` is None for a joining process (then ``new_rank`` is given).
    """

    transport: str
    store_host: str
    store_port: int
    ckpt_dir: str
    spec: ExpertModel
    plan_json: str
    old_rank: int | None
    new_rank: int | None = None
    source_timeout_s: float = 5.0
    dead_after_s: float = 1.5
    fault: FaultPoint | None = None
    transport_options: tuple[tuple[str, Any], ...] = ()


def run_job(job: RankJob, results: Any = None) -> dict[str, Any]:
    """Load, execute, verify. Returns (and puts on ``results``, a queue, if given) a
    dict with the execution report, mismatched slots, and an ``error`` on failure."""
    out: dict[str, Any] = {"old_rank": job.old_rank, "new_rank": job.new_rank, "pid": os.getpid()}
    try:
        out.update(_run(job))
    except BaseException as e:  # reported to the parent, which asserts on it
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    if results is not None:
        results.put(out)
    return out


def _run(job: RankJob) -> dict[str, Any]:
    import torch.distributed as dist

    from loaders.transport import get_transport

    plan = TransferPlan.from_json(job.plan_json)
    spec = job.spec
    layout = spec.layout()
    store = dist.TCPStore(job.store_host, job.store_port, is_master=False, timeout=timedelta(seconds=60))
    disk = SafetensorsExpertSource(job.ckpt_dir, spec.naming, layout, spec.moe_layer_ids)
    weights = allocate_weights(layout, plan.new.num_layers, plan.new.slots_per_rank)
    t = time.perf_counter()
    loaded = load_rank(disk, plan.old, job.old_rank, weights) if job.old_rank is not None else 0
    load_s = time.perf_counter() - t

    def on_phase(phase: str, layer: int) -> None:
        f = job.fault
        if f is None or (phase, layer) != (f.phase, f.layer):
            return
        if job.old_rank == f.victim:
            store.set(f"{f.key}/at", str(os.getpid()))
            time.sleep(f.wait_s)  # killed here
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + f.wait_s
        while not store.check([f"{f.key}/go"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault point {f}: no go signal")
            time.sleep(0.01)

    transport = get_transport(job.transport, layout, **dict(job.transport_options))
    ex = PlanExecutor(
        weights, layout, transport, disk, store,
        source_timeout_s=job.source_timeout_s, dead_after_s=job.dead_after_s,
        heartbeat_s=min(0.2, job.dead_after_s / 4), on_phase=on_phase,
    )
    try:
        report = ex.execute(plan, job.old_rank, job.new_rank)
    finally:
        transport.close()
    bad = mismatched_slots(spec, layout, plan.new, report.new_rank, weights) if report.new_rank is not None else []
    return {
        "report": report.to_dict(),
        "outcomes": [o.__dict__ for o in report.outcomes],
        "mismatched": bad,
        "loaded_bytes": loaded,
        "load_seconds": load_s,
    }


def scenario(
    rng: Any,
    kind: str,
    processes: int = 4,
    layers: int = 3,
    experts: int = 8,
    slots_per_rank: int = 4,
    expert_bytes: int = 1,
    epoch: int = 1,
    policy: str = "min_migration",
) -> TransferPlan:
    """A random membership change executed by ``processes`` live processes.

    ``kind``: ``fail`` (one of ``processes + 1`` ranks died), ``leave`` (one of
    ``processes`` drains out), ``join`` (``processes - 1`` ranks plus one joining).
    The old placement is DeepSeek's EPLB on a random skewed load, shuffled inside
    ranks; the new one comes from ``policy`` on a fresh load.
    """
    import numpy as np

    from elastic_ep.core.placement import initial_placement
    from elastic_ep.core.plan import build_plan
    from elastic_ep.core.policy import get_policy
    from elastic_ep.core.rank_mapping import RankMapping

    old_ep = {"fail": processes + 1, "leave": processes, "join": processes - 1}[kind]
    if old_ep * slots_per_rank < experts:
        raise ValueError(f"{old_ep} ranks x {slots_per_rank} slots cannot hold {experts} experts")
    load = rng.zipf(1.5, size=(layers, experts)).astype(np.float64)
    old = get_policy("deepseek", num_groups=1, num_nodes=1).rebalance(
        initial_placement(layers, experts, old_ep, slots_per_rank), RankMapping.build(old_ep), load
    )
    phy = old.phy2log.reshape(layers, old_ep, slots_per_rank).copy()
    for layer in range(layers):
        for r in range(old_ep):
            rng.shuffle(phy[layer, r])
    old = ExpertPlacement(phy.reshape(layers, -1), slots_per_rank, experts)
    victim = int(rng.integers(old_ep))
    mapping = RankMapping.build(
        old_ep,
        dead=[victim] if kind == "fail" else [],
        leaving=[victim] if kind == "leave" else [],
        num_joining=1 if kind == "join" else 0,
    )
    new_load = rng.zipf(1.5, size=(layers, experts)).astype(np.float64)
    new = get_policy(policy).rebalance(old, mapping, new_load)
    return build_plan(old, new, mapping, expert_bytes, epoch=epoch)



def run_agent(
    etcd: Any,
    rank_id: str,
    ckpt_dir: str,
    spec: ExpertModel,
    slots_per_rank: int,
    transport: str = "torch",
    lease_ttl_s: int = 3,
    node: str = "",
    source_timeout_s: float = 5.0,
    dead_after_s: float = 1.5,
    stop: Any = None,
    routes: Sequence[str] = ("local", "peer", "disk"),
    check: bool = True,
    load_seed: int = 0,
) -> None:
    """A stand-alone rank driven by the controller through etcd (``elastic-ep agent``):
    loads its slots from ``ckpt_dir`` at bootstrap, executes plans, and reports in every
    ack how many of its slots are not bit-exact (``check=False``: no checks and no
    request stream, for timing runs). ``load_seed`` seeds the expert popularity its load
    windows report (the same for every rank of a deployment)."""
    from loaders.transport import get_transport

    from elastic_ep.runtime.agent import AgentConfig, RankAgent

    layout = spec.layout()
    weights = allocate_weights(layout, spec.layers, slots_per_rank)
    disk = SafetensorsExpertSource(ckpt_dir, spec.naming, layout, spec.moe_layer_ids)
    tp = get_transport(transport, layout)
    ex = PlanExecutor(weights, layout, tp, disk, None, source_timeout_s=source_timeout_s,
                      dead_after_s=dead_after_s, heartbeat_s=min(0.2, dead_after_s / 4), routes=routes)
    from elastic_ep.core.load_stats import zipf_load

    # One popularity for the whole deployment (seeded by the model), as the ranks of one
    # serving deployment would count it.
    agent = RankAgent(
        AgentConfig(etcd, rank_id, node=node, lease_ttl_s=lease_ttl_s, endpoint={"transport": transport}),
        ex,
        load_initial=lambda placement, rank: load_rank(disk, placement, rank, weights),
        verify=(lambda placement, rank: len(mismatched_slots(spec, layout, placement, rank, weights))) if check else None,
        load_window=lambda: zipf_load(spec.layers, spec.experts, 1.0, load_seed),
    )
    if check:
        threading.Thread(target=serve_requests, args=(agent, spec, layout, weights, agent._stop),
                         name="elastic-ep-serve", daemon=True).start()
    try:
        agent.run(stop)
    finally:
        agent.stop()
        tp.close()


def serve_requests(agent: Any, spec: ExpertModel, layout: ExpertLayout, weights: list[dict[str, torch.Tensor]],
                   stop: Any, tokens_per_step: int = 64, period_s: float = 0.05) -> None:
    """A fake request stream: each step routes tokens to logical experts (Zipf-skewed),
    picks a replica through the placement the weights hold, and for every token landing
    on this rank checks that slot's bytes against the checkpoint's expert (a digest
    cached per expert). Counts go to ``agent.served`` (published with the load)."""
    import hashlib

    import numpy as np

    rng = np.random.default_rng(abs(hash(agent.cfg.id)) % (1 << 32))
    digests: dict[tuple[int, int], bytes] = {}

    def digest_of(rows: dict[str, torch.Tensor]) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for name in layout.names:
            h.update(rows[name].contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    popularity = 1.0 / np.arange(1, spec.experts + 1)
    popularity /= popularity.sum()
    while not stop.wait(period_s):
        if not agent.busy.acquire(blocking=False):
            continue  # the weights are changing: the step waits, as serving pauses
        try:
            held = agent.holding
            if held is None:
                continue
            placement, rank = held
            spr = placement.slots_per_rank
            log2phy = placement.log2phy
            layers = rng.integers(0, spec.layers, tokens_per_step)
            experts = rng.choice(spec.experts, tokens_per_step, p=popularity)
            for layer, e in zip(layers.tolist(), experts.tolist()):
                replicas = log2phy[layer, e]
                slot = int(rng.choice(replicas[replicas >= 0]))
                if slot // spr != rank:
                    continue  # another rank serves this token
                want = digests.get((layer, e))
                if want is None:
                    want = digests[(layer, e)] = digest_of(spec.expected_row(layer, e))
                got = digest_of({n: weights[layer][n][slot % spr] for n in layout.names})
                agent.served["ok" if got == want else "bad"] += 1
        finally:
            agent.busy.release()
