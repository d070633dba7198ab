"""The rank side of a plan: apply a :class:`~elastic_ep.core.plan.TransferPlan` to this
process's expert weights, layer by layer.

Per layer (a :class:`_LayerRun`), every participant (live old ranks in order, then
joining ranks) does:

1. *local*: changed local slots whose first source is this process are packed into a
   staging buffer;
2. *peer*: the transport is handed every other slot whose planned source is a peer, with
   its peer sources in the plan's order, and the sends the plan asks of this process; it
   tries the sources its kind allows (a one-sided transport falls through to the next
   peer and skips peers that failed this epoch; a two-sided one tries the planned peer
   only) and says which delivered (:meth:`loaders.transport.PeerTransport.exchange`);
3. *disk*: every slot still missing is read from the checkpoint, once per expert;
4. *barrier*: wait until every live participant has finished reading the layer (dead
   ones are waited out by heartbeat), so no one overwrites a slot a peer still reads; if
   the others passed without this process, its peer-read slots are read again from disk;
5. *write*: copy the staged slots into the weights.

Extra memory is one layer's changed local slots (``expert_bytes`` each), plus any staging
buffer retired because an abandoned read may still land in it. Leaving ranks take part
as sources and exit after the last barrier; joining ranks only receive.

Store keys. Each plan runs in a store of its own: the ``store`` given to
:meth:`PlanExecutor.execute` (already the plan's, e.g. the controller's etcd store for
the epoch), else the constructor's store under ``<prefix>/<epoch>/`` (a TCPStore shared
by every plan; ``prefix`` defaults to ``elastic-ep``). Within it::

    exec/hb/<participant>                        heartbeat counter (StoreHeartbeat)
    exec/layer/<layer>/done/<participant>        arrived at the layer's barrier
    exec/layer/<layer>/arrived                   arrivals counted at the layer's barrier
    exec/layer/<layer>/excluded/<participant>    the others passed the barrier without it
    transport/endpoint/<participant>             the transport's endpoint (``transport``
                                                 is the transport's ``prefix``)
    transport/pg/...                             the torch transport's group rendezvous

Example: epoch 7, participant 0's heartbeat is ``elastic-ep/7/exec/hb/0`` in a TCPStore
given to the constructor, and ``exec/hb/0`` within a store given as ``store=``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
import torch.distributed as dist

from loaders.layout import ExpertLayout, LayerWeights
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.transport import PeerSend, PeerSource, PeerTransport, Receive, ReceiveOutcome

from elastic_ep.runtime.barrier import Liveness, StoreBarrier, StoreHeartbeat
from elastic_ep.errors import ConfigError, PlanError, StaleEpochError, TransportError
from elastic_ep.core.plan import REMOTE, ROUTES, Source, Transfer, TransferPlan
from elastic_ep.core.rank_mapping import RankMapping

log = logging.getLogger(__name__)

EXEC_PREFIX = "exec"  # the executor's keys within a plan's store


class LayerHooks(Protocol):
    """What serving does around each layer of a plan, so that it runs beside the plan
    and pauses only for one layer's write (:mod:`elastic_ep.runtime.serving`). Before
    the plan starts, serving stops naming the slots of layer 0 that the plan rewrites.

    ``writing(layer, excluded)``: held around the copy of the layer's staged slots into
    the weights. Every live participant (but those in ``excluded``, the ones the
    barriers passed without so far) has read this layer and written the one before, and
    this process has not yet said it read the next one (peers may overwrite their slots
    of it only after that).
    ``written(layer, excluded)``: every live participant (but ``excluded``) wrote the
    layer, the last one (the layers before are told by the next ``writing``).
    """

    def writing(self, layer: int, excluded: list[int]) -> ContextManager[Any]: ...

    def written(self, layer: int, excluded: list[int]) -> None: ...


class _NoHooks:
    def writing(self, layer: int, excluded: list[int]) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def written(self, layer: int, excluded: list[int]) -> None:
        pass


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


def plan_role(plan: TransferPlan, old_rank: int | None, new_rank: int | None) -> int | None:
    """The new rank a process fills in ``plan`` (None: an old rank that leaves), given
    its old rank (None for a joiner) and the new rank it was told; :class:`PlanError`
    for a dead old rank, a new rank that is not the old one's, or a joiner outside the
    joining ranks. Example: 4 old ranks, rank 1 dead -> ``plan_role(plan, 2, None) == 1``."""
    m = plan.mapping
    if old_rank is not None:
        if old_rank not in m.live_sources:
            raise PlanError(f"old rank {old_rank} is dead in plan epoch {plan.epoch}; it must not act on it")
        mapped = m.old_to_new[old_rank]
        if new_rank is not None and new_rank != mapped:
            raise PlanError(f"old rank {old_rank} becomes new rank {mapped}, not {new_rank}")
        return mapped if mapped >= 0 else None
    if new_rank is None or not m.num_surviving <= new_rank < m.new_ep_size:
        raise PlanError(f"a joining process needs a new rank in {m.num_surviving}..{m.new_ep_size - 1}, got {new_rank}")
    return new_rank


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


@dataclass(frozen=True)
class ExecutorOptions:
    """How a :class:`PlanExecutor` waits and which routes it may use; given to its
    constructor by keyword: ``PlanExecutor(..., source_timeout_s=3.0, dead_after_s=1.0)``.

    ``source_timeout_s``: the longest wait on one round of peer reads before trying the
    next source. ``barrier_timeout_s``: the longest wait for live participants at a layer
    barrier. ``heartbeat_s`` / ``dead_after_s``: the store heartbeat's period and the
    silence after which a participant is dead (used unless ``liveness`` is given).
    ``prefix``: where each plan's keys go in a store given to the constructor
    (``<prefix>/<epoch>/``). ``on_phase``: called with ``(phase, layer)``, phase one of
    ``"local" | "peer" | "disk" | "barrier" | "write"``, as each phase of a layer starts
    (progress reporting, fault injection). ``routes``: the routes this executor may use;
    ``("disk",)`` reloads every changed slot from the checkpoint (the baseline serving
    engines had before peer transfer, for benchmarks). Disk is always allowed.
    """

    source_timeout_s: float = 10.0
    barrier_timeout_s: float = 300.0
    heartbeat_s: float = 0.2
    dead_after_s: float = 2.0
    liveness: Liveness | None = None
    prefix: str = "elastic-ep"
    on_phase: Callable[[str, int], None] | None = None
    routes: Sequence[str] = ROUTES

    def __post_init__(self) -> None:
        unknown = set(self.routes) - set(ROUTES)
        if unknown:
            raise ConfigError(f"unknown routes {sorted(unknown)}; choose from {list(ROUTES)}")

    @property
    def allowed_routes(self) -> frozenset[str]:
        return frozenset(self.routes) | {"disk"}

    def phase_started(self, phase: str, layer: int) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, layer)


class PlanExecutor:
    """Applies plans to one process's weights.

    Args:
        weights: per MoE layer, the serving tensors ``[slots_per_rank, ...]`` (by name or
            in layout order); registered with the transport once.
        layout: one expert's serving layout.
        transport: a :class:`PeerTransport`, or None when this process only ever reads
            locally and from disk (a single-rank deployment).
        disk: the checkpoint, for missing experts and as every transfer's last resort.
        store: ``torch.distributed.Store`` shared by the participants, for callers that
            use one store for every plan (each plan's keys go under
            ``<prefix>/<epoch>/``); None when each :meth:`execute` is given its own.
        options: :class:`ExecutorOptions` by keyword.
    """

    def __init__(
        self,
        weights: Sequence[LayerWeights],
        layout: ExpertLayout,
        transport: PeerTransport | None,
        disk: SafetensorsExpertSource | None,
        store: Any = None,
        **options: Any,
    ) -> None:
        self.layout = layout
        self.weights = [layout.check_weights(w, f"layer {i}")[0] for i, w in enumerate(weights)]
        if not self.weights:
            raise ConfigError("no MoE layers given")
        first = self.weights[0][layout.names[0]]
        self.slots_per_rank = int(first.shape[0])
        self.device = first.device
        self.transport, self.disk, self.store = transport, disk, store
        self.options = ExecutorOptions(**options)
        self.routes = self.options.allowed_routes
        self.last_epoch = -1
        if disk is not None and disk.layout.expert_bytes != layout.expert_bytes:
            raise ConfigError(
                f"disk source expert_bytes {disk.layout.expert_bytes} != serving layout {layout.expert_bytes}"
            )
        self.mirror: torch.Tensor | None = None
        self.mirror_rows: Callable[[int], Any] | None = None
        """Set by the rank's agent for each plan: old rank -> what its mirror report says
        each row holds now (None: cannot say). Slots read from a mirror row are kept
        only if the row is still reported with their expert after the read."""
        if transport is not None:
            transport.register_weights(self.weights)

    def register_mirror(self, mirror: torch.Tensor) -> None:
        """This process's host-memory mirror (flat uint8, ``rows * expert_bytes``, a
        packed expert a row): a plan's ``mirror`` sources on this rank name its rows,
        read by peers through the transport and copied here when this rank receives."""
        self.layout.check_mirror(mirror)
        self.mirror = mirror
        if self.transport is not None:
            self.transport.register_mirror(mirror)

    def mirror_row(self, slot: int) -> torch.Tensor:
        """The bytes of source slot ``slot`` (``slots_per_rank + row``) of this rank's mirror."""
        eb, row = self.layout.expert_bytes, slot - self.slots_per_rank
        if self.mirror is None or not 0 <= row < self.mirror.numel() // eb:
            held = 0 if self.mirror is None else self.mirror.numel() // eb
            raise PlanError(f"the plan reads mirror row {row} of this rank, which holds {held} rows")
        return self.mirror[row * eb : (row + 1) * eb]

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
        return old_rank, plan_role(plan, old_rank, new_rank)

    def _plan_store(self, epoch: int, store: Any) -> Any:
        """The store this plan's keys go in: ``store`` as given (the plan's own), else
        the constructor's under ``<prefix>/<epoch>/``."""
        if store is not None:
            return store
        if self.store is None:
            raise ConfigError("no store for this plan: pass store= to execute, or one to PlanExecutor")
        return dist.PrefixStore(f"{self.options.prefix}/{epoch}", self.store)  # joined with "/"

    # -- the one verb ------------------------------------------------------------------
    def execute(
        self, plan: TransferPlan, old_rank: int | None = None, new_rank: int | None = None, *, store: Any = None,
        gone: Callable[[int], bool] | None = None, hooks: LayerHooks | None = None,
    ) -> ExecutionReport:
        """Carry out this process's part of ``plan``: ``old_rank`` for a process that
        held weights before (``new_rank`` follows from the mapping), ``new_rank`` alone
        for a joining one. ``store``: this plan's own store (its keys are not shared with
        another plan), replacing the constructor's for this call. ``gone``: participant
        -> confirmed dead by the controller; the barrier stops waiting for such a one at
        once instead of when its heartbeat goes stale. ``hooks``: serving's side of each
        layer (with them, one more barrier after the last write tells when every
        participant wrote it). Returns once every live participant has passed the last
        layer."""
        t0 = time.perf_counter()
        old_rank, new_rank = self._check_plan(plan, old_rank, new_rank)
        run = _PlanRun.start(self, plan, old_rank, new_rank, self._plan_store(plan.epoch, store))
        run.hooks = hooks
        heartbeat = None
        liveness = self.options.liveness
        if liveness is None:
            o = self.options
            heartbeat = StoreHeartbeat(run.store, EXEC_PREFIX, run.me, o.heartbeat_s, o.dead_after_s).start()
            liveness = heartbeat
        if gone is not None:
            liveness = _UnlessGone(liveness, gone)
        try:
            run.execute(liveness)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        self.last_epoch = plan.epoch
        run.report.seconds = time.perf_counter() - t0
        log.info("epoch %d executed: %s", plan.epoch, run.report.to_dict())
        return run.report


@dataclass(frozen=True)
class _UnlessGone:
    """A participant is alive by ``liveness`` and not confirmed ``gone``."""

    liveness: Liveness
    gone: Callable[[int], bool]

    def alive(self, participant: int) -> bool:
        return self.liveness.alive(participant) and not self.gone(participant)


@dataclass
class _PlanRun:
    """This process's part of one plan, shared by its layers.

    ``receives[layer]``: this process's transfers of each layer (``plan.receives``);
    ``staging``: flat uint8 ``[most receives in a layer * expert_bytes]`` (at least one
    byte), after connect the transport's current buffer; ``failed``: participants a read
    failed from this epoch. Example: new rank 0 receives 3, 0 and 2 slots in layers 0..2
    -> ``staging`` holds ``3 * expert_bytes``.
    """

    ex: PlanExecutor
    plan: TransferPlan
    parts: Participants
    store: Any
    report: ExecutionReport
    receives: list[list[Transfer]]
    staging: torch.Tensor
    failed: set[int] = field(default_factory=set)
    hooks: LayerHooks | None = None

    @classmethod
    def start(
        cls, ex: PlanExecutor, plan: TransferPlan, old_rank: int | None, new_rank: int | None, store: Any
    ) -> "_PlanRun":
        parts = Participants.of(plan.mapping)
        me = parts.of_old(old_rank) if old_rank is not None else parts.of_new(new_rank)  # type: ignore[arg-type]
        report = ExecutionReport(plan.epoch, old_rank, new_rank, me, parts.world)
        receives = [plan.receives(new_rank, layer) if new_rank is not None else [] for layer in range(plan.new.num_layers)]
        cap = max((len(r) for r in receives), default=0) * ex.layout.expert_bytes
        report.layer_bytes = report.peak_staging_bytes = cap
        staging = torch.empty(max(cap, 1), dtype=torch.uint8, device=ex.device)
        return cls(ex, plan, parts, store, report, receives, staging)

    @property
    def me(self) -> int:
        return self.report.participant

    def execute(self, liveness: Liveness) -> None:
        o = self.ex.options
        barrier = StoreBarrier(self.store, EXEC_PREFIX, self.me, self.parts.world, liveness, o.barrier_timeout_s)
        self.connect()
        for layer, recvs in enumerate(self.receives):
            _LayerRun(self, barrier, layer, recvs, [0] * len(recvs)).execute()
            self.note_staging()
        if self.hooks is not None:
            # The last layer's writes have no next barrier to tell they are all done.
            gone = barrier.wait("written")
            if gone:
                self.report.excluded[len(self.receives)] = gone
            self.hooks.written(len(self.receives) - 1, self.excluded())
        self.report.failed_peers = sorted(self.parts.old[i] if i < len(self.parts.old) else -1 for i in self.failed)

    @property
    def layer_hooks(self) -> LayerHooks:
        return self.hooks if self.hooks is not None else _NoHooks()

    def excluded(self) -> list[int]:
        """Every participant a barrier of this plan passed without, so far."""
        return sorted({p for ps in self.report.excluded.values() for p in ps})

    def connect(self) -> None:
        """Join the transport's epoch and register the staging buffer with it."""
        t = time.perf_counter()
        tp = self.ex.transport
        if tp is not None:
            timeout = self.ex.options.source_timeout_s * 3
            tp.connect(self.plan.epoch, self.me, self.parts.world, self.store, timeout=timeout)
            tp.register_staging(self.staging)
        elif self.parts.world > 1 and any(tr.route in REMOTE for tr in self.plan.transfers):
            raise ConfigError("the plan reads from peers but this executor has no transport")
        self.report.phase_seconds["connect"] = time.perf_counter() - t

    def note_staging(self) -> None:
        """Count the staging memory held now (retired buffers included) in the peak."""
        tp = self.ex.transport
        held = tp.held_staging_bytes() if tp is not None else self.staging.numel()
        self.report.peak_staging_bytes = max(self.report.peak_staging_bytes, held)

    def sends(self, layer: int) -> list[PeerSend]:
        """What the plan asks this process to send in ``layer``: every transfer whose
        planned source is this old rank (a transport decides whether to post them)."""
        old = self.report.old_rank
        if old is None:
            return []
        return [PeerSend(self.parts.of_new(t.dst_rank), t.sources[0].slot) for t in self.plan.peer_reads_from(old, layer)]


@dataclass
class _LayerRun:
    """One layer of a :class:`_PlanRun`.

    ``recvs`` [n]: this process's transfers of the layer; transfer ``i`` is staged at
    bytes ``[i * eb, (i + 1) * eb)``; ``attempts`` [n]: sources tried so far;
    ``delivered[i]``: the index into ``recvs[i].sources`` of the source that filled it.
    Example: ``recvs[0].sources == (Source(2, 1, "peer"), Source(DISK, -1, "disk"))`` and
    old rank 2 died: after the peer and disk phases ``attempts == [2]``, ``delivered == {0: 1}``.
    """

    run: _PlanRun
    barrier: StoreBarrier
    layer: int
    recvs: list[Transfer]
    attempts: list[int]
    delivered: dict[int, int] = field(default_factory=dict)

    @property
    def ex(self) -> PlanExecutor:
        return self.run.ex

    def execute(self) -> None:
        phases = (
            ("local", self.copy_local),
            ("peer", self.read_peers),
            ("disk", self.read_missing),
            ("barrier", self.wait_barrier),
            ("write", self.write),
        )
        seconds = self.run.report.phase_seconds
        for phase, step in phases:
            self.ex.options.phase_started(phase, self.layer)
            t = time.perf_counter()
            step()
            seconds[phase] += time.perf_counter() - t

    def offset(self, i: int) -> int:
        return i * self.ex.layout.expert_bytes

    def staged(self, i: int) -> torch.Tensor:
        """The staging bytes of transfer ``i``."""
        return self.run.staging[self.offset(i) : self.offset(i + 1)]

    def copy_local(self) -> None:
        """Stage the slots whose first source is this process: a GPU slot (``local``)
        or a row of its own mirror."""
        named, own = self.ex.weights[self.layer], self.run.report.old_rank
        for i, tr in enumerate(self.recvs):
            src = tr.sources[0]
            if src.route not in self.ex.routes or not (src.route == "local" or (src.route == "mirror" and src.rank == own)):
                continue
            self.attempts[i] = 1
            if src.route == "local":
                self.ex.layout.pack_slot(named, src.slot, out=self.staged(i))
            else:
                self.staged(i).copy_(self.ex.mirror_row(src.slot))
            self.delivered[i] = 0

    def read_peers(self) -> None:
        tp, routes = self.ex.transport, self.ex.routes & REMOTE
        if tp is None or not routes:
            return
        asks = [i for i, tr in enumerate(self.recvs) if i not in self.delivered and tr.sources[0].route in routes]
        # Per ask, the indices into its sources of its peer and mirror sources: the candidates.
        picks = [[k for k, s in enumerate(self.recvs[i].sources) if s.route in routes] for i in asks]
        receives = [
            Receive(self.offset(i), tuple(self.peer_source(self.recvs[i].sources[k]) for k in ks))
            for i, ks in zip(asks, picks)
        ]
        outcomes = tp.exchange(self.layer, receives, self.run.sends(self.layer), self.ex.options.source_timeout_s)
        self.run.staging = tp.staging  # a buffer an abandoned read may still write to was retired
        for i, ks, r, o in zip(asks, picks, receives, outcomes):
            self.note_peer_outcome(i, ks, r, o)

    def peer_source(self, src: Source) -> PeerSource:
        return PeerSource(self.run.parts.of_old(src.rank), src.slot)

    def note_peer_outcome(self, i: int, picks: list[int], receive: Receive, outcome: ReceiveOutcome) -> None:
        self.attempts[i] += outcome.attempts
        for k, err in outcome.failures:
            p = receive.candidates[k].participant
            log.warning("layer %d slot %d: read from participant %d failed: %s", self.layer, self.recvs[i].dst_slot, p, err)
            self.run.failed.add(p)
        if outcome.delivered is not None:
            self.delivered[i] = picks[outcome.delivered]

    def check_mirrors(self) -> None:
        """Drop the slots read from mirror rows that their rank no longer reports
        holding their expert (a row is reported empty before it is rewritten, so one
        still reported after the read was read whole); the disk reads them instead."""
        ask = self.ex.mirror_rows
        if ask is None:
            return
        spr, experts = self.ex.slots_per_rank, self.run.plan.new.num_logical
        by_rank: dict[int, list[int]] = {}
        for i, k in self.delivered.items():
            if self.recvs[i].sources[k].route == "mirror":
                by_rank.setdefault(self.recvs[i].sources[k].rank, []).append(i)
        for rank, idx in by_rank.items():
            rows = ask(rank)
            for i in idx:
                t, row = self.recvs[i], self.recvs[i].sources[self.delivered[i]].slot - spr
                if rows is None or row >= len(rows) or rows[row] != t.layer * experts + t.logical:
                    log.warning("layer %d slot %d: mirror row %d of old rank %d no longer reported with expert %d; "
                                "reading it from disk", self.layer, t.dst_slot, row, rank, t.logical)
                    del self.delivered[i]

    def read_missing(self) -> None:
        self.check_mirrors()
        self.read_disk([i for i in range(len(self.recvs)) if i not in self.delivered])

    def wait_barrier(self) -> None:
        report = self.run.report
        gone = self.barrier.wait(f"layer/{self.layer}")
        if gone:
            report.excluded[self.layer] = gone
        if self.barrier.fenced:
            # The others wrote this layer without waiting for us: what we read from
            # peers may be their new bytes. Read those slots again from disk.
            report.fenced_layers.append(self.layer)
            again = [i for i, tr in enumerate(self.recvs) if tr.sources[self.delivered[i]].route == "peer"]
            log.warning("layer %d: passed without this rank; %d peer-read slots re-read from disk", self.layer, len(again))
            self.read_disk(again)

    def write(self) -> None:
        layout, named, eb = self.ex.layout, self.ex.weights[self.layer], self.ex.layout.expert_bytes
        with self.run.layer_hooks.writing(self.layer, self.run.excluded()):
            for i, tr in enumerate(self.recvs):
                buf = self.staged(i)
                for st, off in zip(layout.tensors, layout.offsets):
                    layout.row_bytes_view(named[st.name], tr.dst_slot).copy_(buf[off : off + st.row_bytes])
            if self.ex.device.type == "cuda":
                torch.cuda.synchronize(self.ex.device)
        for i, tr in enumerate(self.recvs):
            src = tr.sources[self.delivered[i]]
            self.run.report.outcomes.append(
                TransferOutcome(self.layer, tr.dst_slot, tr.logical, tr.route, src.route, src.rank, self.attempts[i], eb)
            )

    def read_disk(self, which: list[int]) -> None:
        """Fill transfers ``which`` from the checkpoint: one read per distinct expert,
        further slots of the same expert copy it."""
        if not which:
            return
        disk = self.ex.disk
        if disk is None:
            raise TransportError(
                f"layer {self.layer}: {len(which)} slots need the checkpoint (no live replica left) but no "
                "disk source is configured; pass the model directory"
            )
        first: dict[int, int] = {}  # logical expert -> the transfer that reads it
        for i in which:
            first.setdefault(self.recvs[i].logical, i)
        uniq = list(first.values())
        disk.read_packed([(self.layer, self.recvs[i].logical) for i in uniq], self.run.staging, [self.offset(i) for i in uniq])
        for i in which:
            j = first[self.recvs[i].logical]
            if j != i:
                self.staged(i).copy_(self.staged(j))
            self.attempts[i] += 1
            self.delivered[i] = len(self.recvs[i].sources) - 1
