"""The rank agent: embedded in a serving process, it keeps the rank registered in etcd,
carries out the plans the leader publishes, and hands committed placements to the
serving engine.

Every value it reads is untrusted (a rank's credentials can write more than they
should, and a buggy rank writes anything). So:

- One pass reads ``plan``, ``epoch``, ``leader``, ``committed`` and the rank's own key
  in one transaction, at one revision; each value goes through its record's parse, and
  a value that does not parse is skipped and logged once per revision.
- A plan is executed only if it is what the leader's fenced transaction wrote: that
  transaction puts ``epoch`` and ``plan`` together, so both keys carry the same mod
  revision, and the epoch key's value is the plan's epoch (a leader that already led
  when the plan was written must be the one it names; a successor elected since adopts
  the plan in flight). A replayed or forged plan fails one of these and changes
  nothing: the newest epoch seen moves only when a plan is accepted.
- Registration creates the rank's key only if it is free, or holds this process's own
  earlier registration: a second process started with a live rank's id is refused
  (:class:`~elastic_ep.errors.DuplicateRankError`) and retries with backoff, serving nothing.
- A rank that is no longer a member (its key gone or holding another registration),
  whose lease was not refreshed within its TTL, whose plan failed, whose slots are not
  bit-exact, or whose weights are not the plan's old slots is fenced: it stops serving
  at once, drops its lease, and registers again as ``joining`` with a new incarnation,
  so the controller treats it as a new member and refills it. Repeated failures of one
  kind back off exponentially.

The agent's life is one :class:`AgentState`; :data:`TRANSITIONS` holds every move:

==========================  ========  =============================================
from                        to        when
==========================  ========  =============================================
NEW                         JOINING   registered (the first pass of ``run``)
JOINING                     ACTIVE    a commit names this incarnation
JOINING, ACTIVE             DRAINING  ``drain()``, or the rank's record says draining
JOINING, ACTIVE, DRAINING   FENCED    lease lost, plan failed, no longer a member
DRAINING                    LEFT      the scale-down without this rank committed
FENCED                      JOINING   registered again as a new incarnation
==========================  ========  =============================================

The registration record's ``state`` (``joining``, ``active``, ``draining``) is the
state's :attr:`AgentState.record_state`, written before the state changes.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from controller import plan_chunks
from controller.etcd_client import EtcdConfig, Held, KeptMeta, call, connect, read_ranges, read_ranges_since
from controller.records import (
    AckRecord, CommitRecord, LoadRecord, MirrorRecord, PlanRecord, RankRecord, RoutingRecord, SuspectRecord, member_id,
    member_token, parse_epoch, parse_leader,
)
from controller.store import EtcdStore
from controller.view import parse_value
from controller.watch import KeyWatch

from elastic_ep.core.layer_switch import without_ranks
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan
from elastic_ep.errors import (
    AgentStateError,
    CheckpointError,
    DuplicateRankError,
    EtcdUnavailableError,
    MalformedValueError,
    PlanError,
)
from elastic_ep.runtime.executor import Participants, PlanExecutor
from elastic_ep.runtime.mirror_keeper import MirrorKeeper
from elastic_ep.runtime.plan_peers import PlanPeers
from elastic_ep.runtime.serving import PlanSwitch, ServingMap
from elastic_ep.runtime.liveness import LivenessServer, PeerMonitor, monitored_peers

log = logging.getLogger(__name__)


class AgentState(enum.Enum):
    """Where this rank stands with the controller."""

    NEW = "new"  # not registered yet
    JOINING = "joining"  # registered; not in a committed placement yet
    ACTIVE = "active"  # in a committed placement, serving
    DRAINING = "draining"  # asked to leave; still sends its experts in the scale-down
    FENCED = "fenced"  # this incarnation is void (lease lost, plan failed, evicted): register again
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

_MEMBER_STATES = (AgentState.JOINING, AgentState.ACTIVE, AgentState.DRAINING)


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
    """The wait between passes while not a member (registering, backing off)."""
    resync_s: float = 2.0
    """A member waits on etcd watches of the keys it acts on (plan, committed, leader,
    its own registration); with no event it reads them again after this long."""
    endpoint: dict[str, Any] = field(default_factory=dict)
    liveness_host: str = "127.0.0.1"
    """Where this rank's liveness endpoint listens (its address goes into the
    registration); "" runs none, and peers then cannot report on this rank."""
    heartbeat_s: float = 0.1
    """The interval of liveness heartbeats, sent and expected (a crash is seen at once
    whatever it is: the kernel closes the dead process's sockets)."""
    stall_tolerance_s: float = 1.0
    """A watched peer silent this long is reported as suspect (a crash is reported at once)."""
    load_period_s: float = 2.0
    """How often the load window is published (when the agent has a load source)."""
    retry_s: float = 0.25
    """The first wait after a repeated failure (a second plan failure in a row, a
    refused registration); each further failure of the same kind doubles it."""
    retry_max_s: float = 30.0
    """The longest wait between two registration attempts."""


@dataclass
class _Retry:
    """Consecutive failures by kind (``plan``, ``lease``, ``member``, ``duplicate``,
    ``checkpoint``) and when registration may be tried next.

    After the ``n``-th failure of a kind in a row the wait is ``base_s * 2 ** (n - 1)``
    (at most ``max_s``); ``first_free`` failures (a fence) wait nothing the first time,
    so a one-off failure rejoins at once. Example with ``base_s=0.25``: plan failures
    wait 0, 0.25, 0.5, 1.0 s; refused registrations 0.25, 0.5, 1.0 s.
    """

    base_s: float
    max_s: float
    counts: dict[str, int] = field(default_factory=dict)
    at: float = 0.0

    def failed(self, kind: str, first_free: bool = False) -> float:
        """Count one failure of ``kind``; returns the wait before the next attempt."""
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        exponent = n - 2 if first_free else n - 1
        wait = 0.0 if exponent < 0 else min(self.max_s, self.base_s * 2.0**exponent)
        self.at = time.monotonic() + wait
        return wait

    def ready(self) -> bool:
        return time.monotonic() >= self.at

    def clear(self, *kinds: str) -> None:
        """Forget the failures of ``kinds`` (all when none given): a success ends the run."""
        for k in kinds or list(self.counts):
            self.counts.pop(k, None)


Read = dict[str, tuple[bytes, int, int] | None]
"""One pass's keys (names relative to the root) -> ``(value, mod revision, create
revision)``, or None when absent; all read at one revision."""


class RankAgent:
    """``RankAgent(cfg, executor, load_initial, on_commit).run(stop)``.

    Args:
        executor: applies plans to this process's weights (transport and disk inside).
        load_initial: ``(placement, rank) -> bytes read`` fills this rank's slots at
            bootstrap (the serving engine's own start-up load).
        on_commit: ``(placement, rank) -> None`` called with each committed placement this
            rank is part of (the serving engine switches to it).
        verify: optional ``(placement, rank) -> mismatched slot count``, reported in acks;
            a count above 0 makes the ack a failure.
        load_window: optional ``() -> [num_layers, num_logical]`` tokens this rank routed
            to each logical expert since the last call; published for the controller.

    Optional hooks, set after construction (:func:`~elastic_ep.runtime.wiring.build_agent`
    sets them): :attr:`preflight` ``() -> Any`` checks the checkpoint before every
    registration (raises :class:`CheckpointError` when it does not fit this rank);
    :attr:`on_fence` ``(why) -> None`` tells the engine its weights are no longer served.

    Threads: :meth:`run` owns the state; the lease thread only raises ``fenced`` (a
    signal the next poll turns into the FENCED transition; a test may set it too);
    :meth:`drain` and :meth:`stop` may come from any thread. :attr:`holding` turns None
    the moment the lease may have expired, whichever thread notices first.
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
        self.preflight: Callable[[], Any] | None = None
        self.on_fence: Callable[[str], None] | None = None
        self._load_at = 0.0
        self.key = f"{self.root}/ranks/{cfg.id}"
        self.lease: Any = None
        self._lease_until = 0.0  # monotonic: the lease may have expired from here on
        # Guards lease, _lease_until and fenced together: the lease thread never waits on
        # the state lock, which is held across etcd calls.
        self._lease_lock = threading.Lock()
        self.incarnation = ""
        self._incarnations: set[str] = set()  # every one this process registered
        self.state = AgentState.NEW
        # Re-entrant: a check of the state and the transition it decides are one step.
        self._state_lock = threading.RLock()
        self.last_epoch = 0  # newest plan epoch accepted (acted on, or not ours to act on)
        self.committed_epoch = 0
        self._accepted: PlanRecord | None = None  # the plan of last_epoch
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
        self._holding: tuple[ExpertPlacement, int] | None = None
        self.served: dict[str, int] = {"ok": 0, "bad": 0}
        self._retry = _Retry(cfg.retry_s, cfg.retry_max_s)
        self._parsed: dict[str, tuple[int, Any]] = {}  # key name -> (mod revision, parsed value)
        self._last_read: Read | None = None
        self._init_peers()
        self._wake = threading.Event()
        self.watch = KeyWatch(self.client, self._wake,
                              keys=[f"{self.root}/{n}" for n in ("plan", "committed", "leader", "routing")] + [self.key])
        self._reported: dict[str, int] = {}  # key name -> the revision last logged as bad

    def _init_peers(self) -> None:
        """What this rank knows of its peers: its liveness endpoint and monitor, the
        members of its last commit, the routing applied."""
        cfg = self.cfg
        self.liveness = LivenessServer(cfg.liveness_host, 0, cfg.heartbeat_s) if cfg.liveness_host else None
        self.monitor: PeerMonitor | None = None
        self._liveness_started = False
        self.on_routing: Callable[[ExpertPlacement, int, list[int]], None] | None = None
        """``(placement, rank, dead ranks)``: route around those ranks' slots until the
        next commit (set after construction, like :attr:`on_fence`)."""
        self.serving: ServingMap | None = None
        """What the engine may route tokens to now (read it holding ``busy``): the held
        placement, dead ranks masked, and during a plan each layer's switch."""
        self.on_serving: Callable[[ServingMap, list[int]], None] | None = None
        """``(map, layers)``: those layers' rows of the map changed (called with ``busy``
        held; an engine rewrites its router's rows of them)."""
        self.keep_serving_map = False
        """Keep :attr:`serving` without an :attr:`on_serving` hook (an engine that reads it
        directly). With neither, no map is kept (a simulated rank serves nothing)."""
        self._members: list[str] = []  # of the last commit this rank is part of
        self._peer_records: dict[str, RankRecord] = {}  # token -> registration, as last read
        self._routed_rev = 0
        self._reports: dict[str, str] = {}  # target id -> token, of the reports standing under this lease
        self.suspected: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=256)
        """(target token, kind, detail) of the suspicions reported, oldest first (the last 256)."""
        self.mirror: MirrorKeeper | None = None
        """This rank's host-memory mirror (set before the first registration): its rows
        go into the registration, each commit assigns them, plans pause its fill."""
        self.heartbeat_drop: Callable[[str], bool] | None = None
        """A fault hook: heartbeats from the peers it returns True for are dropped (a
        cut link), set before the first commit."""

    @property
    def token(self) -> str:
        return member_token(self.cfg.id, self.incarnation)

    @property
    def holding(self) -> tuple[ExpertPlacement, int] | None:
        """(placement, rank) the weights hold and this rank may serve: set once a plan's
        writes are done; None while fenced or once the lease may have expired."""
        h = self._holding
        if h is None or self.fenced.is_set() or time.monotonic() >= self._lease_until:
            return None
        return h

    @holding.setter
    def holding(self, value: tuple[ExpertPlacement, int] | None) -> None:
        self._holding = value

    # -- state -----------------------------------------------------------------------
    def _transition(self, new: AgentState, why: str) -> None:
        """Move to ``new`` if :data:`TRANSITIONS` allows it. A state with a registration
        record is written first (:meth:`_put_record`): if etcd refuses, the agent stays
        where it was and the caller (or the next poll) tries again. Under the lock, so
        records land in the order of the transitions."""
        with self._state_lock:
            old = self.state
            if new not in TRANSITIONS[old]:
                raise AgentStateError(
                    f"rank {self.token} epoch {self.last_epoch}: {old.value} -> {new.value} ({why}) is not "
                    f"allowed; from {old.value} only {sorted(s.value for s in TRANSITIONS[old])}"
                )
            if new.record_state is not None:
                self._put_record(new, registering=new is AgentState.JOINING)
            self.state = new
            log.info("rank %s epoch %d: %s -> %s (%s)", self.token, self.last_epoch, old.value, new.value, why)
            if new is AgentState.LEFT:
                self.left.set()

    def _record(self, state: AgentState) -> RankRecord:
        endpoint = dict(self.cfg.endpoint)
        if self.liveness is not None:
            endpoint["liveness"] = self.liveness.address
        return RankRecord(self.cfg.id, socket.gethostname(), self.cfg.device, self.cfg.node,
                          state.record_state or "", endpoint, os.getpid(), self.incarnation,
                          self.mirror.rows if self.mirror is not None else 0)

    def _put_record(self, state: AgentState, registering: bool) -> None:
        """Write this incarnation's record in ``state``, fenced on who holds the key.

        A registration writes a free key (version 0), one holding a registration of this
        process (an earlier incarnation whose lease it gave up), or one no live process
        holds (no lease, or not a rank record: a hostile or broken value); any other write
        needs the key to hold this incarnation. Raises :class:`DuplicateRankError` when another
        process holds the id, :class:`AgentStateError` when this rank is no longer a member.
        """
        tx = self.client.transactions
        put = tx.put(self.key, self._record(state).to_json(), lease=self.lease)
        if registering:
            ok, got = call(self.client.transaction, f"register {self.key}", compare=[tx.version(self.key) == 0],
                           success=[put], failure=[tx.get(self.key)])
            if ok:
                return
            holder = got[0][0] if got and got[0] else None
        else:
            raw, meta = call(self.client.get, f"get {self.key}", self.key)
            holder = None if raw is None else (raw, meta)
        rec = self._parse_own(holder[0]) if holder is not None else None
        # No live process holds a key without a lease or without a rank record in it:
        # a registration takes such a key over rather than stay out for good.
        unheld = registering and holder is not None and (rec is None or holder[1].lease_id == 0)
        mine = rec is not None and rec.incarnation in (self._incarnations if registering else {self.incarnation})
        if unheld or mine:
            ok, _ = call(self.client.transaction, f"update {self.key}",
                         compare=[tx.mod(self.key) == holder[1].mod_revision], success=[put], failure=[])
            if ok:
                return
        raise self._held_elsewhere(state, rec, holder is not None, registering)

    def _parse_own(self, raw: bytes) -> RankRecord | None:
        rec = parse_value(RankRecord.parse, self.key, raw, 0)
        return None if isinstance(rec, MalformedValueError) else rec

    def _held_elsewhere(self, state: AgentState, rec: RankRecord | None, exists: bool, registering: bool) -> Exception:
        """The error for a refused record write, naming who holds the key."""
        if rec is not None:
            holder = f"incarnation {rec.incarnation} of pid {rec.pid} on host {rec.host!r}, state {rec.state}"
        else:
            holder = "a value that is not a rank record" if exists else "nothing: the key is gone"
        if registering:
            return DuplicateRankError(
                f"rank id {self.cfg.id!r}: {self.key} is held by another live registration ({holder}); "
                f"rank ids must be unique in {self.root}: give this process another id (--id, ELASTIC_EP_ID) "
                "or stop the other process; until the key is free this process retries with backoff and serves nothing"
            )
        return AgentStateError(
            f"rank {self.token} epoch {self.last_epoch}: cannot write state {state.value}: {self.key} no longer "
            f"holds this incarnation (it holds {holder}); this rank is fenced and registers again"
        )

    # -- membership ------------------------------------------------------------------
    def register(self) -> None:
        """A new incarnation, joining, under a fresh lease kept alive by a thread.

        Runs :attr:`preflight` first (a checkpoint that does not fit raises
        :class:`CheckpointError` before anything is written); raises
        :class:`DuplicateRankError` when another live process holds this rank's id."""
        if self.preflight is not None:
            self.preflight()
        if self.liveness is not None and not self._liveness_started:
            self.liveness.start()
            self._liveness_started = True
        with self._state_lock:
            previous = (self.incarnation, self.lease)
            sent = time.monotonic()
            lease = call(self.client.lease, "grant rank lease", self.cfg.lease_ttl_s)
            with self._lease_lock:
                self.lease = lease
            self.incarnation = uuid.uuid4().hex[:8]
            self._incarnations.add(self.incarnation)
            try:
                self._transition(AgentState.JOINING, "registered")
            except BaseException:
                self._revoke(lease)
                with self._lease_lock:
                    self.incarnation, self.lease = previous
                raise
            # A new member holds nothing until a plan fills it.
            self.rank, self.placement, self._holding = None, None, None
            with self._lease_lock:
                self._lease_until = sent + self.cfg.lease_ttl_s
                self.fenced.clear()
        if previous[1] is not None:
            self._revoke(previous[1])
        threading.Thread(target=self._keepalive, args=(lease,), name="elastic-ep-rank-lease", daemon=True).start()
        if self.mirror is not None:
            self.mirror.republish()  # the report went with the previous lease

    def _revoke(self, lease: Any) -> None:
        """Give ``lease`` up (its keys go with it); an unreachable etcd lets it expire."""
        try:
            call(self.client.revoke_lease, "revoke rank lease", lease.id)
        except Exception as e:  # best effort: an unrefreshed lease expires by itself
            log.debug("rank %s: lease %s not revoked (%s); it expires", self.token, lease.id, e)

    def _keepalive(self, lease: Any) -> None:
        """Refresh ``lease`` every third of its TTL. Refused, or not refreshed for a whole
        TTL (from the send of the last refresh that succeeded, so never late): raise
        ``fenced``. ``holding`` already turns None at that deadline by itself."""
        while not self._stop.wait(self.cfg.lease_ttl_s / 3) and lease is self.lease:
            sent = time.monotonic()
            try:
                replies = call(lambda: list(self.client.refresh_lease(lease.id)), "refresh rank lease")
                if replies and replies[0].TTL > 0:
                    with self._lease_lock:
                        if lease is self.lease:
                            self._lease_until = sent + self.cfg.lease_ttl_s
                    continue
                why = "lease expired"
            except Exception as e:  # unreachable, refused, or a client bug: the deadline decides
                if time.monotonic() < self._lease_until:
                    log.warning("rank %s epoch %d: cannot refresh lease: %s", self.token, self.last_epoch, e)
                    continue
                why = f"lease not refreshed within its {self.cfg.lease_ttl_s} s TTL ({e})"
            with self._lease_lock:
                if lease is self.lease:
                    log.warning("rank %s epoch %d: %s; fencing this rank", self.token, self.last_epoch, why)
                    self.fenced.set()
                    self._wake.set()
            return

    def _stop_serving(self, why: str) -> None:
        """The weights are no longer this rank's to serve (fenced, or a failed plan)."""
        self.serving = None
        had, self._holding = self._holding, None
        self.rank, self.placement = None, None
        if had is not None and self.on_fence is not None:
            self.on_fence(why)

    def _fence(self, why: str, kind: str) -> None:
        """This incarnation is void: stop serving, FENCED, then give the lease up so
        that the rank's key (and load) go at once, unless another process holds the key
        now (its own lease keeps it). The next registration waits per :class:`_Retry`."""
        with self._state_lock:
            self._stop_serving(why)
            self._transition(AgentState.FENCED, why)
            with self._lease_lock:
                lease, self.lease = self.lease, None
        # Reports go with the lease: the next incarnation watches and reports afresh.
        self._reports.clear()
        if self.monitor is not None:
            self.monitor.watch({})
        wait = self._retry.failed(kind, first_free=True)
        if wait:
            log.warning("rank %s epoch %d: failure %d in a row of kind %s; registering again in %.2f s",
                        self.token, self.last_epoch, self._retry.counts[kind], kind, wait)
        if lease is not None:
            self._revoke(lease)

    def _try_register(self) -> str:
        """Register (again) once the backoff allows. A checkpoint that does not fit
        raises at the first registration and is retried with backoff after a fence;
        an id held by another live process is retried with backoff."""
        if not self._retry.ready():
            return "backing off"
        first = self.state is AgentState.NEW
        try:
            self.register()
        except CheckpointError as e:
            if first:
                raise
            wait = self._retry.failed("checkpoint")
            log.error("rank %s: not registering again: the checkpoint does not fit this rank: %s; "
                      "checking again in %.2f s", self.cfg.id, e, wait)
            return "refused: checkpoint"
        except DuplicateRankError as e:
            wait = self._retry.failed("duplicate")
            log.error("rank %s: registration refused: %s (next try in %.2f s)", self.cfg.id, e, wait)
            return "refused: duplicate id"
        self._retry.clear("duplicate", "checkpoint")
        return "registered" if first else "re-registered"

    def drain(self) -> None:
        """Ask to leave: the controller plans a scale-down in which this rank still
        sends; once it is committed the agent deletes its key and stops."""
        self._transition(AgentState.DRAINING, "drain requested")
        self._wake.set()

    # -- reading ---------------------------------------------------------------------
    def _read(self) -> Read:
        """The keys one pass acts on, in one transaction (one revision). When plan,
        epoch, leader, committed and routing kept the mod revisions of the last read,
        only the rank's own key comes back (an idle pass moves a few hundred bytes, not
        the plan head and commit)."""
        names = ("plan", "epoch", "leader", "committed", "routing", f"ranks/{self.cfg.id}")
        keys = [f"{self.root}/{n}" for n in names]
        last = self._last_read
        held: Held = {}
        if last is not None:  # every key but the rank's own, as last read
            held = {k: None if (v := last[n]) is None else (v[0], KeptMeta(k.encode(), v[1], v[2]))
                    for n, k in zip(names[:-1], keys[:-1])}
        got = read_ranges_since(self.client, f"read {self.root}", [], keys, held)
        read = {n: (kvs[0][0], kvs[0][1].mod_revision, kvs[0][1].create_revision) if kvs else None
                for n, kvs in zip(names, got)}
        self._last_read = read
        return read

    def _report(self, name: str, rev: int, message: str) -> None:
        """Log ``message`` about ``<root>/<name>`` once per revision of that key."""
        if self._reported.get(name) != rev:
            self._reported[name] = rev
            log.error("rank %s epoch %d: %s", self.token, self.last_epoch, message)

    def _value(self, read: Read, name: str, parse: Callable[[str, bytes, int], Any]) -> tuple[Any, int]:
        """``<root>/<name>`` parsed (once per revision) and its mod revision: ``(None, 0)``
        when absent, ``(None, rev)`` when it does not parse (logged once)."""
        got = read[name]
        if got is None:
            return None, 0
        raw, rev, _ = got
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == rev:
            return cached[1], rev
        key = f"{self.root}/{name}"
        value = parse_value(parse, key, raw, rev)
        if isinstance(value, MalformedValueError):
            self._report(name, rev, f"ignoring {key} (revision {rev}): {value}")
            value = None
        self._parsed[name] = (rev, value)
        return value, rev

    def _membership(self, read: Read) -> tuple[RankRecord | None, str]:
        """This incarnation's record as the rank's key holds it, or why it holds none."""
        got = read[f"ranks/{self.cfg.id}"]
        if got is None:
            return None, f"{self.key} is gone"
        rec = self._parse_own(got[0])
        if rec is None:
            return None, f"{self.key} holds a value that is not a rank record"
        if rec.incarnation != self.incarnation:
            return None, f"{self.key} holds incarnation {rec.incarnation} of pid {rec.pid} on host {rec.host!r}"
        return rec, ""

    def _plan_to_run(self, read: Read) -> PlanRecord | None:
        """The plan to act on: newer than every accepted epoch, and written by the
        leader's fenced transaction. Accepting it is what moves :attr:`last_epoch`."""
        rec, rev = self._value(read, "plan", PlanRecord.parse)
        if rec is None or rec.epoch <= self.last_epoch:
            return None
        why = self._not_published(rec, rev, read)
        if why:
            self._report("plan", rev, f"refusing {self.root}/plan (revision {rev}, epoch {rec.epoch}, leader "
                                      f"{rec.leader!r}): {why}; it is not executed")
            return None
        self.last_epoch = rec.epoch
        self.epochs_seen.append(rec.epoch)
        self._accepted = rec
        return rec

    def _not_published(self, rec: PlanRecord, rev: int, read: Read) -> str:
        """Why ``rec`` (at mod revision ``rev``) is not the value the leader's publishing
        transaction wrote; "" when it is. That transaction puts ``epoch`` and ``plan``
        together, so they share a mod revision and the epoch key holds the plan's epoch."""
        epoch, epoch_rev = self._value(read, "epoch", parse_epoch)
        if epoch is None:
            return f"{self.root}/epoch is absent or malformed"
        if epoch != rec.epoch:
            return f"{self.root}/epoch holds {epoch}, not the plan's epoch"
        if epoch_rev != rev:
            return (f"{self.root}/epoch was written at revision {epoch_rev}, not with the plan: the plan is not "
                    "the leader's publishing transaction (a replay or a forgery)")
        # A leader that already led when the plan was written must be the one it names.
        # A successor elected since adopts the plan in flight: the fenced write above is
        # the proof that the leader of that moment published it.
        leader, _ = self._value(read, "leader", parse_leader)
        got = read["leader"]
        if got is not None and leader is None:
            return f"{self.root}/leader is malformed"
        if got is not None and got[2] <= rev and leader != rec.leader:
            return f"the leader key names {leader!r}, which led when the plan was written"
        return ""

    def _commit_to_run(self, read: Read) -> CommitRecord | None:
        """The commit to act on: newer than the last one, of an accepted epoch, and for
        the plan of its epoch when that is the one accepted."""
        c, rev = self._value(read, "committed", CommitRecord.parse)
        if c is None or c.epoch <= self.committed_epoch:
            return None
        p = self._accepted
        why = ""
        if c.epoch > self.last_epoch:
            why = f"no plan of epoch {c.epoch} was accepted (newest {self.last_epoch})"
        elif p is not None and p.epoch == c.epoch and (c.members != p.new_members or c.placement != p.placement):
            why = f"its members or placement differ from the plan of epoch {c.epoch}"
        if why:
            self._report("committed", rev, f"ignoring {self.root}/committed (revision {rev}, epoch {c.epoch}): {why}")
            return None
        return c

    # -- the pass --------------------------------------------------------------------
    def poll_once(self) -> str:
        """One look at etcd: register if not a member, else act on a newer plan or
        commit. Returns what it did (``"idle"``, ``"acked"``, ``"left"``, ...)."""
        if self.state in _MEMBER_STATES and (self.fenced.is_set() or time.monotonic() >= self._lease_until):
            self._fence("lease expired or not refreshed within its TTL", "lease")
        if self.state in (AgentState.NEW, AgentState.FENCED):
            return self._try_register()
        if self.state is AgentState.LEFT:
            return "left"
        read = self._read()
        mine, why = self._membership(read)
        if mine is None:
            log.warning("rank %s epoch %d: no longer a member: %s; fencing", self.token, self.last_epoch, why)
            self._fence(f"no longer a member: {why}", "member")
            return self._try_register()
        if mine.state == "draining" and self.state in (AgentState.JOINING, AgentState.ACTIVE):
            self._transition(AgentState.DRAINING, "its record says draining")
        rec = self._plan_to_run(read)
        if rec is not None:
            return self._on_plan(rec)
        c = self._commit_to_run(read)
        if c is not None:
            return self._on_commit(c)
        return self._apply_routing(read) or "idle"

    def _on_plan(self, rec: PlanRecord) -> str:
        if self.token not in rec.participants():
            return "not a participant"
        # Watch this plan's participants from now: a death mid-plan must be seen as
        # fast as one outside it (joiners have no committed peers yet).
        self._watch_peers(rec.participants())
        # Serving pauses per layer only (elastic_ep.runtime.serving); nothing is served
        # before the bootstrap load ends. The mirror's fill waits: it never delays a plan.
        if self.mirror is not None:
            self.mirror.pause()
        try:
            ack = self._execute(rec)
        finally:
            if self.mirror is not None:
                self.mirror.resume()
        call(self.client.put, f"ack {rec.epoch}", f"{self.root}/acks/{self.cfg.id}", ack.to_json())
        if ack.ok:
            self._retry.clear()
            return "acked"
        # This rank's slots are now unknown: be a new member and get refilled.
        self._fence(f"plan epoch {rec.epoch} failed: {ack.error[:200]}", "plan")
        return "failed"

    def _execute(self, rec: PlanRecord) -> AckRecord:
        """This rank's part of ``rec``: the bootstrap load or the plan's transfers
        (beside serving), then the optional check; the ack to write. A failure, or any
        slot not bit-exact, stops serving."""
        t0 = time.perf_counter()
        new_rank = rec.new_members.index(self.token) if self.token in rec.new_members else None
        masked: set[int] = set()  # new ranks a barrier passed without: not served until the commit
        try:
            if rec.bootstrap:
                loaded = self.load_initial(rec.placement, new_rank) or 0  # type: ignore[arg-type]
                moved, phases = {"disk": int(loaded)}, {"load": time.perf_counter() - t0}
            else:
                # Only this rank's part is read; a chunk that is missing or fails its
                # digest fails the plan here, before a byte is written.
                part = plan_chunks.load_part(self.client, self.root, rec, self.token).plan
                assert part is not None
                read_s = time.perf_counter() - t0
                moved, phases, masked = self._transfer(rec, part, new_rank)
                phases["read_plan"] = read_s
            mismatched = -1
            if self.verify is not None and new_rank is not None:
                mismatched = self.verify(rec.placement, new_rank)
        except Exception as e:  # whatever failed, the controller must hear of it
            log.exception("rank %s epoch %d: plan failed: %s", self.token, rec.epoch, e)
            self._stop_serving(f"plan epoch {rec.epoch} failed")
            return AckRecord(rec.epoch, self.token, False, error=f"{type(e).__name__}: {e}"[:2000])
        if mismatched > 0:
            # Success means bit-exact: these slots must not be served, sent or committed.
            error = (f"{mismatched} slots of new rank {new_rank} are not bit-exact after epoch {rec.epoch}; "
                     "this rank needs a refill")
            log.error("rank %s epoch %d: %s", self.token, rec.epoch, error)
            self._stop_serving(error)
            return AckRecord(rec.epoch, self.token, False, moved, phases, error, mismatched)
        with self.busy:
            self._holding = (rec.placement, new_rank) if new_rank is not None else None
            self._set_serving(ServingMap.of(rec.placement, new_rank, masked)
                              if new_rank is not None and self._maps_wanted else None)
        return AckRecord(rec.epoch, self.token, True, moved, phases, "", mismatched)

    @property
    def _maps_wanted(self) -> bool:
        return self.keep_serving_map or self.on_serving is not None

    def _set_serving(self, m: ServingMap | None) -> None:
        """Replace the router's map whole (``busy`` held) and tell the engine."""
        if not self._maps_wanted:
            return
        self.serving = m
        if m is not None and self.on_serving is not None:
            self.on_serving(m, list(range(m.phy2log.shape[0])))

    def _transfer(
        self, rec: PlanRecord, plan: TransferPlan, new_rank: int | None
    ) -> tuple[dict[str, int], dict[str, float], set[int]]:
        """The executor's run of ``plan`` for this rank, beside serving: bytes by route,
        phase seconds (with the serving pauses), and the new ranks a barrier passed
        without. An old rank first proves it holds the plan's old slots (it is a source:
        it must not send other bytes)."""
        old_rank = rec.old_members.index(self.token) if self.token in rec.old_members else None
        switch = None
        if old_rank is not None:
            self._check_holding(plan, old_rank)
            if self._maps_wanted:
                switch = PlanSwitch.start(plan, old_rank, self.busy, self.on_serving)
                with switch.pauses.hold(self.busy):  # the plan's dead ranks go out of the map now
                    self._set_serving(switch.current)
        store = EtcdStore(self.client, self.root, scope=str(rec.epoch))
        peers = PlanPeers(self.client, self.root, rec, plan.mapping)
        transport = getattr(self.executor, "transport", None)
        if transport is not None:
            transport.abort, transport.gone = peers.abort_reason, peers.gone
        self.executor.mirror_rows = peers.mirror_rows
        try:
            report = self.executor.execute(plan, old_rank, None if old_rank is not None else new_rank, store=store,
                                           gone=peers.gone, hooks=switch)
        finally:
            self.executor.mirror_rows = None
            if transport is not None:
                transport.abort = transport.gone = None
        phases = dict(report.phase_seconds)
        if switch is not None:
            p = switch.pauses
            phases["pause_max"], phases["pause_total"] = p.longest, p.total
            phases["write_max"] = max(p.writes, default=0.0)
        return report.bytes_by_route(), phases, _new_ranks(plan, report.excluded)

    def _check_holding(self, plan: TransferPlan, old_rank: int) -> None:
        """Raise :class:`PlanError` unless the weights hold old rank ``old_rank``'s slots
        of ``plan.old``: ``[num_layers, slots_per_rank]`` logical ids, compared whole."""
        want = plan.old.rank_slots(old_rank)
        held = self.holding
        got = None if held is None else held[0].rank_slots(held[1])
        if got is None and self._holding is not None:
            what = "slots it may no longer serve: its lease was not refreshed within its TTL"
        elif got is None:
            what = "no placement (fenced, or never filled)"
        elif got.shape != want.shape:
            what = f"slots shaped {list(got.shape)}, not the plan's {list(want.shape)}"
        elif not np.array_equal(got, want):
            what = f"{int(np.sum(got != want))} of {want.size} slots with other experts than plan.old says"
        else:
            return
        raise PlanError(
            f"rank {self.token} epoch {plan.epoch}: the plan reads old rank {old_rank}'s slots from this rank, but "
            f"its weights hold {what}; it sends nothing and needs a refill"
        )

    def _on_commit(self, c: CommitRecord) -> str:
        self.committed_epoch = c.epoch
        if self.token in c.members:
            self.rank = c.members.index(self.token)
            self.placement = c.placement
            self._retry.clear()
            with self._state_lock:  # a drain() between the check and the move must not be undone
                if self.state is AgentState.JOINING:
                    self._transition(AgentState.ACTIVE, f"committed as rank {self.rank}")
            held = self._holding
            if held is not None and held[1] == self.rank and self._maps_wanted and held[0] == c.placement:
                with self.busy:  # ranks a barrier passed without are served again
                    self._set_serving(ServingMap.of(c.placement, self.rank))
            if self.on_commit is not None:
                self.on_commit(c.placement, self.rank)
            if self.mirror is not None:
                m = c.mirrors
                self.mirror.assign(m.rows_of(self.rank, self.mirror.rows) if m is not None
                                   else np.full(self.mirror.rows, -1))
            self._members = list(c.members)
            self._watch_peers(c.members)
            return f"committed as rank {self.rank}"
        if self.state is AgentState.DRAINING and self.last_epoch >= c.epoch:
            # Revoking the lease deletes the rank's keys, and only while they are its own.
            call(self.client.revoke_lease, f"leave {self.key}", self.lease.id)
            with self._state_lock:
                with self._lease_lock:
                    self.lease = None
                self._transition(AgentState.LEFT, f"scale-down committed at epoch {c.epoch}")
            self._stop.set()
            return "left"
        return "not a member"

    # -- coverage before balance -----------------------------------------------------
    def _apply_routing(self, read: Read) -> str:
        """Hand the engine a routing around committed members confirmed dead
        (``routing`` of this rank's committed epoch), once per value, and only for
        members whose registration is verifiably gone: a forged record can hide no live
        rank. "" when there is nothing new to apply."""
        r, rev = self._value(read, "routing", RoutingRecord.parse)
        if r is None or rev == self._routed_rev:
            return ""
        if self.placement is None or self.rank is None or r.epoch != self.committed_epoch:
            return ""
        self._routed_rev = rev
        dead = [t for t in r.dead if t in self._members and t != self.token]
        keys = [f"{self.root}/ranks/{member_id(t)}" for t in dead]
        live = []
        for t, key, kvs in zip(dead, keys, read_ranges(self.client, "read masked ranks", [], keys)):
            rec = parse_value(RankRecord.parse, key, kvs[0][0], 0) if kvs else None
            if isinstance(rec, RankRecord) and rec.token == t:
                live.append(t)
        if live:
            self._report("routing", rev, f"ignoring {self.root}/routing (revision {rev}): {live} are still registered")
            return ""
        ranks = [self._members.index(t) for t in dead]
        m = self.serving
        if m is not None and m.rank == self.rank and self.last_epoch == self.committed_epoch:
            with self.busy:  # the map is in the committed numbering: no plan ran since
                m.phy2log = without_ranks(m.phy2log, set(ranks), m.slots_per_rank)
                self._set_serving(m)
        if self.on_routing is not None:
            self.on_routing(self.placement, self.rank, ranks)
        return f"routing around ranks {ranks}"

    # -- peer liveness ---------------------------------------------------------------
    def _watch_peers(self, members: list[str]) -> None:
        """Watch the liveness of this rank's peers among ``members`` (ring neighbours
        and same-node ranks: :func:`~elastic_ep.runtime.liveness.monitored_peers`),
        after dropping its reports on the last membership. Best effort: when etcd
        cannot say who the peers are, the lease and the executor's deadlines remain."""
        if self.liveness is None:
            return
        try:
            self._watch_peers_of(members)
        except Exception as e:
            log.warning("rank %s epoch %d: cannot watch its peers: %s", self.token, self.last_epoch, e)

    def _watch_peers_of(self, members: list[str]) -> None:
        # An incarnation's endpoint and node never change: the registrations read when
        # the plan was accepted serve its commit too (one read of ranks/ per plan).
        if not set(members) <= self._peer_records.keys():
            records = [parse_value(RankRecord.parse, m.key.decode(), v, m.mod_revision)
                       for v, m in call(self.client.get_prefix, "read ranks", f"{self.root}/ranks/")]
            self._peer_records = {r.token: r for r in records if isinstance(r, RankRecord)}
        known = self._peer_records
        nodes = {t: r.node for t, r in known.items()}
        peers = monitored_peers(members, self.token, nodes)
        wanted = {t: known[t].endpoint["liveness"] for t in peers
                  if t in known and isinstance(known[t].endpoint.get("liveness"), str)}
        # Reports on peers still watched stand (the monitor reports a peer once); the
        # others are withdrawn.
        for rid, token in list(self._reports.items()):
            if token not in wanted:
                call(self.client.delete, "withdraw a suspicion", f"{self.root}/suspects/{self.cfg.id}/{rid}")
                self._reports.pop(rid, None)
        if self.monitor is None:
            misses = max(1, math.ceil(self.cfg.stall_tolerance_s / self.cfg.heartbeat_s))
            self.monitor = PeerMonitor(self._on_suspect, self.cfg.heartbeat_s, misses, drop=self.heartbeat_drop)
        self.monitor.watch(wanted)

    def _on_suspect(self, target: str, kind: str, detail: str) -> None:
        """A watched peer looks dead: say so under this rank's lease (the controller
        confirms; one report evicts no one). Runs on the monitor thread."""
        lease = self.lease
        self.suspected.append((target, kind, detail))
        if lease is None or self.state not in _MEMBER_STATES:
            return
        log.warning("rank %s epoch %d: peer %s looks dead (%s: %s); reporting it", self.token, self.last_epoch,
                    target, kind, detail)
        rec = SuspectRecord(self.token, target, kind, detail[:1000])
        call(self.client.put, f"report {target}", f"{self.root}/suspects/{self.cfg.id}/{member_id(target)}",
             rec.to_json(), lease=lease)
        self._reports[member_id(target)] = target

    def report_fault(self, reason: str) -> None:
        """The engine saw this rank break (a CUDA error, say): stop serving at once and
        ask the controller to remove it now; it registers again as a new member once
        its lease is revoked."""
        self._stop_serving(f"fault reported: {reason}")
        lease = self.lease
        if lease is None:
            return
        rec = SuspectRecord(self.token, self.token, "self", reason[:1000])
        call(self.client.put, "report own fault", f"{self.root}/suspects/{self.cfg.id}/{self.cfg.id}",
             rec.to_json(), lease=lease)

    def publish_mirror(self, rows: np.ndarray) -> None:
        """Publish which expert each mirror row holds ready (``mirrors/<id>``, under the
        rank's lease); raises when etcd does not take it (the keeper tries again)."""
        lease = self.lease
        if lease is None:
            raise EtcdUnavailableError("no lease to publish the mirror under (not registered)")
        call(self.client.put, f"mirror {self.cfg.id}", f"{self.root}/mirrors/{self.cfg.id}",
             MirrorRecord(self.token, rows).to_json(), lease=lease)

    def publish_load(self) -> None:
        """Publish this rank's load window (``load/<id>``, under the rank's lease, so it
        goes with the registration), at most every ``load_period_s``."""
        now, lease = time.monotonic(), self.lease
        if self.load_window is None or self.holding is None or lease is None:
            return  # a rank that holds no experts yet has served nothing
        if now - self._load_at < self.cfg.load_period_s:
            return
        window = now - self._load_at if self._load_at else self.cfg.load_period_s
        self._load_at = now
        rows = [[float(x) for x in row] for row in self.load_window()]
        call(self.client.put, f"load {self.cfg.id}", f"{self.root}/load/{self.cfg.id}",
             LoadRecord(self.cfg.id, rows, window, dict(self.served), list(self.epochs_seen[-64:])).to_json(),
             lease=lease)

    def run(self, stop: threading.Event | None = None) -> None:
        """Register, then poll until ``stop`` (or :meth:`stop`, or leaving). One failed
        pass is logged and retried with backoff: the agent must outlive etcd hiccups and
        any value in etcd. A checkpoint that does not fit this rank raises before the
        first registration (:class:`CheckpointError`): such a rank never joins."""
        stop = stop or self._stop
        backoff = 0.1
        while not stop.is_set() and not self._stop.is_set():
            try:
                if self.state in _MEMBER_STATES:
                    self.watch.ensure()  # before the read: a change after it wakes the next pass
                self.poll_once()
                self.publish_load()
                backoff = 0.1
                self._idle(stop)
                continue
            except CheckpointError:
                if self.state is AgentState.NEW:
                    raise
                log.exception("rank %s epoch %d: checkpoint error; retrying", self.token, self.last_epoch)
            except (EtcdUnavailableError, MalformedValueError) as e:
                log.warning("rank %s epoch %d: etcd unavailable, waiting: %s", self.token, self.last_epoch, e)
            except Exception:  # a serving process's agent must not die of one bad pass
                log.exception("rank %s epoch %d: agent pass failed; retrying", self.token, self.last_epoch)
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        self.watch.close()

    def _idle(self, stop: threading.Event) -> None:
        """Wait for the next pass: a member until a watched key changes, its lease needs
        a look, its load window is due, or ``resync_s``; otherwise ``poll_s``."""
        if self.state not in _MEMBER_STATES:
            stop.wait(self.cfg.poll_s)
            return
        now = time.monotonic()
        wait = min(self.cfg.resync_s, max(self._lease_until - now, 0.0) + 0.01)
        if self.load_window is not None:
            wait = min(wait, max(self._load_at + self.cfg.load_period_s - now, 0.0))
        if not self.watch.armed:
            wait = min(wait, self.cfg.poll_s * 4)
        self._wake.wait(max(wait, 0.001))
        self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.mirror is not None:
            self.mirror.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.liveness is not None:
            self.liveness.close()


def _new_ranks(plan: TransferPlan, excluded: dict[int, list[int]]) -> set[int]:
    """The new ranks of the participants the plan's barriers passed without."""
    parts = Participants.of(plan.mapping)
    out = set()
    for p in {p for ps in excluded.values() for p in ps}:
        nr = plan.mapping.old_to_new[parts.old[p]] if p < len(parts.old) else parts.joining[p - len(parts.old)]
        if nr >= 0:
            out.add(nr)
    return out
