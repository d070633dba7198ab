"""The controller: one leader among replicas turns membership changes into fenced,
acknowledged, committed plans.

Each pass of the leader's loop reads the deployment's keys (a level-triggered
reconcile, woken by a watch and by a periodic resync), asks
:func:`controller.decide.decide` what to do, and does it: at most one fenced write
(a bootstrap plan, the next plan, or a commit), then metrics, logs, and a wait that
depends on the kind of action. What is decided, and why, is in
:mod:`controller.decide`; this module is the I/O around it.

Publishing and committing are transactions that succeed only while this controller
holds the leader key and the ``epoch`` key's mod revision is still the one it read (a
revision, not the value: a malformed value cannot wedge the fence). A refused write
says why: leadership lost (:class:`NotLeaderError`: step down) or the epoch moved
(:class:`EpochMovedError`: still the leader, read again).

Failure contract: everything durable is in etcd. A controller that takes over reads the
plan in flight and its acks and carries on; it loses only timings (the detect and plan
phases of a plan it did not send, and the ack deadline, which restarts at takeover).
Nothing kills the loop: a controller started while etcd is down waits for it, a value
that does not parse is skipped and reported once per key and mod revision, and a pass
that fails for any reason is logged and retried with capped exponential backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from elastic_ep.errors import (
    ElasticEPError, EpochMovedError, EtcdUnavailableError, MalformedValueError, NotLeaderError, RecordTooLargeError,
)
from elastic_ep.core.policy import get_policy

from controller.coverage import mirror_coverage
from controller.decide import Action, DecideConfig, Kind, Memory, ModelShape, decide
from controller.election import LeaderElection
from controller import plan_chunks
from controller.etcd_client import EtcdConfig, call, connect
from controller.metrics import ControllerMetrics
from controller.records import AckRecord, CommitRecord, PlanRecord, RoutingRecord, member_id
from controller.probe import probe
from controller.suspicion import judge
from controller.view import ClusterView, ParseCache, read_view
from controller.watch import KeyWatch

__all__ = ["Controller", "ControllerConfig", "ModelShape"]

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0
"""Waits after a failed pass: doubling from the first to the second."""


@dataclass
class ControllerConfig:
    """A controller replica's settings. Example: ``ControllerConfig(EtcdConfig("10.0.0.2:2379"),
    ModelShape(58, 256, 9, 88_080_384), id="ctl-a", min_ranks=32, settle_s=1.0)``."""

    etcd: EtcdConfig
    model: ModelShape
    id: str = "controller-0"
    min_ranks: int = 1
    max_joiners_per_plan: int = 16
    """Joining ranks one plan takes in, oldest registration first (the rest join next)."""
    policy: str = "min_migration"
    policy_options: dict[str, Any] = field(default_factory=dict)
    settle_s: float = 1.0
    confirm_settle_s: float = 0.05
    """Settle window after deaths the controller confirmed (see :mod:`controller.suspicion`)."""
    suspect_quorum: int = 2
    """Distinct reporters whose suspicions confirm a death without a probe."""
    probe_timeout_s: float = 0.2
    """The controller's own probe of a suspect: a heartbeat byte within this long."""
    leader_ttl_s: int = 3
    ack_timeout_s: float = 300.0
    resync_s: float = 0.5
    coverage_every_s: float = 10.0
    """How often a steady leader measures the mirrors' coverage for the metrics."""
    imbalance_threshold: float = 0.0
    """Rebalance when mean/max rank load falls below this (0 disables)."""
    rebalance_cooldown_s: float = 60.0

    def decide_config(self) -> DecideConfig:
        """The part of this configuration that decisions depend on."""
        return DecideConfig(
            self.model, leader=self.id, min_ranks=self.min_ranks, settle_s=self.settle_s,
            confirm_settle_s=self.confirm_settle_s,
            ack_timeout_s=self.ack_timeout_s, imbalance_threshold=self.imbalance_threshold,
            rebalance_cooldown_s=self.rebalance_cooldown_s, max_joiners_per_plan=self.max_joiners_per_plan,
            policy=get_policy(self.policy, **self.policy_options),
        )


class Controller:
    """``Controller(cfg).run(stop)`` campaigns for leadership and, while it leads,
    reconciles; ``client`` (an ``etcd3`` client) and ``metrics`` may be given. Without a
    client it connects now, or, while etcd cannot be reached, from ``run`` with backoff
    (``client`` and ``election`` are None until then)."""

    def __init__(self, cfg: ControllerConfig, client: Any = None, metrics: ControllerMetrics | None = None) -> None:
        self.cfg = cfg
        self.root = cfg.etcd.root
        self.metrics = metrics or ControllerMetrics()
        self._rules = cfg.decide_config()
        self.policy = self._rules.policy
        self._memory = Memory(last_rebalance=time.monotonic())
        self._coverage_at = -1e9
        self._epoch = 0  # the newest epoch the last pass read, for log lines
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reported: dict[str, int] = {}  # key -> mod revision of the bad value last reported
        self._now_bad: dict[str, int] = {}
        self._parsed: ParseCache = {}
        self._probed: dict[str, float] = {}  # suspect -> when it last answered a probe
        self.watch: KeyWatch | None = None
        self.client: Any = None
        self.election: LeaderElection | None = None
        if client is None:
            try:
                client = connect(cfg.etcd)
            except EtcdUnavailableError as e:
                log.warning("controller %s: etcd not reachable yet, will keep trying: %s", cfg.id, e)
        if client is not None:
            self._attach(client)

    def _attach(self, client: Any) -> None:
        self.client = client
        self.election = LeaderElection(client, f"{self.root}/leader", self.cfg.id, self.cfg.leader_ttl_s)
        # Only what drives decisions: membership, suspicions, the plan head, acks and the
        # commit; not loads (the resync looks at imbalance), nor execution scratch, nor chunks.
        r = self.root
        self.watch = KeyWatch(client, self._wake, keys=[f"{r}/{k}" for k in ("plan", "committed", "epoch", "leader")],
                              prefixes=[f"{r}/ranks/", f"{r}/acks/", f"{r}/suspects/"])

    def _connected(self) -> LeaderElection:
        """The election, connecting first if etcd was unreachable so far; the watch is
        (re)armed before each pass reads."""
        if self.election is None:
            self._attach(connect(self.cfg.etcd))
            log.info("controller %s: connected to etcd at %s", self.cfg.id, self.cfg.etcd.endpoint)
        assert self.election is not None and self.watch is not None
        self.watch.ensure()
        return self.election

    # -- reading ---------------------------------------------------------------------
    def view(self) -> ClusterView:
        """The deployment's keys, read at one revision (malformed values reported once
        per key and mod revision)."""
        self._now_bad = {}
        view = read_view(self.client, self.root, self._report_malformed, self._parsed)
        # Forget values that are gone, so that memory follows what etcd holds now.
        self._reported = self._now_bad
        self.metrics.malformed_now.set(len(view.malformed))
        return view

    def _report_malformed(self, key: str, e: MalformedValueError) -> None:
        self._now_bad[key] = e.revision
        if self._reported.get(key) != e.revision:
            self.metrics.malformed.inc()
            log.error("epoch %d: ignoring malformed value (mod revision %d): %s", self._epoch, e.revision, e)

    # -- fenced writes ---------------------------------------------------------------
    def _fenced(self, epoch_revision: int, ops: list[Any], what: str) -> None:
        """Run ``ops`` iff this controller holds the leader key and the epoch key's mod
        revision is ``epoch_revision`` (0: absent); else say which of the two moved."""
        tx = self.client.transactions
        leader_key, epoch_key = f"{self.root}/leader", f"{self.root}/epoch"
        cmp = [tx.value(leader_key) == self.cfg.id, tx.mod(epoch_key) == epoch_revision]
        ok, found = call(self.client.transaction, what, compare=cmp, success=ops,
                         failure=[tx.get(leader_key), tx.get(epoch_key)])
        if ok:
            return
        self.metrics.fenced.inc()
        leader = found[0][0][0] if found and found[0] else None
        if leader != self.cfg.id.encode():
            if self.election is not None:
                self.election.step_down()
            raise NotLeaderError(f"epoch {self._epoch}: {what} refused: {self.cfg.id} lost leadership ({leader_key} "
                                 f"now holds {leader!r}); stepping down")
        now = found[1][0][1].mod_revision if len(found) > 1 and found[1] else 0
        raise EpochMovedError(f"epoch {self._epoch}: {what} refused: {epoch_key} moved since it was read (mod revision "
                              f"{epoch_revision} -> {now}); {self.cfg.id} still leads and reads again")

    def publish(self, rec: PlanRecord, epoch_revision: int) -> PlanRecord:
        """Write plan ``rec``'s chunks, then its head and ``epoch = rec.epoch`` in one
        transaction (so both keys carry one mod revision) iff this controller leads and
        the epoch key's mod revision is still ``epoch_revision``, as read (0: absent).
        Returns the head as published."""
        rec = plan_chunks.write(self.client, self.root, rec)
        tx = self.client.transactions
        self._fenced(epoch_revision, [tx.put(f"{self.root}/epoch", str(rec.epoch)),
                                      tx.put(f"{self.root}/plan", rec.to_json())], f"publish plan epoch {rec.epoch}")
        self.metrics.epoch.set(rec.epoch)
        log.info("published plan epoch %d (%s): %d -> %d ranks, %d chunks", rec.epoch, rec.reason,
                 len(rec.old_members), len(rec.new_members), len(rec.chunks))
        return rec

    def commit(self, rec: PlanRecord, acks: dict[str, AckRecord], phases: dict[str, float],
               epoch_revision: int) -> CommitRecord:
        """Write the commit record of plan ``rec`` (bytes summed over ``acks``, seconds by
        phase) iff this controller leads and the epoch key's mod revision is still
        ``epoch_revision`` (so the plan is the one read)."""
        total: dict[str, int] = {}
        for a in acks.values():
            for k, v in a.bytes.items():
                total[k] = total.get(k, 0) + int(v)
        c = CommitRecord(rec.epoch, rec.new_members, rec.placement, phases, total, rec.mirrors,
                         self.cfg.model.expert_bytes)
        tx = self.client.transactions
        t0 = time.monotonic()
        self._fenced(epoch_revision, [tx.put(f"{self.root}/committed", c.to_json())], f"commit epoch {rec.epoch}")
        # The epoch's scratch keys and older plans' chunks are no longer needed (the
        # committed plan's stay, for tools that check it).
        call(self.client.delete_prefix, "clean store", f"{self.root}/store/")
        plan_chunks.remove_before(self.client, self.root, rec.epoch)
        for route, n in total.items():
            self.metrics.bytes.labels(route=route).inc(n)
        # detect and plan were observed when the plan went out.
        for ph, s in (("transfer", phases.get("transfer", 0.0)), ("commit", time.monotonic() - t0)):
            self.metrics.phase.labels(phase=ph).observe(s)
        log.info("committed epoch %d: %d ranks, bytes %s, phases %s", rec.epoch, len(rec.new_members), total,
                 {k: round(v, 3) for k, v in phases.items()})
        return c

    def confirm(self, view: ClusterView) -> frozenset[str]:
        """Judge the suspicions in ``view``, probing a lone reporter's suspect (at most
        once a second per suspect), and revoke the leases of the members confirmed
        dead. Returns their tokens."""
        j = judge(view, self.cfg.suspect_quorum)
        confirmed = dict(j.confirmed)
        now = time.monotonic()
        for target, address in j.probe.items():
            if now - self._probed.get(target, -1e9) < 1.0:
                continue
            alive, why = probe(address, self.cfg.probe_timeout_s)
            if alive:
                self._probed[target] = now
                log.info("epoch %d: %s is suspected, but answered the controller's probe", view.epoch, target)
            else:
                confirmed[target] = f"suspected, and the controller's probe of {address} failed: {why}"
        done = set()
        for target, why in confirmed.items():
            lease = view.leases.get(member_id(target))
            if lease is None:
                continue
            log.warning("epoch %d: %s confirmed dead (%s); revoking its lease", view.epoch, target, why)
            if self._revoke_lease(lease, view.epoch):
                self.metrics.confirmed.labels(how=j.how.get(target, "probe")).inc()
                done.add(target)
        return frozenset(done)

    def _revoke_lease(self, lease: int, epoch: int) -> bool:
        """Revoke a rank's lease (the fence: its keys go at once); False when etcd did
        not take it (gone already, or etcd away: the next pass sees which)."""
        try:
            call(self.client.revoke_lease, f"revoke lease {lease:x}", lease)
            return True
        except EtcdUnavailableError as e:
            log.warning("epoch %d: %s", epoch, e)
            return False

    def mask(self, view: ClusterView, dead: frozenset[str]) -> None:
        """Coverage before balance: publish, for the committed epoch, the members to
        route around (``routing``), fenced like every write of the leader, so that
        serving stops sending tokens to dead ranks before any weight moves."""
        c = view.committed
        if c is None or not dead & set(c.members):
            return
        before = set(view.routing.dead) if view.routing is not None and view.routing.epoch == c.epoch else set()
        rec = RoutingRecord(c.epoch, sorted(before | (dead & set(c.members))))
        tx = self.client.transactions
        try:
            self._fenced(view.epoch_revision, [tx.put(f"{self.root}/routing", rec.to_json())],
                         f"mask routing of epoch {c.epoch}")
        except EpochMovedError as e:  # a publish beat it: the plan covers the change anyway
            log.info("%s", e)
            return
        log.warning("epoch %d: routing around %s until the next commit", c.epoch, rec.dead)

    def revoke(self, action: Action) -> None:
        """Fence the participants an ACK_TIMEOUT names: revoking a lease deletes the
        rank's keys at once; its agent sees the lease gone and registers again."""
        log.error("epoch %d: %s: %s; revoking their leases so that the next plan goes without them",
                  action.epoch, action.reason, sorted(action.ranks))
        for lease in action.leases:
            if self._revoke_lease(lease, action.epoch):
                self.metrics.revoked.inc()

    # -- acting ----------------------------------------------------------------------
    def step(self) -> Action:
        """One reconcile pass as leader: read, confirm suspicions (fencing the
        confirmed, then reading again), decide, act. Returns the action taken."""
        view = self.view()
        self._epoch = view.epoch
        confirmed = self.confirm(view)
        if confirmed:
            self._memory = replace(self._memory, confirmed=self._memory.confirmed | confirmed)
            self.mask(view, confirmed)
            view = self.view()
        self.metrics.members(view.ranks.values())
        now = time.monotonic()
        action = decide(view, self._memory, self._rules, now)
        planned_s = time.monotonic() - now
        # The memory moves on only once the action's writes succeeded: after a refused
        # write the next pass decides again from what it remembered.
        self._memory = self._perform(action, view, planned_s)
        if action.kind is Kind.STEADY:
            self._observe_coverage(view)
        return action

    def _observe_coverage(self, view: ClusterView) -> None:
        """The mirrors' coverage into the metrics, at most every ``coverage_every_s``
        (it reads every rank's mirror report)."""
        now = time.monotonic()
        if now - self._coverage_at < self.cfg.coverage_every_s:
            return
        self._coverage_at = now
        try:
            self.metrics.coverage(mirror_coverage(view), self.cfg.model.expert_bytes)
        except ElasticEPError as e:  # a metric must not stop a pass
            log.warning("epoch %d: mirror coverage not measured: %s", view.epoch, e)

    def _perform(self, action: Action, view: ClusterView, planned_s: float) -> Memory:
        """Carry ``action`` out; the memory for the next pass."""
        if action.dead or action.failed:
            self.metrics.failures.inc(len(action.dead))
            log.warning("epoch %d: participants dead %s, failed %s; planning again",
                        view.epoch, list(action.dead), list(action.failed))
        kind = action.kind
        if kind in (Kind.BOOTSTRAP, Kind.PUBLISH):
            return self._send(action, planned_s, view.epoch_revision)
        if kind is Kind.COMMIT:
            assert action.record is not None
            self.commit(action.record, view.acks, dict(action.phases), view.epoch_revision)
        elif kind is Kind.ACK_TIMEOUT:
            self.revoke(action)
        elif kind is Kind.TOO_FEW_RANKS and action.report:
            log.error("epoch %d: %s", action.epoch, action.reason)
        return action.memory

    def _send(self, action: Action, planned_s: float, epoch_revision: int) -> Memory:
        """Publish the action's plan; observe its detect and plan phases."""
        rec = action.record
        assert rec is not None
        self.publish(rec, epoch_revision)
        plan_s = None if action.kind is Kind.BOOTSTRAP else planned_s
        memory = action.memory.plan_sent(rec.epoch, time.monotonic(), plan_s)
        for phase, seconds in memory.phases.get(rec.epoch, {}).items():
            self.metrics.phase.labels(phase=phase).observe(seconds)
        return memory

    def _pause(self, kind: Kind) -> float:
        """Seconds to wait for a watch event before the next pass: a settle window is
        looked at a few times per window, so that it closes on time."""
        if kind is Kind.SETTLING:
            return min(self.cfg.resync_s, self.cfg.settle_s / 4, max(self.cfg.confirm_settle_s, 0.01))
        return self.cfg.resync_s

    # -- the loop --------------------------------------------------------------------
    def _pass(self) -> Kind | None:
        """Connect if needed, campaign, and while leading reconcile once: the kind of
        action taken, None as a standby."""
        election = self._connected()
        if not election.is_leader():
            self.metrics.leader.set(0)
            if not election.campaign():
                # A standby that reaches etcd is healthy: /healthz must not report it
                # stale, or its liveness probe restarts it forever.
                self.metrics.beat()
                return None
            self.metrics.leader.set(1)
        action = self.step()
        log.debug("step: %s", action)
        return action.kind

    def run(self, stop: threading.Event | None = None) -> None:
        """Lead or stand by until ``stop``. A failed pass never ends the loop: etcd
        away, a refused write, a plan that cannot be built, any bug of one pass."""
        stop = stop or self._stop
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            try:
                kind = self._pass()
                backoff = BACKOFF_MIN_S
                if kind is None:
                    stop.wait(self.cfg.resync_s)
                else:
                    self._wake.wait(self._pause(kind))
                    self._wake.clear()
                continue
            except EpochMovedError as e:
                log.info("%s", e)  # a fresh read decides again at once
                continue
            except NotLeaderError as e:
                log.warning("%s", e)
                continue
            except RecordTooLargeError as e:
                # Etcd is up and refused the size: a fast retry cannot help, so wait the
                # resync (the record may shrink, or the limit be raised) and log each size once.
                if self.metrics.record_too_large(e.operation, e.what, e.size):
                    log.error("epoch %d: %s", self._epoch, e)
                stop.wait(self.cfg.resync_s)
                continue
            except EtcdUnavailableError as e:
                self.metrics.etcd_errors.inc()
                log.warning("epoch %d: etcd unavailable, retrying in %.1f s: %s", self._epoch, backoff, e)
            except ElasticEPError as e:
                # A plan that cannot be built now must not kill the controller.
                self.metrics.pass_errors.inc()
                log.error("epoch %d: reconcile failed, retrying in %.1f s: %s", self._epoch, backoff, e)
            except Exception:  # last resort: the loop must outlive any one bad pass
                self.metrics.pass_errors.inc()
                log.exception("epoch %d: reconcile pass crashed; retrying in %.1f s", self._epoch, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        self._resign()

    def _resign(self) -> None:
        if self.election is None:
            return
        try:
            self.election.resign()
        except Exception as e:  # leaving anyway: the lease expires
            log.warning("controller %s: resign failed: %s", self.cfg.id, e)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
