"""The controller: one leader among replicas turns membership changes into fenced,
acknowledged, committed plans.

Each pass of the leader's loop reads the deployment's keys (a level-triggered
reconcile, woken by a watch and by a periodic resync) and does at most one step:

- no base placement yet: once ``min_ranks`` ranks registered and stayed put for the
  settle window, publish a *bootstrap* plan (every rank loads its slots from disk);
- a plan in flight: wait for every live participant's ack; then commit, or, if a
  participant died, publish the next plan built from what completed;
- members gone (lease expired), draining or joining: after the settle window, build
  the rank mapping, the new placement (the configured policy, on the ranks' published
  load) and the transfer plan, and publish it with epoch ``e+1``;
- load imbalance past a threshold: the same with no membership change.

Publishing and committing are transactions that succeed only while this controller
holds the leader key and the epoch is still the one it read: a deposed leader's
writes are refused (:class:`NotLeaderError`) and it steps down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from elastic_ep.errors import ElasticEPError, EtcdUnavailableError, MalformedValueError, NotLeaderError
from elastic_ep.core.placement import ExpertPlacement, balance, initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping

from controller.election import LeaderElection
from controller.etcd_client import EtcdConfig, call, connect
from controller.metrics import ControllerMetrics
from controller.records import AckRecord, CommitRecord, PlanRecord, member_id
from controller.view import ClusterView, read_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What placement needs of the model: ``ModelShape(58, 256, 9, 88_080_384)``."""

    num_layers: int
    num_logical: int
    slots_per_rank: int
    expert_bytes: int


@dataclass
class ControllerConfig:
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


class Controller:
    def __init__(self, cfg: ControllerConfig, client: Any = None, metrics: ControllerMetrics | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else connect(cfg.etcd)
        self.root = cfg.etcd.root
        self.election = LeaderElection(self.client, f"{self.root}/leader", cfg.id, cfg.leader_ttl_s)
        self.metrics = metrics or ControllerMetrics()
        self.policy = get_policy(cfg.policy, **cfg.policy_options)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seen_change: tuple[Any, float] | None = None  # (membership signature, since)
        self._last_rebalance = time.monotonic()
        self._detected_at: float | None = None
        self._transfer_started: dict[int, float] = {}  # epoch -> when its plan went out
        self._phases: dict[int, dict[str, float]] = {}  # epoch -> detect and plan seconds
        self._reported_malformed: set[str] = set()
        self._watch_id: Any = None

    # -- reading ---------------------------------------------------------------------
    def view(self) -> ClusterView:
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

    # -- deciding --------------------------------------------------------------------
    def _load(self, view: ClusterView, shape: tuple[int, int]) -> np.ndarray:
        total = np.zeros(shape)
        for ld in view.loads.values():
            arr = np.asarray(ld.load, dtype=np.float64)
            if arr.shape == shape:
                total += arr
        return total if total.sum() > 0 else np.ones(shape)

    def _base(self, view: ClusterView) -> tuple[int, list[str], ExpertPlacement] | None:
        """(epoch, members, placement) the ranks hold now: the committed state, or an
        uncommitted plan every live participant finished."""
        p, c = view.plan, view.committed
        if p is not None and (c is None or p.epoch > c.epoch):
            live = [m for m in p.participants() if view.is_live(m)]
            if all(view.acks.get(m) is not None and view.acks[m].ok for m in live):
                return p.epoch, p.new_members, p.placement
            return None
        return None if c is None else (c.epoch, c.members, c.placement)

    def step(self) -> str:
        """One reconcile pass as leader. Returns what it did (for logs and tests)."""
        view = self.view()
        ms = self.cfg.model
        now = time.monotonic()
        self.metrics.members(view.ranks.values())
        p, c = view.plan, view.committed
        in_flight = p is not None and (c is None or p.epoch > c.epoch)
        if in_flight:
            assert p is not None
            live = [m for m in p.participants() if view.is_live(m)]
            done = [m for m in live if m in view.acks]
            failed = [m for m in done if not view.acks[m].ok]
            dead = [m for m in p.participants() if m not in live]
            if len(done) < len(live):
                started = self._transfer_started.setdefault(p.epoch, now)
                if now - started > self.cfg.ack_timeout_s:
                    log.error("epoch %d: no ack from %s within %.0f s", p.epoch, sorted(set(live) - set(done)), self.cfg.ack_timeout_s)
                return "waiting for acks"
            if failed or dead:
                self.metrics.failures.inc(len(dead))
                log.warning("epoch %d: participants dead %s, failed %s; planning again", p.epoch, dead, failed)
                # Fall through: the base is this plan's placement (live ones finished).
            else:
                phases = self._phases.pop(p.epoch, {})
                phases["transfer"] = now - self._transfer_started.pop(p.epoch, now)
                self.commit(p, view.acks, phases)
                self._last_rebalance = now
                return f"committed {p.epoch}"
        base = self._base(view)
        active = {r.id: r for r in view.ranks.values()}
        if base is None:
            if in_flight:
                return "waiting"  # some live participant failed its plan: it re-registers
            ready = sorted(rid for rid, r in active.items() if r.state != "draining")
            if len(ready) < self.cfg.min_ranks or not self._settled(("boot", tuple(ready)), now):
                return f"bootstrap: {len(ready)}/{self.cfg.min_ranks} ranks"
            members = [active[r].token for r in ready]
            placement = initial_placement(ms.num_layers, ms.num_logical, len(members), ms.slots_per_rank)
            if len(members) > 1:
                placement = get_policy("deepseek").rebalance(placement, RankMapping.build(len(members)),
                                                            self._load(view, (ms.num_layers, ms.num_logical)))
            rec = PlanRecord(view.epoch + 1, self.cfg.id, [], members, None, placement, "bootstrap")
            self.publish(rec, view.epoch)
            self._transfer_started[rec.epoch] = time.monotonic()
            return f"published bootstrap {rec.epoch}"
        _, members, placement = base
        tokens = {m: member_id(m) for m in members}
        dead = [i for i, m in enumerate(members) if not view.is_live(m)]
        leaving = [i for i, m in enumerate(members) if i not in dead and active[tokens[m]].state == "draining"]
        # A rank that re-registered has a new incarnation: its old member is dead.
        joining = sorted(r.id for r in active.values() if r.state == "joining" and r.token not in members)
        changed = bool(dead or leaving or joining)
        load = self._load(view, (ms.num_layers, ms.num_logical))
        reason = ""
        if changed:
            if self._detected_at is None:
                self._detected_at = now
            if not self._settled(("change", tuple(dead), tuple(leaving), tuple(joining)), now) and not in_flight:
                return "settling"
            reason = f"dead {[members[i] for i in dead]} leaving {[members[i] for i in leaving]} joining {joining}"
        elif in_flight:
            return "waiting"
        elif (self.cfg.imbalance_threshold > 0 and now - self._last_rebalance > self.cfg.rebalance_cooldown_s
              and (b := balance(placement, load)) < self.cfg.imbalance_threshold):
            reason = f"load imbalance {b:.3f} < {self.cfg.imbalance_threshold}"
        else:
            self._seen_change = None
            return "steady"
        t0 = time.monotonic()
        mapping = RankMapping.build(len(members), dead=dead, leaving=leaving, num_joining=len(joining))
        if mapping.new_ep_size * ms.slots_per_rank < ms.num_logical:
            if self._seen_change is not None and self._seen_change[0] != ("too few", mapping.new_ep_size):
                log.error("%d ranks x %d slots cannot hold %d experts; waiting for ranks to join",
                          mapping.new_ep_size, ms.slots_per_rank, ms.num_logical)
            self._seen_change = (("too few", mapping.new_ep_size), now)
            return "too few ranks"
        new = self.policy.rebalance(placement, mapping, load)
        plan = build_plan(placement, new, mapping, ms.expert_bytes, epoch=view.epoch + 1,
                          nodes=[active[tokens[m]].node if tokens[m] in active else "" for m in members]
                          + [active[r].node for r in joining])
        if not changed and not plan.transfers:
            self._last_rebalance = now  # the policy keeps the placement: nothing to move
            return "balanced as well as the policy can"
        new_members = [members[o] for o in mapping.new_to_old()[: mapping.num_surviving]] + [active[r].token for r in joining]
        rec = PlanRecord(view.epoch + 1, self.cfg.id, list(members), new_members, plan, new, reason)
        t_plan = time.monotonic() - t0
        self.publish(rec, view.epoch)
        detect = (now - self._detected_at) if self._detected_at is not None else 0.0
        self._phases[rec.epoch] = {"detect": detect, "plan": t_plan}
        for ph in ("detect", "plan"):
            self.metrics.phase.labels(phase=ph).observe(self._phases[rec.epoch][ph])
        self._transfer_started[rec.epoch] = time.monotonic()
        self._detected_at = None
        self._seen_change = None
        return f"published {rec.epoch}"

    def _settled(self, signature: Any, now: float) -> bool:
        """True once the same change has been seen for ``settle_s`` (batches failures)."""
        if self._seen_change is None or self._seen_change[0] != signature:
            self._seen_change = (signature, now)
            return self.cfg.settle_s <= 0
        return now - self._seen_change[1] >= self.cfg.settle_s

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
                what = self.step()
                log.debug("step: %s", what)
                backoff = 0.2
                self._wake.wait(self.cfg.resync_s if what not in ("settling",) else min(self.cfg.resync_s, self.cfg.settle_s / 4))
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
                log.error("reconcile failed: %s", e)
                stop.wait(self.cfg.resync_s)
        self.election.resign()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
