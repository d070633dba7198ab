"""The rank side of a plan: apply a :class:`~elastic_ep.core.plan.TransferPlan` to this
process's expert weights, layer by layer.

Per layer, every participant (live old ranks in order, then joining ranks) does:

1. *read*: each changed local slot is read into a staging buffer, trying the plan's
   sources in order: a local copy, live peers through the transport (a peer that dies
   or times out is skipped for the rest of the epoch), then the disk checkpoint;
2. *barrier*: wait until every live participant has finished reading the layer (dead
   ones are waited out by heartbeat), so no one overwrites a slot a peer still reads;
3. *write*: copy the staged slots into the weights.

Extra memory is one layer's changed local slots (``expert_bytes`` each). Leaving ranks
take part as sources and exit after the last barrier; joining ranks only receive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import torch

from loaders.layout import ExpertLayout, LayerWeights
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.transport import PeerRead, PeerSend, PeerTransport

from elastic_ep.runtime.barrier import Liveness, StoreBarrier, StoreHeartbeat
from elastic_ep.errors import ConfigError, PlanError, StaleEpochError, TransportError
from elastic_ep.core.plan import DISK, ROUTES, Transfer, TransferPlan
from elastic_ep.core.rank_mapping import RankMapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Participants:
    """Processes executing one plan, indexed ``0 .. world-1``: live old ranks (survivors
    and leaving) in old order, then joining ranks in new order.

    Example: 4 old ranks, rank 1 dead, one joining -> ``old=(0, 2, 3)``,
    ``joining=(3,)`` (the new rank of the joiner), ``world == 4``.
    """

    old: tuple[int, ...]
    joining: tuple[int, ...]
    mapping: RankMapping

    @classmethod
    def of(cls, mapping: RankMapping) -> "Participants":
        old = tuple(sorted(mapping.live_sources))
        return cls(old, tuple(range(mapping.num_surviving, mapping.new_ep_size)), mapping)

    @property
    def world(self) -> int:
        return len(self.old) + len(self.joining)

    def of_old(self, old_rank: int) -> int:
        try:
            return self.old.index(old_rank)
        except ValueError:
            raise PlanError(f"old rank {old_rank} is not a live participant (live: {list(self.old)})") from None

    @cached_property
    def _new_to_old(self) -> list[int]:
        return self.mapping.new_to_old()

    def of_new(self, new_rank: int) -> int:
        n2o = self._new_to_old
        if not 0 <= new_rank < len(n2o):
            raise PlanError(f"new rank {new_rank} outside 0..{len(n2o) - 1}")
        old = n2o[new_rank]
        return self.of_old(old) if old >= 0 else len(self.old) + self.joining.index(new_rank)


@dataclass(frozen=True)
class TransferOutcome:
    """How one slot was filled: ``route`` and ``source`` (old rank, or ``DISK``) of the
    source that delivered, after ``attempts`` tries; ``planned`` is the plan's route."""

    layer: int
    dst_slot: int
    logical: int
    planned: str
    route: str
    source: int
    attempts: int
    nbytes: int


@dataclass
class ExecutionReport:
    """What one rank did for one plan.

    ``peak_staging_bytes`` is the largest staging memory held at once (one layer's
    changed local slots, plus any buffer retired after a peer timed out mid-read);
    ``excluded[layer]`` lists participants the barrier stopped waiting for.
    """

    epoch: int
    old_rank: int | None
    new_rank: int | None
    participant: int
    world: int
    outcomes: list[TransferOutcome] = field(default_factory=list)
    peak_staging_bytes: int = 0
    layer_bytes: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("connect", "local", "peer", "disk", "barrier", "write"), 0.0))
    excluded: dict[int, list[int]] = field(default_factory=dict)
    fenced_layers: list[int] = field(default_factory=list)
    failed_peers: list[int] = field(default_factory=list)

    def bytes_by_route(self) -> dict[str, int]:
        out = dict.fromkeys(ROUTES, 0)
        for o in self.outcomes:
            out[o.route] += o.nbytes
        return out

    def fallbacks(self) -> int:
        """Slots that did not come from their planned source."""
        return sum(1 for o in self.outcomes if o.attempts > 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "old_rank": self.old_rank,
            "new_rank": self.new_rank,
            "bytes": self.bytes_by_route(),
            "planned_bytes": {r: sum(o.nbytes for o in self.outcomes if o.planned == r) for r in ROUTES},
            "slots": len(self.outcomes),
            "fallbacks": self.fallbacks(),
            "peak_staging_bytes": self.peak_staging_bytes,
            "seconds": round(self.seconds, 4),
            "phase_seconds": {k: round(v, 4) for k, v in self.phase_seconds.items()},
            "excluded": {str(k): v for k, v in self.excluded.items()},
            "fenced_layers": self.fenced_layers,
            "failed_peers": self.failed_peers,
        }


class PlanExecutor:
    """Applies plans to one process's weights.

    Args:
        weights: per MoE layer, the serving tensors ``[slots_per_rank, ...]`` (by name or
            in layout order); registered with the transport once.
        layout: one expert's serving layout.
        transport: a :class:`PeerTransport`, or None when this process only ever reads
            locally and from disk (a single-rank deployment).
        disk: the checkpoint, for missing experts and as every transfer's last resort.
        store: ``torch.distributed.Store`` API, shared by the participants.
        source_timeout_s: the longest wait on one source before trying the next.
        barrier_timeout_s: the longest wait for live participants at a layer barrier.
        liveness: who is alive; default a store heartbeat (``dead_after_s``).
        on_phase: called with ``("local" | "peer" | "disk" | "barrier" | "write", layer)``
            as each phase of a layer starts (progress reporting, fault injection).
        routes: the routes this executor may use; ``("disk",)`` reloads every changed
            slot from the checkpoint (the baseline serving engines had before peer
            transfer, for benchmarks). Disk is always allowed.
    """

    def __init__(
        self,
        weights: Sequence[LayerWeights],
        layout: ExpertLayout,
        transport: PeerTransport | None,
        disk: SafetensorsExpertSource | None,
        store: Any,
        *,
        source_timeout_s: float = 10.0,
        barrier_timeout_s: float = 300.0,
        heartbeat_s: float = 0.2,
        dead_after_s: float = 2.0,
        liveness: Liveness | None = None,
        prefix: str = "elastic-ep/exec",
        on_phase: Callable[[str, int], None] | None = None,
        routes: Sequence[str] = ROUTES,
    ) -> None:
        self.layout = layout
        self.weights = [layout.check_weights(w, f"layer {i}")[0] for i, w in enumerate(weights)]
        if not self.weights:
            raise ConfigError("no MoE layers given")
        first = self.weights[0][layout.names[0]]
        self.slots_per_rank = int(first.shape[0])
        self.device = first.device
        self.transport, self.disk, self.store = transport, disk, store
        self.source_timeout_s, self.barrier_timeout_s = source_timeout_s, barrier_timeout_s
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.liveness = liveness
        self.prefix = prefix
        self.on_phase = on_phase or (lambda phase, layer: None)
        unknown = set(routes) - set(ROUTES)
        if unknown:
            raise ConfigError(f"unknown routes {sorted(unknown)}; choose from {list(ROUTES)}")
        self.routes = frozenset(routes) | {"disk"}
        self.last_epoch = -1
        if disk is not None and disk.layout.expert_bytes != layout.expert_bytes:
            raise ConfigError(
                f"disk source expert_bytes {disk.layout.expert_bytes} != serving layout {layout.expert_bytes}"
            )
        if transport is not None:
            transport.register_weights(self.weights)
        self._retired: list[torch.Tensor] = []

    # -- checks ------------------------------------------------------------------------
    def _check_plan(self, plan: TransferPlan, old_rank: int | None, new_rank: int | None) -> tuple[int | None, int | None]:
        if plan.epoch <= self.last_epoch:
            raise StaleEpochError("plan", plan.epoch, self.last_epoch)
        if plan.new.num_layers != len(self.weights) or plan.new.slots_per_rank != self.slots_per_rank:
            raise PlanError(
                f"plan has {plan.new.num_layers} layers x {plan.new.slots_per_rank} slots per rank, "
                f"these weights {len(self.weights)} x {self.slots_per_rank}"
            )
        if plan.expert_bytes != self.layout.expert_bytes:
            raise PlanError(f"plan expert_bytes {plan.expert_bytes} != serving layout {self.layout.expert_bytes}")
        m = plan.mapping
        if old_rank is not None:
            if old_rank not in m.live_sources:
                raise PlanError(f"old rank {old_rank} is dead in plan epoch {plan.epoch}; it must not act on it")
            mapped = m.old_to_new[old_rank]
            if new_rank is not None and new_rank != mapped:
                raise PlanError(f"old rank {old_rank} becomes new rank {mapped}, not {new_rank}")
            new_rank = mapped if mapped >= 0 else None
        elif new_rank is None or not m.num_surviving <= new_rank < m.new_ep_size:
            raise PlanError(
                f"a joining process needs a new rank in {m.num_surviving}..{m.new_ep_size - 1}, got {new_rank}"
            )
        return old_rank, new_rank

    # -- the one verb ------------------------------------------------------------------
    def execute(self, plan: TransferPlan, old_rank: int | None = None, new_rank: int | None = None) -> ExecutionReport:
        """Carry out this process's part of ``plan``: ``old_rank`` for a process that
        held weights before (``new_rank`` follows from the mapping), ``new_rank`` alone
        for a joining one. Returns once every live participant has passed the last layer."""
        t0 = time.perf_counter()
        old_rank, new_rank = self._check_plan(plan, old_rank, new_rank)
        parts = Participants.of(plan.mapping)
        me = parts.of_old(old_rank) if old_rank is not None else parts.of_new(new_rank)  # type: ignore[arg-type]
        report = ExecutionReport(plan.epoch, old_rank, new_rank, me, parts.world)
        prefix = f"{self.prefix}/{plan.epoch}"
        heartbeat = None
        liveness = self.liveness
        if liveness is None:
            heartbeat = StoreHeartbeat(self.store, prefix, me, self.heartbeat_s, self.dead_after_s).start()
            liveness = heartbeat
        barrier = StoreBarrier(self.store, prefix, me, parts.world, liveness, self.barrier_timeout_s)
        eb = self.layout.expert_bytes
        per_layer = [plan.receives(new_rank, layer) if new_rank is not None else [] for layer in range(plan.new.num_layers)]
        cap = max((len(r) for r in per_layer), default=0) * eb
        staging = torch.empty(max(cap, 1), dtype=torch.uint8, device=self.device)
        report.layer_bytes = cap
        report.peak_staging_bytes = cap
        failed: set[int] = set()  # participants that failed a read this epoch
        try:
            t = time.perf_counter()
            if self.transport is not None:
                self.transport.connect(plan.epoch, me, parts.world, self.store, timeout=self.source_timeout_s * 3)
                self._retired.clear()  # the previous epoch's abandoned operations are closed
                self.transport.register_staging(staging)
            elif parts.world > 1 and any(t.route == "peer" for t in plan.transfers):
                raise ConfigError("the plan reads from peers but this executor has no transport")
            report.phase_seconds["connect"] = time.perf_counter() - t
            for layer in range(plan.new.num_layers):
                staging = self._layer(plan, layer, old_rank, per_layer[layer], parts, me, staging, failed, barrier, report)
                report.peak_staging_bytes = max(
                    report.peak_staging_bytes, staging.numel() + sum(t.numel() for t in self._retired)
                )
            report.failed_peers = sorted(parts.old[i] if i < len(parts.old) else -1 for i in failed)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        self.last_epoch = plan.epoch
        report.seconds = time.perf_counter() - t0
        log.info("epoch %d executed: %s", plan.epoch, report.to_dict())
        return report

    # -- one layer ---------------------------------------------------------------------
    def _layer(
        self,
        plan: TransferPlan,
        layer: int,
        old_rank: int | None,
        recvs: list[Transfer],
        parts: Participants,
        me: int,
        staging: torch.Tensor,
        failed: set[int],
        barrier: StoreBarrier,
        report: ExecutionReport,
    ) -> torch.Tensor:
        eb = self.layout.expert_bytes
        named = self.weights[layer]
        offsets = [i * eb for i in range(len(recvs))]
        cursor = [0] * len(recvs)  # index into each transfer's sources
        attempts = [0] * len(recvs)
        done: dict[int, int] = {}  # recv index -> index of the source that delivered
        ph = report.phase_seconds

        self.on_phase("local", layer)
        t = time.perf_counter()
        for i, tr in enumerate(recvs):
            src = tr.sources[0]
            if src.route == "local" and "local" in self.routes:
                attempts[i] = 1
                self.layout.pack_slot(named, src.slot, out=staging[offsets[i] : offsets[i] + eb])
                done[i] = 0
        ph["local"] += time.perf_counter() - t

        self.on_phase("peer", layer)
        t = time.perf_counter()
        staging = self._peer_reads(plan, layer, old_rank, recvs, parts, offsets, cursor, attempts, done, staging, failed)
        ph["peer"] += time.perf_counter() - t

        self.on_phase("disk", layer)
        t = time.perf_counter()
        to_disk = [i for i in range(len(recvs)) if i not in done]
        self._disk_reads(layer, recvs, to_disk, offsets, staging)
        for i in to_disk:
            attempts[i] += 1
            done[i] = len(recvs[i].sources) - 1
        ph["disk"] += time.perf_counter() - t

        self.on_phase("barrier", layer)
        t = time.perf_counter()
        gone = barrier.wait(f"layer/{layer}")
        if gone:
            report.excluded[layer] = gone
        ph["barrier"] += time.perf_counter() - t
        if barrier.fenced:
            # The others wrote this layer without waiting for us: what we read from
            # peers may be their new bytes. Read those slots again from disk.
            report.fenced_layers.append(layer)
            again = [i for i in range(len(recvs)) if recvs[i].sources[done[i]].route == "peer"]
            log.warning("layer %d: passed without this rank; %d peer-read slots re-read from disk", layer, len(again))
            self._disk_reads(layer, recvs, again, offsets, staging)
            for i in again:
                attempts[i] += 1
                done[i] = len(recvs[i].sources) - 1

        self.on_phase("write", layer)
        t = time.perf_counter()
        for i, tr in enumerate(recvs):
            buf = staging[offsets[i] : offsets[i] + eb]
            for st, off in zip(self.layout.tensors, self.layout.offsets):
                self.layout.row_bytes_view(named[st.name], tr.dst_slot).copy_(buf[off : off + st.row_bytes])
            src = tr.sources[done[i]]
            report.outcomes.append(
                TransferOutcome(layer, tr.dst_slot, tr.logical, tr.route, src.route, src.rank, attempts[i], eb)
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ph["write"] += time.perf_counter() - t
        return staging

    def _peer_reads(
        self,
        plan: TransferPlan,
        layer: int,
        old_rank: int | None,
        recvs: list[Transfer],
        parts: Participants,
        offsets: list[int],
        cursor: list[int],
        attempts: list[int],
        done: dict[int, int],
        staging: torch.Tensor,
        failed: set[int],
    ) -> torch.Tensor:
        tp = self.transport
        if tp is None or "peer" not in self.routes:
            return staging
        sends: list[PeerSend] = []
        if not tp.one_sided and old_rank is not None:
            sends = [
                PeerSend(parts.of_new(t.dst_rank), t.sources[0].slot)
                for t in plan.layer_transfers(layer)
                if t.sources[0].route == "peer" and t.sources[0].rank == old_rank
            ]
        pending = [i for i, t in enumerate(recvs) if i not in done and t.sources[0].route == "peer"]
        first = True
        while pending or (first and sends):
            batch: list[tuple[int, int]] = []  # (recv index, participant)
            for i in pending:
                srcs = recvs[i].sources
                # Two-sided transports only have the planned sender posting a send.
                while cursor[i] < len(srcs) - 1 and (
                    srcs[cursor[i]].route != "peer"
                    or (tp.one_sided and parts.of_old(srcs[cursor[i]].rank) in failed)
                    or (not tp.one_sided and cursor[i] > 0)
                ):
                    cursor[i] += 1
                if srcs[cursor[i]].rank != DISK and srcs[cursor[i]].route == "peer":
                    batch.append((i, parts.of_old(srcs[cursor[i]].rank)))
            if not batch and not (first and sends):
                break
            reads = [PeerRead(p, recvs[i].sources[cursor[i]].slot, offsets[i]) for i, p in batch]
            outcomes = tp.exchange(layer, reads, sends if first else [], self.source_timeout_s)
            first = False
            if tp.staging_poisoned:
                staging = self._replace_staging(staging)
            pending = []
            for (i, p), err in zip(batch, outcomes):
                attempts[i] += 1
                if err is None:
                    done[i] = cursor[i]
                else:
                    log.warning("layer %d slot %d: read from participant %d failed: %s", layer, recvs[i].dst_slot, p, err)
                    failed.add(p)
                    cursor[i] += 1
                    if tp.one_sided:
                        pending.append(i)
        return staging

    def _replace_staging(self, old: torch.Tensor) -> torch.Tensor:
        """An abandoned read may still land in ``old``: keep it alive (so the memory is
        not reused) and go on with a copy in a fresh, registered buffer."""
        assert self.transport is not None
        new = old.clone()
        self._retired.append(old)
        self.transport.register_staging(new)
        return new

    def _disk_reads(
        self, layer: int, recvs: list[Transfer], which: list[int], offsets: list[int], staging: torch.Tensor
    ) -> None:
        if not which:
            return
        if self.disk is None:
            raise TransportError(
                f"layer {layer}: {len(which)} slots need the checkpoint (no live replica left) but no "
                "disk source is configured; pass the model directory"
            )
        # One read per distinct expert; further slots of the same expert copy it.
        first: dict[int, int] = {}
        dup: list[tuple[int, int]] = []
        for i in which:
            j = first.setdefault(recvs[i].logical, i)
            if j != i:
                dup.append((i, j))
        uniq = list(first.values())
        self.disk.read_packed([(layer, recvs[i].logical) for i in uniq], staging, [offsets[i] for i in uniq])
        eb = self.layout.expert_bytes
        for i, j in dup:
            staging[offsets[i] : offsets[i] + eb].copy_(staging[offsets[j] : offsets[j] + eb])

