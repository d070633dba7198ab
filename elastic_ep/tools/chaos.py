"""Chaos schedules over real processes: a local etcd, controller processes and rank
agents, hit by seeded random faults, with every invariant of docs/DESIGN.md checked
after each step. Used by ``tests/chaos`` (a short set) and ``bench/soak.py``.

Faults: SIGKILL of one or several ranks, of every holder of some logical expert
(forcing disk), of a rank while a plan is being executed, of the leader controller; an
etcd restart; a rank joining right after a failure; a second failure before the first
recovery committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from controller.etcd_client import EtcdConfig, connect
from controller.records import PlanRecord, member_id
from controller.view import ClusterView, read_view
from elastic_ep.errors import ElasticEPError
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.invariants import InvariantError, check_commit, require
from elastic_ep.tools.polling import wait_for
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

__all__ = ["FAULTS", "ChaosCluster", "InvariantError", "StepResult", "random_schedule"]

FAULTS = ("kill_one", "kill_two", "kill_holders", "kill_in_transfer", "kill_leader", "restart_etcd",
          "join_after_failure", "double_failure")


@dataclass
class StepResult:
    fault: str
    detail: str
    seconds: float
    epoch: int
    disk_fallback: bool = False


@dataclass
class ChaosCluster:
    """``with ChaosCluster(workdir, seed) as c: c.step("kill_one")``."""

    workdir: str
    seed: int = 0
    ranks: int = 5
    slots: int = 4
    spec: SyntheticSpec = field(default_factory=lambda: SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32,
                                                                      dtype="bf16", shards=2, seed=11))
    controllers: int = 2
    lease_ttl: int = 2
    recover_timeout_s: float = 90.0
    log: Callable[[str], None] = print
    agent_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.next_rank = 0
        self.kills = 0
        self.results: list[StepResult] = []

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "ChaosCluster":
        self.ckpt = os.path.join(self.workdir, "ckpt")
        make_checkpoint(self.ckpt, self.spec)
        self.etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd")).start()
        self.cfg = EtcdConfig(self.etcd.endpoint, deployment="chaos", timeout_s=2.0)
        try:
            for i in range(self.controllers):
                self._controller(f"ctl-{i}")
            for _ in range(self.ranks):
                self.add_rank()
            self._wait(lambda: self._stable(self.ranks), self.recover_timeout_s, "the first placement")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)
        self.etcd.stop()

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        cmd = [sys.executable, "-m", "elastic_ep.tools.cli", *args, "--etcd", self.etcd.endpoint, "--deployment", "chaos"]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _controller(self, cid: str) -> None:
        s = self.spec
        self._spawn(cid, ["controller", "--id", cid, "--layers", str(s.layers), "--experts", str(s.experts),
                          "--slots", str(self.slots), "--expert-bytes", str(s.expert_bytes), "--min-ranks",
                          str(self.ranks), "--settle", "0.3", "--leader-ttl", "2", "--metrics-port", "-1"])

    def add_rank(self) -> str:
        s, rid = self.spec, f"r{self.next_rank}"
        self.next_rank += 1
        self._spawn(rid, ["agent", "--id", rid, "--ckpt", self.ckpt, "--layers", str(s.layers), "--experts",
                          str(s.experts), "--hidden", str(s.hidden), "--intermediate", str(s.intermediate),
                          "--seed", str(s.seed), "--slots", str(self.slots), "--lease-ttl", str(self.lease_ttl),
                          *self.agent_args])
        return rid

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            self.kills += name.startswith("r")
        p.wait(10)

    def logs(self, tail: int = 2000) -> str:
        out = []
        for name in self.procs:
            path = os.path.join(self.workdir, f"{name}.log")
            with open(path, "rb") as f:
                out.append(f"--- {name}\n{f.read()[-tail:].decode(errors='replace')}")
        return "\n".join(out)

    # -- reading ---------------------------------------------------------------------
    def _client(self) -> Any:
        return connect(self.cfg)

    def read(self) -> ClusterView:
        return read_view(self._client(), self.cfg.root)

    def live_ranks(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("r") and p.poll() is None]

    def live_controllers(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("ctl") and p.poll() is None]

    def _stable(self, expect: int | None = None) -> ClusterView | None:
        """The state once the newest plan is committed and names exactly the live ranks."""
        try:
            v = self.read()
        except ElasticEPError:
            return None
        c = v.committed
        if c is None or c.epoch != v.epoch:
            return None
        members = sorted(member_id(m) for m in c.members)
        if members != sorted(self.live_ranks()) or (expect is not None and len(members) != expect):
            return None
        if any(r.state != "active" for r in v.ranks.values()):
            return None
        return v

    def _wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        v = wait_for(pred, timeout, 0.05)
        if not v:
            raise InvariantError(f"{what} not reached within {timeout:.0f} s (seed {self.seed})")
        return v

    # -- faults ------------------------------------------------------------------------
    def _capacity_left(self, n_dead: int) -> bool:
        return (len(self.live_ranks()) - n_dead) * self.slots >= self.spec.experts

    def _wait_plan_after(self, epoch: int) -> PlanRecord:
        return self._wait(lambda: (p := self.read().plan) is not None and p.epoch > epoch and p,
                          self.recover_timeout_s, f"a plan after epoch {epoch}")

    def step(self, fault: str) -> StepResult:
        before = self.read()
        c0 = before.committed
        assert c0 is not None  # a step starts from a stable, committed state
        members = [member_id(m) for m in c0.members]
        t0 = time.monotonic()
        detail = ""
        if fault == "kill_one" or (fault == "kill_two" and not self._capacity_left(2)):
            victims = [members[int(self.rng.integers(len(members)))]]
        elif fault == "kill_two":
            victims = [members[i] for i in self.rng.choice(len(members), 2, replace=False)]
        elif fault == "kill_holders":
            # Every holder of the expert with the fewest replicas: it must come from disk.
            cnt = c0.placement.logcnt[0]
            e = int(np.argmin(cnt))
            holders = sorted({c0.placement.log2phy[0, e, k] // self.slots for k in range(cnt[e])})
            victims = [members[h] for h in holders]
            if not self._capacity_left(len(victims)):
                victims = victims[:1]
            detail = f"expert {e} of layer 0 held only by {victims}"
        elif fault == "kill_leader":
            victims = [before.leader] if before.leader in self.live_controllers() else []
        else:
            victims = []
        if fault in ("kill_one", "kill_two", "kill_holders", "kill_leader"):
            for v in victims:
                self.kill(v)
            detail = detail or f"killed {victims}"
        elif fault == "kill_in_transfer":
            first = members[int(self.rng.integers(len(members)))]
            self.kill(first)
            p = self._wait_plan_after(c0.epoch)
            parts = [member_id(m) for m in p.participants() if member_id(m) in self.live_ranks()]
            if parts and self._capacity_left(1):
                second = parts[int(self.rng.integers(len(parts)))]
                self.kill(second)
                victims = [first, second]
            else:
                victims = [first]
            detail = f"killed {victims[0]}, then {victims[1:] or 'nobody'} while epoch {p.epoch} executed"
        elif fault == "double_failure":
            first = members[int(self.rng.integers(len(members)))]
            self.kill(first)
            self._wait(lambda: first not in self.read().ranks, 30, f"{first} to expire")
            rest = [m for m in members if m != first and m in self.live_ranks()]
            if rest and self._capacity_left(1):
                self.kill(rest[int(self.rng.integers(len(rest)))])
            detail = f"second kill before epoch {c0.epoch + 1} committed"
        elif fault == "restart_etcd":
            self.etcd.stop()
            time.sleep(self.lease_ttl + 1.0)
            self.etcd.start()
            detail = "etcd down for TTL + 1 s"
        elif fault == "join_after_failure":
            victim = members[int(self.rng.integers(len(members)))]
            self.kill(victim)
            rid = self.add_rank()
            detail = f"killed {victim}, started {rid}"
        if not self.live_controllers():
            self._controller(f"ctl-{len([n for n in self.procs if n.startswith('ctl')])}")
        # Keep enough ranks to hold every expert.
        while len(self.live_ranks()) * self.slots < self.spec.experts + self.slots:
            self.add_rank()
        s = self._wait(self._stable, self.recover_timeout_s, f"recovery after {fault}")
        if fault == "restart_etcd" and s.committed.epoch != c0.epoch:
            raise InvariantError(f"etcd restart changed the epoch {c0.epoch} -> {s.committed.epoch}: "
                                 "a rank was declared dead because etcd was away")
        res = StepResult(fault, detail, time.monotonic() - t0, s.committed.epoch)
        self.check(s, res)
        self.results.append(res)
        self.log(f"[seed {self.seed}] {fault}: {detail}; stable at epoch {res.epoch} after {res.seconds:.2f} s")
        return res

    # -- invariants --------------------------------------------------------------------
    def check(self, v: ClusterView, res: StepResult) -> None:
        """Fail the schedule on the first broken invariant; count disk reads that no plan
        asked for (a source died mid-transfer) as fallbacks."""
        require(check_commit(v))
        p = v.plan
        if p is not None and p.plan is not None and not any(p.plan.missing):
            res.disk_fallback = any(a.bytes.get("disk", 0) for a in v.acks.values())


def random_schedule(rng: np.random.Generator, steps: int) -> list[str]:
    return [FAULTS[int(i)] for i in rng.integers(0, len(FAULTS), steps)]
