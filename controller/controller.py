"""The controller: one leader among replicas turns membership changes into fenced,
acknowledged, committed plans.

Each pass of the leader's loop reads the deployment's keys (a level-triggered
reconcile, woken by a watch and by a periodic resync), asks
:func:`controller.decide.decide` what to do, and does it: at most one fenced write
(a bootstrap plan, the next plan, or a commit), then metrics, logs, and a wait that
depends on the kind of action. What is decided, and why, is in
:mod:`controller.decide`; this module is the I/O around it.

Publishing and committing are transactions that succeed only while this controller
holds the leader key and the epoch is still the one it read: a deposed leader's
writes are refused (:class:`NotLeaderError`) and it steps down.

Failure contract: everything durable is in etcd. A controller that takes over reads the
plan in flight and its acks and carries on; it loses only timings (the detect and plan
phases of a plan it did not send, and the ack deadline, which restarts at takeover).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from elastic_ep.errors import ElasticEPError, EtcdUnavailableError, MalformedValueError, NotLeaderError
from elastic_ep.core.policy import get_policy

from controller.decide import Action, DecideConfig, Kind, Memory, ModelShape, decide
from controller.election import LeaderElection
from controller.etcd_client import EtcdConfig, call, connect
from controller.metrics import ControllerMetrics
from controller.records import AckRecord, CommitRecord, PlanRecord
from controller.view import ClusterView, read_view

__all__ = ["Controller", "ControllerConfig", "ModelShape"]

log = logging.getLogger(__name__)


@dataclass
class ControllerConfig:
    """A controller replica's settings. Example: ``ControllerConfig(EtcdConfig("10.0.0.2:2379"),
    ModelShape(58, 256, 9, 88_080_384), id="ctl-a", min_ranks=32, settle_s=1.0)``."""

    etcd: EtcdConfig
    model: ModelShape
    id: str = "controller-0"
    min_ranks: int = 1
    policy: str = "min_migration"
    policy_options: dict[str, Any] = field(default_factory=dict)
    settle_s: float = 1.0
    leader_ttl_s: int = 3
    ack_timeout_s: float = 300.0
    resync_s: float = 0.5
    imbalance_threshold: float = 0.0
    """Rebalance when mean/max rank load falls below this (0 disables)."""
    rebalance_cooldown_s: float = 60.0

    def decide_config(self) -> DecideConfig:
        """The part of this configuration that decisions depend on."""
        return DecideConfig(
            self.model, leader=self.id, min_ranks=self.min_ranks, settle_s=self.settle_s,
            ack_timeout_s=self.ack_timeout_s, imbalance_threshold=self.imbalance_threshold,
            rebalance_cooldown_s=self.rebalance_cooldown_s, policy=get_policy(self.policy, **self.policy_options),
        )


class Controller:
    """``Controller(cfg).run(stop)`` campaigns for leadership and, while it leads,
    reconciles; ``client`` (an ``etcd3`` client) and ``metrics`` may be given."""

    def __init__(self, cfg: ControllerConfig, client: Any = None, metrics: ControllerMetrics | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else connect(cfg.etcd)
        self.root = cfg.etcd.root
        self.election = LeaderElection(self.client, f"{self.root}/leader", cfg.id, cfg.leader_ttl_s)
        self.metrics = metrics or ControllerMetrics()
        self._rules = cfg.decide_config()
        self.policy = self._rules.policy
        self._memory = Memory(last_rebalance=time.monotonic())
        self._epoch = 0  # the newest epoch the last pass read, for log lines
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reported_malformed: set[str] = set()
        self._watch_id: Any = None

    # -- reading ---------------------------------------------------------------------
    def view(self) -> ClusterView:
        """The deployment's keys, read at one revision (malformed values reported once)."""
        return read_view(self.client, self.root, self._report_malformed)

    def _report_malformed(self, key: str, e: MalformedValueError) -> None:
        if key not in self._reported_malformed:
            self._reported_malformed.add(key)
            self.metrics.malformed.inc()
            log.error("ignoring malformed value: %s", e)

    # -- fenced writes ---------------------------------------------------------------
    def _fenced(self, expect_epoch: int, ops: list[Any], what: str) -> None:
        tx = self.client.transactions
        epoch_key = f"{self.root}/epoch"
        cmp = [tx.value(f"{self.root}/leader") == self.cfg.id]
        cmp.append(tx.version(epoch_key) == 0 if expect_epoch == 0 else tx.value(epoch_key) == str(expect_epoch))
        ok, _ = call(self.client.transaction, what, compare=cmp, success=ops, failure=[])
        if not ok:
            self.election.step_down()
            self.metrics.fenced.inc()
            raise NotLeaderError(
                f"{what} refused: {self.cfg.id} no longer holds {self.root}/leader or the epoch moved past {expect_epoch}"
            )

    def publish(self, rec: PlanRecord, expect_epoch: int) -> None:
        """Write plan ``rec`` (epoch ``expect_epoch + 1``) iff this controller leads and the
        epoch is still ``expect_epoch``."""
        tx = self.client.transactions
        self._fenced(expect_epoch, [tx.put(f"{self.root}/epoch", str(rec.epoch)),
                                    tx.put(f"{self.root}/plan", rec.to_json())], f"publish plan epoch {rec.epoch}")
        self.metrics.epoch.set(rec.epoch)
        log.info("published plan epoch %d (%s): %d -> %d ranks", rec.epoch, rec.reason, len(rec.old_members), len(rec.new_members))

    def commit(self, rec: PlanRecord, acks: dict[str, AckRecord], phases: dict[str, float]) -> CommitRecord:
        """Write the commit record of plan ``rec`` (bytes summed over ``acks``, seconds by
        phase) iff this controller leads and the epoch is still ``rec.epoch``."""
        total: dict[str, int] = {}
        for a in acks.values():
            for k, v in a.bytes.items():
                total[k] = total.get(k, 0) + int(v)
        c = CommitRecord(rec.epoch, rec.new_members, rec.placement, phases, total)
        tx = self.client.transactions
        t0 = time.monotonic()
        self._fenced(rec.epoch, [tx.put(f"{self.root}/committed", c.to_json())], f"commit epoch {rec.epoch}")
        # The epoch's scratch keys are no longer needed.
        call(self.client.delete_prefix, "clean store", f"{self.root}/store/")
        for route, n in total.items():
            self.metrics.bytes.labels(route=route).inc(n)
        # detect and plan were observed when the plan went out.
        for ph, s in (("transfer", phases.get("transfer", 0.0)), ("commit", time.monotonic() - t0)):
            self.metrics.phase.labels(phase=ph).observe(s)
        log.info("committed epoch %d: %d ranks, bytes %s, phases %s", rec.epoch, len(rec.new_members), total,
                 {k: round(v, 3) for k, v in phases.items()})
        return c

    # -- acting ----------------------------------------------------------------------
    def step(self) -> Action:
        """One reconcile pass as leader: read, decide, act. Returns the action taken."""
        view = self.view()
        self._epoch = view.epoch
        self.metrics.members(view.ranks.values())
        now = time.monotonic()
        action = decide(view, self._memory, self._rules, now)
        planned_s = time.monotonic() - now
        # The memory moves on only once the action's writes succeeded: after a refused
        # write the next pass decides again from what it remembered.
        self._memory = self._perform(action, view, planned_s)
        return action

    def _perform(self, action: Action, view: ClusterView, planned_s: float) -> Memory:
        """Carry ``action`` out; the memory for the next pass."""
        if action.dead or action.failed:
            self.metrics.failures.inc(len(action.dead))
            log.warning("epoch %d: participants dead %s, failed %s; planning again",
                        view.epoch, list(action.dead), list(action.failed))
        kind = action.kind
        if kind in (Kind.BOOTSTRAP, Kind.PUBLISH):
            return self._send(action, planned_s)
        if kind is Kind.COMMIT:
            assert action.record is not None
            self.commit(action.record, view.acks, dict(action.phases))
        elif kind is Kind.ACK_TIMEOUT:
            log.error("epoch %d: no ack from %s within %.0f s", action.epoch, sorted(action.ranks),
                      self.cfg.ack_timeout_s)
        elif kind is Kind.TOO_FEW_RANKS and action.report:
            log.error("epoch %d: %s", action.epoch, action.reason)
        return action.memory

    def _send(self, action: Action, planned_s: float) -> Memory:
        """Publish the action's plan; observe its detect and plan phases."""
        rec = action.record
        assert rec is not None
        self.publish(rec, rec.epoch - 1)
        plan_s = None if action.kind is Kind.BOOTSTRAP else planned_s
        memory = action.memory.plan_sent(rec.epoch, time.monotonic(), plan_s)
        for phase, seconds in memory.phases.get(rec.epoch, {}).items():
            self.metrics.phase.labels(phase=phase).observe(seconds)
        return memory

    def _pause(self, kind: Kind) -> float:
        """Seconds to wait for a watch event before the next pass: a settle window is
        looked at a few times per window, so that it closes on time."""
        if kind is Kind.SETTLING:
            return min(self.cfg.resync_s, self.cfg.settle_s / 4)
        return self.cfg.resync_s

    # -- the loop --------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            self._watch_id = self.client.add_watch_prefix_callback(self.root + "/", lambda _ev: self._wake.set())
        except Exception as e:  # the periodic resync still runs
            log.warning("watch on %s failed (%s); relying on periodic resync", self.root, e)
            self._watch_id = None

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self._stop
        self._watch()
        backoff = 0.2
        while not stop.is_set():
            try:
                if not self.election.is_leader():
                    self.metrics.leader.set(0)
                    if not self.election.campaign():
                        # A standby that reaches etcd is healthy: /healthz must not
                        # report it stale, or its liveness probe restarts it forever.
                        self.metrics.beat()
                        stop.wait(self.cfg.resync_s)
                        continue
                    self.metrics.leader.set(1)
                action = self.step()
                log.debug("step: %s", action)
                backoff = 0.2
                self._wake.wait(self._pause(action.kind))
                self._wake.clear()
            except NotLeaderError as e:
                log.warning("%s", e)
            except EtcdUnavailableError as e:
                self.metrics.etcd_errors.inc()
                log.warning("etcd unavailable, waiting it out: %s", e)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                if self._watch_id is None:
                    self._watch()
            except ElasticEPError as e:
                # A plan that cannot be built now (too few ranks, bad load) must not
                # kill the controller: report it and try again on the next change.
                log.error("reconcile failed (epoch %d): %s", self._epoch, e)
                stop.wait(self.cfg.resync_s)
            except Exception:  # last resort: the loop must outlive any one bad pass
                log.exception("reconcile pass crashed (epoch %d); trying again", self._epoch)
                stop.wait(self.cfg.resync_s)
        self.election.resign()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
