"""The rank agent: embedded in a serving process, it keeps the rank registered in etcd,
carries out the plans the leader publishes, and hands committed placements to the
serving engine.

It acts on a plan only if the plan is newer than every epoch it has seen, names this
rank's current incarnation, and comes from the controller that holds the leader key
now. A rank whose own lease expired (a partition, a long pause) is fenced: it stops
acting, drops its rank, and registers again as ``joining`` with a new incarnation, so
the controller treats it as a new member and refills it. A rank whose plan failed
fences itself the same way: its slots are unknown until it is refilled.

The agent's life is one :class:`AgentState`; :data:`TRANSITIONS` holds every move:

==========================  ========  =============================================
from                        to        when
==========================  ========  =============================================
NEW                         JOINING   registered (``run`` starts)
JOINING                     ACTIVE    a commit names this incarnation
JOINING, ACTIVE             DRAINING  ``drain()``
JOINING, ACTIVE, DRAINING   FENCED    the lease expired, or a plan failed
DRAINING                    LEFT      the scale-down without this rank committed
FENCED                      JOINING   registered again as a new incarnation
==========================  ========  =============================================

The registration record's ``state`` (``joining``, ``active``, ``draining``) is the
state's :attr:`AgentState.record_state`, written before the state changes.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from controller.etcd_client import EtcdConfig, call, connect
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_token
from controller.store import EtcdStore

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.errors import AgentStateError, EtcdUnavailableError, MalformedValueError
from elastic_ep.runtime.executor import PlanExecutor

log = logging.getLogger(__name__)


class AgentState(enum.Enum):
    """Where this rank stands with the controller."""

    NEW = "new"  # not registered yet
    JOINING = "joining"  # registered; not in a committed placement yet
    ACTIVE = "active"  # in a committed placement, serving
    DRAINING = "draining"  # asked to leave; still sends its experts in the scale-down
    FENCED = "fenced"  # this incarnation is void (lease expired, plan failed): register again
    LEFT = "left"  # the scale-down without it committed; its key is deleted

    @property
    def record_state(self) -> str | None:
        """The registration record's ``state`` on the wire (``controller.records.STATES``);
        None where this rank has no record (not registered, fenced, gone)."""
        return _RECORD_STATES.get(self)


_RECORD_STATES = {AgentState.JOINING: "joining", AgentState.ACTIVE: "active", AgentState.DRAINING: "draining"}

TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.NEW: frozenset({AgentState.JOINING}),
    # A rank may be asked to drain before its first commit.
    AgentState.JOINING: frozenset({AgentState.ACTIVE, AgentState.DRAINING, AgentState.FENCED}),
    AgentState.ACTIVE: frozenset({AgentState.DRAINING, AgentState.FENCED}),
    AgentState.DRAINING: frozenset({AgentState.LEFT, AgentState.FENCED}),
    AgentState.FENCED: frozenset({AgentState.JOINING}),
    AgentState.LEFT: frozenset(),
}
"""state -> the states it may move to; :meth:`RankAgent._transition` refuses the rest."""


@dataclass
class AgentConfig:
    """How a rank agent reaches etcd and who it is there.

    Example: ``AgentConfig(EtcdConfig("etcd-client:2379"), "moe-serving-3", node="gpu-7",
    endpoint={"transport": "nixl"})``.
    """

    etcd: EtcdConfig
    id: str
    node: str = ""
    device: str = "cpu"
    lease_ttl_s: int = 3
    poll_s: float = 0.05
    endpoint: dict[str, Any] = field(default_factory=dict)
    load_period_s: float = 2.0
    """How often the load window is published (when the agent has a load source)."""


class RankAgent:
    """``RankAgent(cfg, executor, load_initial, on_commit).run(stop)``.

    Args:
        executor: applies plans to this process's weights (transport and disk inside).
        load_initial: ``(placement, rank) -> bytes read`` fills this rank's slots at
            bootstrap (the serving engine's own start-up load).
        on_commit: ``(placement, rank) -> None`` called with each committed placement this
            rank is part of (the serving engine switches to it).
        verify: optional ``(placement, rank) -> mismatched slot count``, reported in acks.
        load_window: optional ``() -> [num_layers, num_logical]`` tokens this rank routed
            to each logical expert since the last call; published for the controller.

    Threads: :meth:`run` owns the state; the lease thread only raises ``fenced`` (a
    signal the next poll turns into the FENCED transition; a test may set it too);
    :meth:`drain` and :meth:`stop` may come from any thread.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        executor: PlanExecutor,
        load_initial: Callable[[ExpertPlacement, int], int | None],
        on_commit: Callable[[ExpertPlacement, int], None] | None = None,
        verify: Callable[[ExpertPlacement, int], int] | None = None,
        load_window: Callable[[], Any] | None = None,
        client: Any = None,
    ) -> None:
        self.cfg = cfg
        self.client = client if client is not None else connect(cfg.etcd)
        self.root = cfg.etcd.root
        self.executor = executor
        self.load_initial, self.on_commit, self.verify = load_initial, on_commit, verify
        self.load_window = load_window
        self._load_at = 0.0
        self.key = f"{self.root}/ranks/{cfg.id}"
        self.lease: Any = None
        self.incarnation = ""
        self.state = AgentState.NEW
        # Re-entrant: a check of the state and the transition it decides are one step.
        self._state_lock = threading.RLock()
        self.last_epoch = 0  # newest plan epoch seen (acted on or refused)
        self.committed_epoch = 0
        self.rank: int | None = None  # in the committed placement
        self.placement: ExpertPlacement | None = None
        self.fenced = threading.Event()
        """Raised when this rank's lease expired; the next poll fences the agent."""
        self.left = threading.Event()
        """Set on entering LEFT (for waiters on a drain)."""
        self._stop = threading.Event()
        self.epochs_seen: list[int] = []
        self.busy = threading.Lock()
        """Held while the weights change: serving pauses (as vLLM's EPLB pauses the step)."""
        self.holding: tuple[ExpertPlacement, int] | None = None
        """(placement, rank) the weights hold now: set once a plan's writes are done."""
        self.served: dict[str, int] = {"ok": 0, "bad": 0}

    @property
    def token(self) -> str:
        return member_token(self.cfg.id, self.incarnation)

    # -- state -----------------------------------------------------------------------
    def _transition(self, new: AgentState, why: str) -> None:
        """Move to ``new`` if :data:`TRANSITIONS` allows it. A state with a registration
        record is written first: if etcd refuses, the agent stays where it was and the
        caller (or the next poll) tries again. Under the lock, so records land in the
        order of the transitions."""
        with self._state_lock:
            old = self.state
            if new not in TRANSITIONS[old]:
                raise AgentStateError(
                    f"rank {self.token} epoch {self.last_epoch}: {old.value} -> {new.value} ({why}) is not "
                    f"allowed; from {old.value} only {sorted(s.value for s in TRANSITIONS[old])}"
                )
            if new.record_state is not None:
                call(self.client.put, f"update {self.key}", self.key, self._record(new).to_json(), lease=self.lease)
            self.state = new
            log.info("rank %s epoch %d: %s -> %s (%s)", self.token, self.last_epoch, old.value, new.value, why)
            if new is AgentState.LEFT:
                self.left.set()

    def _record(self, state: AgentState) -> RankRecord:
        return RankRecord(self.cfg.id, socket.gethostname(), self.cfg.device, self.cfg.node,
                          state.record_state or "", self.cfg.endpoint, os.getpid(), self.incarnation)

    # -- membership ------------------------------------------------------------------
    def register(self) -> None:
        """A new incarnation, joining, under a fresh lease kept alive by a thread."""
        with self._state_lock:
            self.incarnation = uuid.uuid4().hex[:8]
            self.rank, self.placement = None, None
            self.lease = call(self.client.lease, "grant rank lease", self.cfg.lease_ttl_s)
            self._transition(AgentState.JOINING, "registered")
            self.fenced.clear()
        threading.Thread(target=self._keepalive, args=(self.lease,), name="elastic-ep-rank-lease", daemon=True).start()

    def _keepalive(self, lease: Any) -> None:
        while not self._stop.wait(self.cfg.lease_ttl_s / 3) and lease is self.lease:
            try:
                replies = call(lambda: list(self.client.refresh_lease(lease.id)), "refresh rank lease")
                if not replies or replies[0].TTL <= 0:
                    log.warning("rank %s epoch %d: lease expired; fencing this rank", self.token, self.last_epoch)
                    self.fenced.set()
                    return
            except EtcdUnavailableError as e:
                # etcd restarting keeps leases alive; keep trying.
                log.warning("rank %s epoch %d: cannot refresh lease: %s", self.token, self.last_epoch, e)

    def _fence(self, why: str) -> None:
        """This incarnation is void: fence, then drop the rank's key so the controller
        sees it go at once. Fenced first: should the delete fail, the next poll still
        registers again (and that overwrites the key)."""
        self._transition(AgentState.FENCED, why)
        call(self.client.delete, f"drop {self.key}", self.key)

    def drain(self) -> None:
        """Ask to leave: the controller plans a scale-down in which this rank still
        sends; once it is committed the agent deletes its key and stops."""
        self._transition(AgentState.DRAINING, "drain requested")

    # -- plans -----------------------------------------------------------------------
    def _get(self, name: str) -> bytes | None:
        v, _ = call(self.client.get, f"get {self.root}/{name}", f"{self.root}/{name}")
        return v

    def _read_record(self, name: str, parse: Callable[[str, bytes], Any]) -> Any:
        """The parsed value of ``<root>/<name>``; None when absent or malformed (logged)."""
        raw = self._get(name)
        if raw is None:
            return None
        try:
            return parse(f"{self.root}/{name}", raw)
        except MalformedValueError as e:
            log.error("rank %s epoch %d: ignoring %s: %s", self.token, self.last_epoch, name, e)
            return None

    def poll_once(self) -> str:
        """One look at etcd: re-register if fenced, else act on a newer plan or commit.
        Returns what it did (``"idle"``, ``"acked"``, ``"left"``, ...)."""
        if self.fenced.is_set() and self.state is not AgentState.FENCED:
            self._transition(AgentState.FENCED, "lease expired")
        if self.state is AgentState.FENCED:
            self.register()
            return "re-registered"
        rec = self._read_record("plan", PlanRecord.parse)
        if rec is not None and rec.epoch > self.last_epoch:
            return self._on_plan(rec)
        c = self._read_record("committed", CommitRecord.parse)
        if c is not None and c.epoch > self.committed_epoch:
            return self._on_commit(c)
        return "idle"

    def _on_plan(self, rec: PlanRecord) -> str:
        self.last_epoch = rec.epoch
        self.epochs_seen.append(rec.epoch)
        leader = self._get("leader")
        if leader is None or leader.decode() != rec.leader:
            log.warning("rank %s epoch %d: refusing plan from %s: the leader is %s",
                        self.token, rec.epoch, rec.leader, leader)
            return "refused: not leader"
        if self.token not in rec.participants():
            return "not a participant"
        with self.busy:
            ack = self._execute(rec)
        call(self.client.put, f"ack {rec.epoch}", f"{self.root}/acks/{self.cfg.id}", ack.to_json())
        if ack.ok:
            return "acked"
        # This rank's slots are now unknown: be a new member and get refilled.
        self._fence(f"plan epoch {rec.epoch} failed")
        self.register()
        return "failed"

    def _execute(self, rec: PlanRecord) -> AckRecord:
        """This rank's part of ``rec`` (with ``busy`` held): the bootstrap load or the
        plan's transfers, then the optional check; the ack to write."""
        t0 = time.perf_counter()
        new_rank = rec.new_members.index(self.token) if self.token in rec.new_members else None
        try:
            if rec.plan is None:
                loaded = self.load_initial(rec.placement, new_rank) or 0  # type: ignore[arg-type]
                ack = AckRecord(rec.epoch, self.token, True, {"disk": int(loaded)}, {"load": time.perf_counter() - t0})
            else:
                old_rank = rec.old_members.index(self.token) if self.token in rec.old_members else None
                store = EtcdStore(self.client, self.root, scope=str(rec.epoch))
                report = self.executor.execute(rec.plan, old_rank, None if old_rank is not None else new_rank,
                                               store=store)
                ack = AckRecord(rec.epoch, self.token, True, report.bytes_by_route(), report.phase_seconds)
            if self.verify is not None and new_rank is not None:
                ack = AckRecord(ack.epoch, ack.id, ack.ok, ack.bytes, ack.phases, "",
                                self.verify(rec.placement, new_rank))
            self.holding = (rec.placement, new_rank) if new_rank is not None else None
            return ack
        except Exception as e:  # whatever failed, the controller must hear of it
            log.exception("rank %s epoch %d: plan failed: %s", self.token, rec.epoch, e)
            self.holding = None
            return AckRecord(rec.epoch, self.token, False, error=f"{type(e).__name__}: {e}"[:2000])

    def _on_commit(self, c: CommitRecord) -> str:
        self.committed_epoch = c.epoch
        if self.token in c.members:
            self.rank = c.members.index(self.token)
            self.placement = c.placement
            with self._state_lock:  # a drain() between the check and the move must not be undone
                if self.state is AgentState.JOINING:
                    self._transition(AgentState.ACTIVE, f"committed as rank {self.rank}")
            if self.on_commit is not None:
                self.on_commit(c.placement, self.rank)
            return f"committed as rank {self.rank}"
        if self.state is AgentState.DRAINING and self.last_epoch >= c.epoch:
            call(self.client.delete, f"leave {self.key}", self.key)
            self._transition(AgentState.LEFT, f"scale-down committed at epoch {c.epoch}")
            self._stop.set()
            return "left"
        return "not a member"

    def publish_load(self) -> None:
        """Publish this rank's load window (``load/<id>``), at most every ``load_period_s``."""
        now = time.monotonic()
        if self.load_window is None or self.holding is None or now - self._load_at < self.cfg.load_period_s:
            return  # a rank that holds no experts yet has served nothing
        window = now - self._load_at if self._load_at else self.cfg.load_period_s
        self._load_at = now
        rows = [[float(x) for x in row] for row in self.load_window()]
        call(self.client.put, f"load {self.cfg.id}", f"{self.root}/load/{self.cfg.id}",
             LoadRecord(self.cfg.id, rows, window, dict(self.served), list(self.epochs_seen[-64:])).to_json())

    def run(self, stop: threading.Event | None = None) -> None:
        """Register, then poll until ``stop`` (or :meth:`stop`, or leaving). One failed
        pass is logged and retried with backoff: the agent must outlive etcd hiccups."""
        stop = stop or self._stop
        self.register()
        backoff = 0.1
        while not stop.is_set() and not self._stop.is_set():
            try:
                self.poll_once()
                self.publish_load()
                backoff = 0.1
                stop.wait(self.cfg.poll_s)
                continue
            except (EtcdUnavailableError, MalformedValueError) as e:
                log.warning("rank %s epoch %d: etcd unavailable, waiting: %s", self.token, self.last_epoch, e)
            except Exception:  # a serving process's agent must not die of one bad pass
                log.exception("rank %s epoch %d: agent pass failed; retrying", self.token, self.last_epoch)
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def stop(self) -> None:
        self._stop.set()
