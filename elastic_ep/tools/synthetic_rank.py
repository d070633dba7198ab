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
from typing import Any, Callable

import torch

from controller.etcd_client import EtcdConfig
from controller.records import member_id
from loaders.checkpoint.model import ExpertModel
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.layout import ExpertLayout

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import ROUTES, TransferPlan
from elastic_ep.runtime import slots
from elastic_ep.runtime.agent import AgentConfig, RankAgent
from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.runtime.wiring import AgentHooks, AgentSettings, RankExperts, build_agent, open_checkpoint

FILL_BYTE = 0xA5  # what an unfilled slot holds, so a missed write shows


def allocate_weights(layout: ExpertLayout, num_layers: int, slots_per_rank: int, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    return [layout.allocate(slots_per_rank, device, fill_byte=FILL_BYTE) for _ in range(num_layers)]


def load_rank(
    source: SafetensorsExpertSource, placement: ExpertPlacement, rank: int, weights: list[dict[str, torch.Tensor]]
) -> int:
    """Fill ``rank``'s slots of ``placement`` from the checkpoint; returns bytes read."""
    return slots.fill_rank_slots(source, placement, rank, weights)


def mismatched_slots(
    spec: ExpertModel, layout: ExpertLayout, placement: ExpertPlacement, rank: int, weights: list[dict[str, torch.Tensor]]
) -> list[tuple[int, int, int]]:
    """``(layer, slot, logical)`` of every slot whose bytes differ from its expert's
    (``spec.expected_row``, independent of the disk loader)."""
    return slots.mismatched_slots(layout, placement, rank, weights, slots.model_reference(spec, layout))


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


@dataclass(frozen=True)
class SyntheticRank:
    """A stand-alone rank driven by the controller through etcd (picklable, for spawned
    processes): ``SyntheticRank(EtcdConfig("127.0.0.1:2379"), "r0", "/tmp/ckpt", spec,
    slots_per_rank=4)``.

    ``spec``: the checkpoint's experts (a synthetic spec or an opened model directory);
    ``check``: report in every ack how many slots are not bit-exact and serve a request
    stream that checks them (False: neither, for timing runs); ``load_seed`` seeds the
    expert popularity its load windows report (the same for every rank of a deployment).
    ``freeze``: ``(phase, layer, signal name)``: on reaching that phase of that layer in
    a transfer plan the process sends itself ``SIGSTOP`` (a rank that hangs
    mid-plan) or ``SIGKILL`` (one that crashes), e.g. ``("peer", 1, "SIGSTOP")``.
    ``cut_links``: rank ids whose liveness heartbeats this rank drops, as a cut link
    would (:attr:`~elastic_ep.runtime.agent.RankAgent.heartbeat_drop`; a fault hook).
    ``mirror_bytes``: host memory for the mirror (0: none), filled at most
    ``mirror_fill_bytes_s`` bytes a second.
    """

    etcd: EtcdConfig
    id: str
    ckpt_dir: str
    spec: ExpertModel
    slots_per_rank: int
    transport: str = "torch"
    lease_ttl_s: int = 3
    node: str = ""
    source_timeout_s: float = 5.0
    dead_after_s: float = 1.5
    routes: tuple[str, ...] = ROUTES
    check: bool = True
    load_seed: int = 0
    freeze: tuple[str, int, str] | None = None
    cut_links: tuple[str, ...] = ()
    mirror_bytes: int = 0
    mirror_fill_bytes_s: float = float(1 << 30)

    def settings(self) -> AgentSettings:
        cfg = AgentConfig(self.etcd, self.id, node=self.node, lease_ttl_s=self.lease_ttl_s,
                          endpoint={"transport": self.transport})
        return AgentSettings(cfg, self.transport, checkpoint=self.ckpt_dir, mirror_bytes=self.mirror_bytes,
                             mirror_fill_bytes_s=self.mirror_fill_bytes_s)


def build_rank_agent(rank: SyntheticRank) -> tuple[RankAgent, list[dict[str, torch.Tensor]]]:
    """The agent of ``rank`` (:func:`~elastic_ep.runtime.wiring.build_agent`) on freshly
    allocated weights, and those weights."""
    from elastic_ep.core.load_stats import zipf_load

    spec = rank.spec
    layout = spec.layout()
    weights = allocate_weights(layout, spec.layers, rank.slots_per_rank)
    disk = open_checkpoint(rank.ckpt_dir, layout, spec.naming, spec.moe_layer_ids)
    hooks = AgentHooks(
        reference=slots.model_reference(spec, layout) if rank.check else None,
        # One popularity for the whole deployment (seeded by the model), as the ranks of
        # one serving deployment would count it.
        load_window=lambda: zipf_load(spec.layers, spec.experts, 1.0, rank.load_seed),
    )
    agent = build_agent(rank.settings(), RankExperts(weights, layout, disk, spec.experts), hooks,
                        source_timeout_s=rank.source_timeout_s, dead_after_s=rank.dead_after_s,
                        heartbeat_s=min(0.2, rank.dead_after_s / 4), routes=rank.routes,
                        on_phase=_freeze_at(*rank.freeze) if rank.freeze else None)
    if rank.cut_links:
        cut = frozenset(rank.cut_links)
        agent.heartbeat_drop = lambda token: member_id(token) in cut
    return agent, weights


def _freeze_at(phase: str, layer: int, sig: str) -> Callable[[str, int], None]:
    """An executor phase hook that sends this process ``sig`` at ``(phase, layer)``."""
    signum = signal.Signals[sig]

    def hook(at_phase: str, at_layer: int) -> None:
        if (at_phase, at_layer) == (phase, layer):
            os.kill(os.getpid(), signum)

    return hook


def run_agent(rank: SyntheticRank, stop: threading.Event | None = None) -> None:
    """Run ``rank`` (``elastic-ep agent``) until ``stop`` is set or it has left: loads its
    slots at bootstrap, executes plans, and with ``rank.check`` serves a request stream
    that checks the slots it routes to. Raises :class:`~elastic_ep.errors.CheckpointError`
    before registering when ``rank.ckpt_dir`` lacks an expert of ``rank.spec`` or holds it
    in another shape or dtype, or truncated (such a rank never joins)."""
    agent, weights = build_rank_agent(rank)
    serving = threading.Event()
    if rank.check:
        agent.keep_serving_map = True
        threading.Thread(target=serve_requests, args=(agent, rank.spec, rank.spec.layout(), weights, serving),
                         name="elastic-ep-serve", daemon=True).start()
    try:
        agent.run(stop)
    finally:
        serving.set()
        agent.stop()
        agent.executor.transport.close()


def serve_requests(agent: Any, spec: ExpertModel, layout: ExpertLayout, weights: list[dict[str, torch.Tensor]],
                   stop: Any, tokens_per_step: int = 64, period_s: float = 0.05) -> None:
    """A fake request stream: each step (holding the agent's ``busy`` lock, as an
    engine's forward step does) routes tokens to logical experts (Zipf-skewed) through
    the agent's serving map, and for every token landing on this rank checks that slot's
    bytes against the checkpoint's expert (a CRC-32 cached per expert: it reads every
    byte at a few GB/s, so checking costs the plan little CPU). A token's first
    choice is a replica of the committed placement; one whose choice is routed around
    (a dead rank, a slot being rewritten) counts as ``rerouted``, one whose expert has no
    replica left as ``unavailable``. Counts go to ``agent.served`` (published with the
    load)."""
    import zlib

    import numpy as np

    rng = np.random.default_rng(abs(hash(agent.cfg.id)) % (1 << 32))
    digests: dict[tuple[int, int], int] = {}

    def digest_of(rows: dict[str, torch.Tensor]) -> int:
        crc = 0
        for name in layout.names:
            crc = zlib.crc32(memoryview(rows[name].contiguous().view(torch.uint8).numpy()), crc)
        return crc

    def check(layer: int, e: int, slot: int) -> None:
        want = digests.get((layer, e))
        if want is None:
            want = digests[(layer, e)] = digest_of(spec.expected_row(layer, e))
        got = digest_of({n: weights[layer][n][slot] for n in layout.names})
        agent.served["ok" if got == want else "bad"] += 1

    popularity = 1.0 / np.arange(1, spec.experts + 1)
    popularity /= popularity.sum()
    for key in ("rerouted", "unavailable"):
        agent.served.setdefault(key, 0)
    while not stop.wait(period_s):
        if not agent.busy.acquire(timeout=1.0):
            continue  # the weights are changing: the step waits, as serving pauses
        try:
            m, committed = agent.serving, agent.placement
            if m is None or m.rank is None or agent.holding is None:
                continue
            spr = m.slots_per_rank
            first = committed.log2phy if committed is not None and committed.phy2log.shape == m.phy2log.shape else None
            layers = rng.integers(0, spec.layers, tokens_per_step)
            experts = rng.choice(spec.experts, tokens_per_step, p=popularity)
            for layer, e in zip(layers.tolist(), experts.tolist()):
                slots = m.routes(layer, e)
                if slots.size == 0:
                    agent.served["unavailable"] += 1
                    continue
                pick = -1
                if first is not None:
                    replicas = first[layer, e]
                    pick = int(rng.choice(replicas[replicas >= 0]))
                if pick < 0 or m.phy2log[layer, pick] != e:
                    if pick >= 0:
                        agent.served["rerouted"] += 1
                    pick = int(rng.choice(slots))
                if pick // spr == m.rank:
                    check(layer, e, pick % spr)
        finally:
            agent.busy.release()
