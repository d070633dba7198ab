"""The rank agent: embedded in a serving process, it keeps the rank registered in etcd,
carries out the plans the leader publishes, and hands committed placements to the
serving engine.

It acts on a plan only if the plan is newer than every epoch it has seen, names this
rank's current incarnation, and comes from the controller that holds the leader key
now. A rank whose own lease expired (a partition, a long pause) is fenced: it stops
acting, drops its rank, and registers again as ``joining`` with a new incarnation, so
the controller treats it as a new member and refills it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from controller.etcd_client import EtcdConfig, EtcdStore, call, connect
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord

from elastic_ep.errors import EtcdUnavailableError, MalformedValueError
from elastic_ep.runtime.executor import PlanExecutor
from elastic_ep.core.placement import ExpertPlacement

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
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
        self.state = "joining"
        self.last_epoch = 0  # newest plan epoch seen (acted on or refused)
        self.committed_epoch = 0
        self.rank: int | None = None  # in the committed placement
        self.placement: ExpertPlacement | None = None
        self.fenced = threading.Event()
        self.leaving = False
        self.left = threading.Event()
        self._stop = threading.Event()
        self.epochs_seen: list[int] = []
        self.busy = threading.Lock()
        """Held while the weights change: serving pauses (as vLLM's EPLB pauses the step)."""
        self.holding: tuple[ExpertPlacement, int] | None = None
        """(placement, rank) the weights hold now: set once a plan's writes are done."""
        self.served: dict[str, int] = {"ok": 0, "bad": 0}

    @property
    def token(self) -> str:
        return f"{self.cfg.id}#{self.incarnation}"

    # -- membership ------------------------------------------------------------------
    def _record(self) -> RankRecord:
        return RankRecord(self.cfg.id, socket.gethostname(), self.cfg.device, self.cfg.node, self.state,
                          self.cfg.endpoint, os.getpid(), self.incarnation)

    def register(self) -> None:
        """A new incarnation, joining, under a fresh lease kept alive by a thread."""
        self.incarnation = uuid.uuid4().hex[:8]
        self.state, self.rank, self.placement = "joining", None, None
        self.lease = call(self.client.lease, "grant rank lease", self.cfg.lease_ttl_s)
        call(self.client.put, f"register {self.key}", self.key, self._record().to_json(), lease=self.lease)
        self.fenced.clear()
        threading.Thread(target=self._keepalive, args=(self.lease,), name="elastic-ep-rank-lease", daemon=True).start()
        log.info("rank %s registered as %s", self.cfg.id, self.token)

    def _keepalive(self, lease: Any) -> None:
        while not self._stop.wait(self.cfg.lease_ttl_s / 3) and lease is self.lease:
            try:
                replies = call(lambda: list(self.client.refresh_lease(lease.id)), "refresh rank lease")
                if not replies or replies[0].TTL <= 0:
                    log.warning("rank %s: lease expired; fencing this rank", self.cfg.id)
                    self.fenced.set()
                    return
            except EtcdUnavailableError as e:
                # etcd restarting keeps leases alive; keep trying.
                log.warning("rank %s: cannot refresh lease: %s", self.cfg.id, e)

    def _set_state(self, state: str) -> None:
        self.state = state
        call(self.client.put, f"update {self.key}", self.key, self._record().to_json(), lease=self.lease)

    def drain(self) -> None:
        """Ask to leave: the controller plans a scale-down in which this rank still
        sends; once it is committed the agent deletes its key and stops."""
        self.leaving = True
        self._set_state("draining")

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
            log.error("ignoring %s: %s", name, e)
            return None

    def poll_once(self) -> str:
        if self.fenced.is_set():
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
            log.warning("refusing plan epoch %d from %s: the leader is %s", rec.epoch, rec.leader, leader)
            return "refused: not leader"
        if self.token not in rec.participants():
            return "not a participant"
        t0 = time.perf_counter()
        self.busy.acquire()
        try:
            if rec.plan is None:
                new_rank = rec.new_members.index(self.token)
                loaded = self.load_initial(rec.placement, new_rank) or 0
                ack = AckRecord(rec.epoch, self.token, True, {"disk": int(loaded)}, {"load": time.perf_counter() - t0})
            else:
                old_rank = rec.old_members.index(self.token) if self.token in rec.old_members else None
                new_rank = rec.new_members.index(self.token) if self.token in rec.new_members else None
                store = EtcdStore(self.client, f"{self.root}/store/{rec.epoch}")
                self.executor.store = store
                report = self.executor.execute(rec.plan, old_rank, None if old_rank is not None else new_rank)
                ack = AckRecord(rec.epoch, self.token, True, report.bytes_by_route(), report.phase_seconds)
            if self.verify is not None and self.token in rec.new_members:
                ack = AckRecord(ack.epoch, ack.id, ack.ok, ack.bytes, ack.phases, "",
                                self.verify(rec.placement, rec.new_members.index(self.token)))
            self.holding = (rec.placement, rec.new_members.index(self.token)) if self.token in rec.new_members else None
        except Exception as e:  # whatever failed, the controller must hear of it
            log.exception("plan epoch %d failed: %s", rec.epoch, e)
            ack = AckRecord(rec.epoch, self.token, False, error=f"{type(e).__name__}: {e}"[:2000])
            self.holding = None
        finally:
            self.busy.release()
        call(self.client.put, f"ack {rec.epoch}", f"{self.root}/acks/{self.cfg.id}", ack.to_json())
        if not ack.ok:
            # This rank's slots are now unknown: be a new member and get refilled.
            call(self.client.delete, f"drop {self.key}", self.key)
            self.register()
        return "acked" if ack.ok else "failed"

    def _on_commit(self, c: CommitRecord) -> str:
        self.committed_epoch = c.epoch
        if self.token in c.members:
            self.rank = c.members.index(self.token)
            self.placement = c.placement
            if self.state == "joining":
                self._set_state("active")
            if self.on_commit is not None:
                self.on_commit(c.placement, self.rank)
            return f"committed as rank {self.rank}"
        if self.leaving and self.last_epoch >= c.epoch:
            call(self.client.delete, f"leave {self.key}", self.key)
            self.left.set()
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
        stop = stop or self._stop
        self.register()
        backoff = 0.1
        while not stop.is_set() and not self._stop.is_set():
            try:
                self.poll_once()
                self.publish_load()
                backoff = 0.1
                stop.wait(self.cfg.poll_s)
            except (EtcdUnavailableError, MalformedValueError) as e:
                log.warning("rank %s: etcd unavailable, waiting: %s", self.cfg.id, e)
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # a serving process's agent must not die of one bad pass
                log.exception("rank %s: agent pass failed; retrying", self.cfg.id)
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def stop(self) -> None:
        self._stop.set()
