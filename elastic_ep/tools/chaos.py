"""Chaos schedules over real processes: a local etcd, controller processes and rank
agents, hit by seeded random faults, with every invariant of docs/DESIGN.md checked
after each step. Used by ``tests/chaos`` (a short set) and ``bench/soak.py``.

Faults (:data:`FAULTS`): SIGKILL of one or two ranks, of every holder of some logical
expert (forcing disk reads), of a rank while a plan is being executed, of the leader
controller; an etcd restart; a rank joining right after a failure; a second failure
before the first recovery committed; hostile values written where a rank may write,
then a kill. False suspicion, tested rather than assumed: a rank stopped (SIGSTOP) for
less than the stall tolerance and resumed is not removed; one stopped longer is removed
while stopped and, resumed, serves nothing until it is a member again under a new
incarnation; one rank whose link to a healthy peer is cut (its heartbeats dropped) does
not evict it; a whole node gone silent, every watcher of one of its ranks with it, still
loses that rank to its lease. Every rank keeps a host-memory mirror (``mirror_rows``):
a whole labeled node SIGKILLed once the mirrors are filled reads from disk exactly the
experts the coverage report predicted for it.

A step either does what its name says or says why not: every kill is checked (the
process is gone, killed by SIGKILL), and a step that did less because the ranks left
could not hold every expert otherwise (``kill_two`` with too few ranks) is recorded as
downgraded, with the reason, instead of passing as the fault it is named after. Any
other shortfall fails the schedule.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from controller.coverage import mirrors_filled
from controller.etcd_client import EtcdConfig, connect
from controller.records import AckRecord, LoadRecord, PlanRecord, RankRecord, SuspectRecord, member_id
from controller.view import ClusterView, read_view
from elastic_ep.errors import ElasticEPError, EtcdError
from elastic_ep.runtime.agent import AgentConfig
from elastic_ep.runtime.liveness import monitored_peers
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.invariants import InvariantError, check_commit, require
from elastic_ep.tools.polling import wait_for
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

__all__ = ["FAULTS", "ChaosCluster", "HostileKey", "InvariantError", "StepResult", "hostile_keys", "random_schedule",
           "write_hostile_values"]

FAULTS = ("kill_one", "kill_two", "kill_holders", "kill_in_transfer", "kill_leader", "restart_etcd",
          "join_after_failure", "double_failure", "hostile_values", "stall_short", "stall_long", "cut_link",
          "node_loss", "mirrored_node_loss")

STALL_TOLERANCE_S = AgentConfig.stall_tolerance_s
"""How long a watched peer may be silent before its watchers report it (``elastic-ep
agent`` runs the agents' default; a crash is reported at once)."""
SHORT_STALL = 0.3
"""``stall_short`` stops a rank for this fraction of the stall tolerance."""
LOAD_PERIOD_S = AgentConfig.load_period_s
"""How often a serving rank publishes its load window (with its served counters)."""
SERVE_STEP_TOKENS = 64
"""Tokens per step of a synthetic rank's request stream: the served counter's largest jump."""
FENCED_SERVE_S = 0.2
"""``stall_long``: the serving a resumed rank's counters may show between its last load
window before the stop and its first as a new member, in seconds at its rate before."""
CUT_OBSERVE_S = 3.0
"""How long ``cut_link`` watches a lone report stand (the controller probes its target
at most once a second)."""
NODE_RANKS = 3
"""Ranks of the node ``node_loss`` loses: a joiner's two ring watchers are the two ranks
that joined just before it, so the last of three joining together is watched by its
node only."""
NODE_LEASE_TTL_S = 1
"""The lease of that node's ranks (see :meth:`ChaosCluster._node_loss`)."""

ETCD_MAX_REQUEST_BYTES = 1_572_864
"""etcd's default ``--max-request-bytes`` (1.5 MiB): the largest value a rank can write."""


@dataclass
class StepResult:
    """What one fault step did and what the recovery cost.

    ``disk_fallback`` (unplanned disk reads: a source died mid-transfer) is kept apart
    from the planned ones: ``disk_experts`` (layer, expert) pairs that had no live
    replica, ``planned_disk_bytes`` their bytes, ``disk_bytes`` what the ranks acked
    reading from disk. ``downgraded`` says why the step did less than its name (empty
    when it did all of it).
    """

    fault: str
    detail: str
    seconds: float
    epoch: int
    disk_fallback: bool = False
    killed: tuple[str, ...] = ()
    downgraded: str = ""
    disk_experts: int = 0
    planned_disk_bytes: int = 0
    disk_bytes: int = 0
    unplanned_disk_bytes: int = 0
    hostile_writes: int = 0


@dataclass
class Injected:
    """A fault as carried out: the processes killed, a line for the log, why it did
    less than its name says (``""`` when it did all of it), the hostile writes made."""

    killed: list[str]
    detail: str
    downgraded: str = ""
    hostile_writes: int = 0
    started: float | None = None
    """``time.monotonic()`` when the fault struck, if not when the step began (hostile
    writes take seconds before the kill that recovery is timed from)."""
    predicted_disk: int | None = None
    """The experts the mirrors' coverage report predicted the recovery reads from disk."""


@dataclass
class _PlanSeen:
    """One plan epoch observed while waiting for a recovery: the (layer, expert) pairs
    it reads from disk, one expert's bytes, and each member's acked disk bytes."""

    missing: int
    expert_bytes: int
    disk: dict[str, int] = field(default_factory=dict)


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
    mirror_rows: int = 16
    """Experts each rank's host-memory mirror holds (0: none)."""

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.next_rank = 0
        self.kills = 0
        self.controller_kills = 0
        self.killed: set[str] = set()
        self.stopped: set[str] = set()
        """Processes held by SIGSTOP: running, but not counted as live ranks."""
        self.nodes_lost = 0
        self.results: list[StepResult] = []
        self._seen: dict[int, _PlanSeen] = {}
        self._base_epoch = 0

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "ChaosCluster":
        self.ckpt = os.path.join(self.workdir, "ckpt")
        make_checkpoint(self.ckpt, self.spec)
        self.etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd"), binary=self._etcd_binary()).start()
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

    def _etcd_binary(self) -> str:
        """etcd with a 50 ms heartbeat and a 500 ms election timeout: its shortest lease
        is then 1 s instead of 2 s (1.5 election timeouts, in whole seconds), so that
        the ranks of the node :meth:`_node_loss` loses may hold 1 s leases. A single
        member elects itself at once; nothing else changes."""
        real = shutil.which("etcd")
        if real is None:
            raise InvariantError("no etcd binary on PATH")
        path = os.path.join(self.workdir, "etcd-1s-leases.sh")
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec {shlex.quote(real)} --heartbeat-interval 50 --election-timeout 500 "$@"\n')
        os.chmod(path, 0o755)
        return path

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

    def _ensure_controller(self) -> None:
        if not self.live_controllers():
            self._controller(f"ctl-{len([n for n in self.procs if n.startswith('ctl')])}")

    def add_rank(self, *extra: str) -> str:
        """Start a rank agent; ``extra``: more flags (a later ``--lease-ttl`` wins)."""
        s, rid = self.spec, f"r{self.next_rank}"
        self.next_rank += 1
        # Half a row more than the rows, so that the GiB figure rounds to whole rows.
        budget = (self.mirror_rows + 0.5) * s.expert_bytes / (1 << 30) if self.mirror_rows else 0.0
        self._spawn(rid, ["agent", "--id", rid, "--ckpt", self.ckpt, "--layers", str(s.layers), "--experts",
                          str(s.experts), "--hidden", str(s.hidden), "--intermediate", str(s.intermediate),
                          "--seed", str(s.seed), "--slots", str(self.slots), "--lease-ttl", str(self.lease_ttl),
                          "--mirror-budget-gib", repr(budget), *self.agent_args, *extra])
        return rid

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` and prove it: it was running, and it is gone,
        reaped with status -SIGKILL. Raises :class:`InvariantError` otherwise (a process
        that exited on its own before the kill is a failure of its own)."""
        p = self.procs[name]
        if p.poll() is not None:
            raise InvariantError(f"{name} (pid {p.pid}) had already exited with {p.returncode} before its kill "
                                 f"(seed {self.seed}); see {name}.log")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        if p.returncode != -signal.SIGKILL:
            raise InvariantError(f"{name} (pid {p.pid}) ended with {p.returncode}, not by the SIGKILL sent")
        self.killed.add(name)
        self.stopped.discard(name)
        if name.startswith("r"):
            self.kills += 1
        else:
            self.controller_kills += 1

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
        """One view of the deployment, read as the controllers read it. A reader that
        raises anything but an etcd error is itself a failure: every controller and
        ``elastic-ep status`` share it."""
        try:
            return read_view(self._client(), self.cfg.root, whole_plan=True, loads=True)
        except ElasticEPError:
            raise
        except Exception as e:
            raise InvariantError(f"reading the deployment raised {type(e).__name__}: {str(e)[:300]}; a value "
                                 f"under {self.cfg.root} breaks the view every controller reads") from e

    def live_ranks(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("r") and p.poll() is None and n not in self.stopped]

    def live_controllers(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("ctl") and p.poll() is None]

    def _unexpected_exits(self) -> dict[str, int]:
        """Processes that ended without being killed here: name -> exit status."""
        return {n: p.returncode for n, p in self.procs.items()
                if n not in self.killed and p.poll() is not None}

    def _stable(self, expect: int | None = None) -> ClusterView | None:
        """The state once the newest plan is committed and names exactly the live ranks;
        on the way, every plan of this step is recorded (its disk reads)."""
        exited = self._unexpected_exits()
        if exited:
            raise InvariantError(f"processes exited on their own: {exited} (seed {self.seed}); see their logs")
        try:
            v = self.read()
        except EtcdError:
            return None
        self._observe(v)
        c = v.committed
        if c is None or c.epoch != v.epoch:
            return None
        members = sorted(member_id(m) for m in c.members)
        if members != sorted(self.live_ranks()) or (expect is not None and len(members) != expect):
            return None
        if any(r.state != "active" for r in v.ranks.values()):
            return None
        return v

    def _observe(self, v: ClusterView) -> None:
        p = v.plan
        if p is None or p.plan is None or p.epoch <= self._base_epoch:
            return
        seen = self._seen.setdefault(p.epoch, _PlanSeen(sum(len(m) for m in p.plan.missing), p.plan.expert_bytes))
        for token, ack in v.acks.items():
            disk = ack.bytes.get("disk", 0)
            seen.disk[token] = disk if type(disk) is int and disk >= 0 else 0

    def _wait(self, pred: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.05) -> Any:
        v = wait_for(pred, timeout, poll_s)
        if not v:
            raise InvariantError(f"{what} not reached within {timeout:.0f} s (seed {self.seed})")
        return v

    def _live_leader(self) -> str | None:
        """The controller the leader key names, if it is one of ours and running."""
        try:
            leader = self.read().leader
        except EtcdError:
            return None
        return leader if leader in self.live_controllers() else None

    # -- faults ------------------------------------------------------------------------
    def _capacity_left(self, n_dead: int) -> bool:
        return (len(self.live_ranks()) - n_dead) * self.slots >= self.spec.experts

    def _pick(self, pool: list[str]) -> str:
        return pool[int(self.rng.integers(len(pool)))]

    def _wait_plan_after(self, epoch: int) -> PlanRecord:
        return self._wait(lambda: (p := self.read().plan) is not None and p.epoch > epoch and p,
                          self.recover_timeout_s, f"a plan after epoch {epoch}")

    def _kill_one(self, c0: Any, members: list[str]) -> Injected:
        victim = self._pick(members)
        self.kill(victim)
        return Injected([victim], f"killed {victim}")

    def _kill_two(self, c0: Any, members: list[str]) -> Injected:
        if not self._capacity_left(2):
            inj = self._kill_one(c0, members)
            inj.downgraded = "kill_two downgraded to one kill: capacity"
            return inj
        victims = [members[i] for i in self.rng.choice(len(members), 2, replace=False)]
        for v in victims:
            self.kill(v)
        return Injected(victims, f"killed {victims}")

    def _kill_holders(self, c0: Any, members: list[str]) -> Injected:
        # Every holder of the expert with the fewest replicas, its mirror's rank with
        # them: it must come from disk.
        cnt = c0.placement.logcnt[0]
        e = int(np.argmin(cnt))
        holders = sorted({members[int(c0.placement.log2phy[0, e, k]) // self.slots] for k in range(cnt[e])}
                         | ({members[int(c0.mirrors.rank[0, e])]} if c0.mirrors is not None
                            and c0.mirrors.rank[0, e] >= 0 else set()))
        victims = holders if self._capacity_left(len(holders)) else holders[:1]
        for v in victims:
            self.kill(v)
        if victims == holders:
            return Injected(victims, f"killed {victims}, every holder of expert {e} of layer 0")
        return Injected(victims, f"killed {victims}, one of holders {holders} of expert {e} of layer 0",
                        "kill_holders downgraded to one holder: capacity")

    def _kill_leader(self, c0: Any, members: list[str]) -> Injected:
        leader = self._wait(self._live_leader, self.recover_timeout_s, "a leader controller to kill")
        self.kill(leader)
        self._ensure_controller()
        successor = self._wait(lambda: (x := self._live_leader()) != leader and x, self.recover_timeout_s,
                               f"a new leader after {leader} was killed")
        return Injected([leader], f"killed leader {leader}; {successor} leads")

    def _kill_in_transfer(self, c0: Any, members: list[str]) -> Injected:
        first = self._pick(members)
        self.kill(first)
        p = self._wait_plan_after(c0.epoch)
        parts = [member_id(m) for m in p.participants() if member_id(m) in self.live_ranks()]
        return self._second_kill("kill_in_transfer", first, parts, p.epoch, f"while epoch {p.epoch} executed")

    def _double_failure(self, c0: Any, members: list[str]) -> Injected:
        first = self._pick(members)
        self.kill(first)
        self._wait(lambda: first not in self.read().ranks, 30, f"{first} to expire")
        rest = [m for m in members if m != first and m in self.live_ranks()]
        return self._second_kill("double_failure", first, rest, c0.epoch + 1, f"before epoch {c0.epoch + 1} committed")

    def _second_kill(self, fault: str, first: str, pool: list[str], epoch: int, when: str) -> Injected:
        """After ``first`` was killed, kill one of ``pool`` before ``epoch`` commits; or
        say why the step stays at one kill (capacity, or the epoch committed first)."""
        if not pool or not self._capacity_left(1):
            return Injected([first], f"killed {first}; no second kill", f"{fault} downgraded to one kill: capacity")
        committed = self.read().committed
        if committed is not None and committed.epoch >= epoch:
            return Injected([first], f"killed {first}; epoch {committed.epoch} committed before a second kill",
                            f"{fault} downgraded to one kill: the plan committed first")
        second = self._pick(pool)
        self.kill(second)
        return Injected([first, second], f"killed {first}, then {second} {when}")

    def _restart_etcd(self, c0: Any, members: list[str]) -> Injected:
        old = self.etcd.proc
        assert old is not None
        self.etcd.stop()
        if old.returncode is None:
            raise InvariantError(f"etcd (pid {old.pid}) still running after its SIGKILL")
        time.sleep(self.lease_ttl + 1.0)
        self.etcd.start()
        return Injected([], f"etcd pid {old.pid} killed, down for TTL + 1 s, restarted as pid {self.etcd.proc.pid}")

    def _join_after_failure(self, c0: Any, members: list[str]) -> Injected:
        victim = self._pick(members)
        self.kill(victim)
        rid = self.add_rank()
        return Injected([victim], f"killed {victim}, started {rid}")

    def _hostile_values(self, c0: Any, members: list[str]) -> Injected:
        victim = self._pick(members)
        survivors = [m for m in c0.members if member_id(m) != victim]
        keys = hostile_keys(self.rng, survivors, c0.epoch, self.spec.layers, self.spec.experts)
        writes = write_hostile_values(self._client(), self.cfg.root, keys)
        started = time.monotonic()
        self.kill(victim)
        return Injected([victim], f"{writes} hostile writes to ranks/, load/ and acks/ keys; then killed {victim}",
                        hostile_writes=writes, started=started)

    # -- stalls, cut links, a lost node ------------------------------------------------
    def _signal(self, name: str, sig: signal.Signals) -> float:
        """SIGSTOP or SIGCONT the running process ``name``; returns when (monotonic). A
        stopped rank is not live: a recovery must go on without it."""
        p = self.procs[name]
        if p.poll() is not None:
            raise InvariantError(f"{name} (pid {p.pid}) had already exited with {p.returncode} before its "
                                 f"{sig.name} (seed {self.seed}); see {name}.log")
        os.kill(p.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(name)
        else:
            self.stopped.discard(name)
        return time.monotonic()

    def _require_kept(self, c0: Any, token: str, what: str) -> None:
        """After ``what``: ``token`` is still the registered member it was at committed
        epoch ``c0.epoch``, no plan came after that epoch, and routing does not go
        around it."""
        v = self.read()
        c, rec = v.committed, v.ranks.get(member_id(token))
        wrong = []
        if c is None or c.epoch != c0.epoch or v.epoch != c0.epoch:
            wrong.append(f"epoch {c0.epoch} became {v.epoch} (committed {c.epoch if c else None})")
        if c is not None and token not in c.members:
            wrong.append(f"the committed members are {c.members}")
        if rec is None or rec.token != token:
            wrong.append(f"its registration is {rec.token if rec else None}")
        if v.routing is not None and token in v.routing.dead:
            wrong.append(f"routing goes around {v.routing.dead}")
        if wrong:
            raise InvariantError(f"{what}, yet {token} was not kept: {'; '.join(wrong)} (seed {self.seed})")

    def _stall_short(self, c0: Any, members: list[str]) -> Injected:
        victim = self._pick(members)
        token = _token(c0.members, victim)
        stopped = self._signal(victim, signal.SIGSTOP)
        time.sleep(SHORT_STALL * STALL_TOLERANCE_S)
        held = self._signal(victim, signal.SIGCONT) - stopped
        if held >= 0.8 * STALL_TOLERANCE_S:  # this machine paused us: the stop was not short
            return Injected([], f"stopped {victim} for {held:.2f} s", f"stall_short downgraded: the stop lasted "
                            f"{held:.2f} s, not well under the {STALL_TOLERANCE_S:g} s stall tolerance")
        # A removal would be under way by now: suspicion after the tolerance, expiry by the TTL.
        time.sleep(self.lease_ttl + STALL_TOLERANCE_S)
        self._require_kept(c0, token, f"{victim} was stopped for {held:.2f} s only")
        return Injected([], f"stopped {victim} for {held:.2f} s (stall tolerance {STALL_TOLERANCE_S:g} s), resumed: "
                            f"still {token} at epoch {c0.epoch}, no plan, {self.lease_ttl + STALL_TOLERANCE_S:g} s "
                            f"later", started=time.monotonic())

    def _stall_long(self, c0: Any, members: list[str]) -> Injected:
        victim = self._pick(members)
        token = _token(c0.members, victim)
        served, rate, seen = self._fresh_load(victim)
        stopped = self._signal(victim, signal.SIGSTOP)
        self._wait(self._stable, self.recover_timeout_s, f"recovery without {victim} while it is stopped")
        away = time.monotonic() - stopped
        # Resumed a load period after its last window, it publishes the next one as soon
        # as it holds slots again: its counters are read right after its refill.
        time.sleep(max(0.0, seen + LOAD_PERIOD_S - time.monotonic()))
        start = self._revision()
        resumed = self._signal(victim, signal.SIGCONT)
        v = self._wait(self._stable, self.recover_timeout_s, f"{victim} a member again after it resumed")
        back = time.monotonic() - resumed
        new = _token(v.committed.members, victim)
        if new == token:
            raise InvariantError(f"{victim}, stopped {away:.2f} s while the deployment went on without it, is a "
                                 f"member again under its old token {token}: it was not fenced (seed {self.seed})")
        first = self._wait(lambda: self._first_load(victim, start, new), LOAD_PERIOD_S + 10,
                           f"the first load window of {new}", 0.2)
        extra = _served(first) - served
        # It may count what it served between its last window and the stop (our poll's
        # lag) and between its refill and its first window (an ack and a put): moments.
        # Serving before it is refilled, through the controller's settle window and the
        # plan, would count for tenths of a second: allow 0.2 s, and a quarter step.
        allowed = rate * FENCED_SERVE_S + SERVE_STEP_TOKENS / 4
        if extra > allowed:
            raise InvariantError(f"{victim} counted {extra} requests served between its last load window before "
                                 f"the stop and its first as {new}, {back:.2f} s after it resumed; at {rate:.0f}/s "
                                 f"at most {allowed:.0f} fit the moments it held slots: it served while fenced "
                                 f"(seed {self.seed})")
        return Injected([], f"stopped {token} {stopped - seen:.3f} s after a load window; the deployment recovered "
                            f"without it in {away:.2f} s; resumed, fenced, a member again as {new} {back:.2f} s "
                            f"later; {extra} requests counted across (<= {allowed:.0f}; serving while fenced: "
                            f"~{rate * back:.0f} at most)", started=stopped)

    def _fresh_load(self, rid: str) -> tuple[int, float, float]:
        """Wait for ``rid``'s next load window: the requests it had served by then, its
        rate over the window before (requests a second) and when the window was seen."""
        key, client = f"{self.cfg.root}/load/{rid}", self._client()

        def read() -> tuple[LoadRecord | None, int]:
            raw, meta = client.get(key)
            try:
                return (LoadRecord.parse(key, raw), meta.mod_revision) if raw is not None else (None, 0)
            except ElasticEPError:  # a hostile value left by an earlier step
                return None, meta.mod_revision

        prev, rev = read()
        while True:
            rec, rev = self._wait(lambda: (r := read())[1] > rev and r, LOAD_PERIOD_S * 2 + 10,
                                  f"a load window from {rid}", 0.01)
            seen = time.monotonic()
            if prev is not None and rec is not None:
                return _served(rec), max(0, _served(rec) - _served(prev)) / max(rec.window_s, 1e-3), seen
            prev = rec

    def _revision(self) -> int:
        """etcd's revision now: a marker key is written (under the root, beside every
        key the deployment reads)."""
        return int(self._client().put(f"{self.cfg.root}/chaos-marker", b"").header.revision)

    def _history(self, start: int, keys: tuple[str, ...]) -> list[Any]:
        """Every put and delete, from revision ``start`` up to now, of the keys under the
        root that start with one of ``keys`` (relative to the root), in order: replayed
        by a watch (nothing compacts this etcd), whole once the marker written now
        comes back through it."""
        from etcd3.utils import prefix_range_end

        root, client = self.cfg.root, self._client()
        end = self._revision()
        events: list[Any] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def on(resp: Any) -> None:
            if isinstance(resp, BaseException):
                errors.append(resp)
                done.set()
                return
            for e in resp.events:
                if e.mod_revision >= end:
                    done.set()
                elif e.key.decode()[len(root) + 1:].startswith(keys):
                    events.append(e)

        top = f"{root}/".encode()
        wid = client.add_watch_callback(top, on, range_end=prefix_range_end(top), start_revision=start)
        try:
            if not done.wait(10) or errors:
                raise InvariantError(f"etcd's history from revision {start} not replayed: {errors or 'no end in 10 s'}")
        finally:
            client.cancel_watch(wid)
            client.close()
        return events

    def _first_load(self, rid: str, start: int, token: str) -> LoadRecord | None:
        """The first load window ``rid`` published from revision ``start`` on (None while
        none): under the lease of its registration as ``token``, and after that
        incarnation's first ok ack (a window is published only while holding slots,
        which only a plan's refill gives a new member)."""
        root = self.cfg.root
        keys = {f"{root}/ranks/{rid}": "ranks", f"{root}/acks/{rid}": "acks", f"{root}/load/{rid}": "load"}
        leases, acked = set(), False
        for e in self._history(start, (f"ranks/{rid}", f"acks/{rid}", f"load/{rid}")):
            key = e.key.decode()
            kind = keys.get(key)
            if type(e).__name__ != "PutEvent" or kind is None:
                continue
            if kind == "ranks" and getattr(_parsed(RankRecord.parse, key, e.value), "token", None) == token:
                leases.add(e.lease)
            elif kind == "acks":
                ack = _parsed(AckRecord.parse, key, e.value)
                acked = acked or (ack is not None and ack.id == token and ack.ok)
            elif kind == "load" and (e.lease not in leases or not acked):
                raise InvariantError(f"{rid} published a load window (lease {e.lease:x}) before it was refilled as "
                                     f"{token} (acked: {acked}): it held slots, and served, while not a member "
                                     f"(seed {self.seed})")
            elif kind == "load":
                return LoadRecord.parse(key, e.value)
        return None

    def _cut_link(self, c0: Any, members: list[str]) -> Injected:
        # The joiner's place in ring order is the controller's to choose: it drops the
        # heartbeats of every member, and whichever it watches is its cut target.
        start = self._revision()
        before = {m: self._probes_answered(m) for m in c0.members}
        reporter = self.add_rank("--drop-heartbeats-from", *(member_id(m) for m in c0.members))
        v = self._wait(self._stable, self.recover_timeout_s, f"{reporter}, which drops every member's heartbeats, to join")
        c1 = v.committed
        mine = _token(c1.members, reporter)
        cut = {member_id(m) for m in c0.members}
        watched = [m for m in monitored_peers(list(c1.members), mine, _nodes(v)) if member_id(m) in cut]
        if not watched:
            raise InvariantError(f"{mine} joined but watches none of {c0.members} (members {c1.members}); the cut "
                                 f"link would cut nothing (seed {self.seed})")
        target, tid = watched[0], member_id(watched[0])
        probes = before.get(target, 0)
        # The report may come before the commit that makes the reporter active: look for
        # it in etcd's history, and for the controller's probe that answered it.
        key = f"suspects/{reporter}/{tid}"
        self._wait(lambda: self._ever_reported(start, key, target), STALL_TOLERANCE_S + 10,
                   f"{reporter}'s report of {target}", 0.25)
        time.sleep(CUT_OBSERVE_S)
        for m in watched:
            self._require_kept(c1, m, f"{reporter} cut its links to {[member_id(w) for w in watched]}")
        probes = self._probes_answered(target) - probes
        if not probes:
            raise InvariantError(f"{reporter} reported {target} silent, but no probe of it by the controller "
                                 f"answered: the controller never judged the report (seed {self.seed})")
        killed = time.monotonic()
        self.kill(reporter)
        return Injected([reporter], f"{reporter} dropped every member's heartbeats and reported {target} silent; the "
                                    f"controller's probe answered {probes} times; {target} kept at epoch {c1.epoch} "
                                    f"for {CUT_OBSERVE_S:g} s; then {reporter} killed", started=killed)

    def _ever_reported(self, start: int, key: str, target: str) -> bool:
        """Whether ``key`` (relative to the root) held a report of ``target`` at some
        revision from ``start`` on."""
        full = f"{self.cfg.root}/{key}"
        return any(type(e).__name__ == "PutEvent" and e.key.decode() == full
                   and getattr(_parsed(SuspectRecord.parse, full, e.value), "target", None) == target
                   for e in self._history(start, (key,)))

    def _probes_answered(self, token: str) -> int:
        """Lines of the controllers' logs saying ``token`` answered a probe."""
        said = f"{token} is suspected, but answered the controller's probe"
        n = 0
        for name in self.procs:
            if name.startswith("ctl"):
                with open(os.path.join(self.workdir, f"{name}.log"), "rb") as f:
                    n += f.read().decode(errors="replace").count(said)
        return n

    def _node_loss(self, c0: Any, members: list[str]) -> Injected:
        """A whole node lost: :data:`NODE_RANKS` ranks join with a new node label; the
        last of them in ring order is watched by its node only (its two ring watchers
        are its node mates, checked with :func:`monitored_peers`). All of them go
        silent at once (SIGSTOP: a lost node closes no connection), so nobody reports
        the last one: its lease must remove it, and the deployment recover.

        The node's leases are :data:`NODE_LEASE_TTL_S`: its mates are confirmed dead by
        their watchers off the node after the stall tolerance; in the plan without them
        the lost rank gets watchers off the node, who would report it a tolerance later
        (2 s after the strike at the earliest); a 1 s lease expires before that (etcd
        checks expiry every 0.5 s), so the removal is the lease's every time. With the
        cluster's 2 s leases it would be a race. (Mates killed, not stopped, would be
        confirmed at once and the lost rank reported 1 s later.) Afterwards the node's
        ranks are killed: the node does not come back."""
        node = f"node-{self.nodes_lost}"
        self.nodes_lost += 1
        ranks = [self.add_rank("--node", node, "--lease-ttl", str(NODE_LEASE_TTL_S)) for _ in range(NODE_RANKS)]
        v = self._wait(self._stable, self.recover_timeout_s, f"node {node} ({ranks}) to join")
        victim, mates = self._unwatched(v, node)
        token = _token(v.committed.members, victim)
        start = self._revision()
        struck = time.monotonic()
        for name in (victim, *mates):
            self._signal(name, signal.SIGSTOP)
        self._wait(lambda: not self._registered(victim), self.recover_timeout_s, f"{victim}'s registration to go")
        gone = time.monotonic() - struck
        self._wait(self._stable, self.recover_timeout_s, f"recovery after node {node} was lost")
        self._require_unreported(start, victim, token)
        for name in (victim, *mates):
            self.kill(name)
        return Injected([victim, *mates], f"node {node} lost: {token} and its only watchers {mates} stopped at "
                                          f"once; nobody reported it; its lease removed it {gone:.2f} s later; the "
                                          f"node's ranks killed after the recovery", started=struck)

    def _mirrored_node_loss(self, c0: Any, members: list[str]) -> Injected:
        """:data:`NODE_RANKS` ranks join with a new node label; once every mirror the
        commit assigns is filled, the whole node is SIGKILLed. The recovery must read
        from disk the experts the coverage report predicted for that node, no more, no
        fewer (none when the mirrors cover it): checked by :meth:`_check_prediction`."""
        node = f"mnode-{self.nodes_lost}"
        self.nodes_lost += 1
        ranks = [self.add_rank("--node", node) for _ in range(NODE_RANKS)]
        self._wait(self._stable, self.recover_timeout_s, f"node {node} ({ranks}) to join")
        cov = self._wait(lambda: mirrors_filled(self.read()), self.recover_timeout_s, "every mirror filled")
        self._seen, self._base_epoch = {}, self.read().committed.epoch  # the join read nothing of the node's
        struck = time.monotonic()
        for name in ranks:
            self.kill(name)
        inj = Injected(ranks, f"node {node} ({ranks}) SIGKILLed with {cov.ready} mirror rows ready; the coverage "
                              f"report predicted {cov.per_domain.get(node, 0)} experts from disk", started=struck)
        inj.predicted_disk = cov.per_domain.get(node, 0)
        return inj

    def _check_prediction(self, inj: Injected, res: StepResult) -> None:
        """The node's loss read from disk the experts the coverage report predicted."""
        if res.disk_experts != inj.predicted_disk:
            raise InvariantError(f"{res.detail}: the plans read {res.disk_experts} experts from disk, the coverage "
                                 f"report predicted {inj.predicted_disk} (seed {self.seed})")

    def _registered(self, rid: str) -> bool:
        raw, _ = self._client().get(f"{self.cfg.root}/ranks/{rid}")
        return raw is not None

    def _unwatched(self, v: ClusterView, node: str) -> tuple[str, list[str]]:
        """The rank of ``node`` that no rank off the node watches (as the agents choose:
        :func:`monitored_peers` over the committed members and their registered nodes),
        and its node mates."""
        members = list(v.committed.members)
        nodes = _nodes(v)
        on_node = [m for m in members if nodes.get(m) == node]
        for m in on_node if len(on_node) == NODE_RANKS else []:
            if {w for w in members if w != m and m in monitored_peers(members, w, nodes)} <= set(on_node):
                return member_id(m), [member_id(w) for w in on_node if w != m]
        raise InvariantError(f"no rank of node {node} ({on_node}) is watched by its node only, in ring order "
                             f"{members} (seed {self.seed})")

    def _require_unreported(self, start: int, rid: str, token: str) -> None:
        """From revision ``start`` until ``rid``'s registration went, nobody reported it:
        no controller confirmed it, so what removed it was its lease."""
        root = self.cfg.root
        events = self._history(start, ("suspects/", f"ranks/{rid}"))
        gone = [e.mod_revision for e in events
                if type(e).__name__ == "DeleteEvent" and e.key.decode() == f"{root}/ranks/{rid}"]
        if not gone:
            raise InvariantError(f"{token}'s registration never went (seed {self.seed})")
        reports = [e.key.decode() for e in events if type(e).__name__ == "PutEvent" and e.mod_revision < gone[0]
                   and e.key.decode().startswith(f"{root}/suspects/") and e.key.decode().rsplit("/", 1)[1] == rid]
        if reports:
            raise InvariantError(f"{token} was reported ({reports}) before its registration went: not its lease "
                                 f"but a suspicion removed it (seed {self.seed})")

    _FAULTS: ClassVar[dict[str, Callable[["ChaosCluster", Any, list[str]], Injected]]] = {
        "kill_one": _kill_one, "kill_two": _kill_two, "kill_holders": _kill_holders,
        "kill_in_transfer": _kill_in_transfer, "kill_leader": _kill_leader, "restart_etcd": _restart_etcd,
        "join_after_failure": _join_after_failure, "double_failure": _double_failure,
        "hostile_values": _hostile_values, "stall_short": _stall_short, "stall_long": _stall_long,
        "cut_link": _cut_link, "node_loss": _node_loss, "mirrored_node_loss": _mirrored_node_loss,
    }

    _KILLS: ClassVar[dict[str, int]] = {"kill_two": 2, "kill_in_transfer": 2, "double_failure": 2, "kill_holders": 3}
    """Ranks a fault kills (at least; one when not listed), to make room for first."""

    def _make_room(self, kills: int) -> list[str]:
        """Start ranks until ``kills`` of them can die with every expert still held, and
        wait until they serve: a fault then does what its name says."""
        added = []
        while not self._capacity_left(kills):
            added.append(self.add_rank())
        if added:
            self._wait(self._stable, self.recover_timeout_s, f"{added} to join before the fault")
        return added

    def step(self, fault: str) -> StepResult:
        if fault not in self._FAULTS:
            raise InvariantError(f"unknown fault {fault!r}; choose one of {FAULTS}")
        added = self._make_room(self._KILLS.get(fault, 1))
        before = self.read()
        c0 = before.committed
        assert c0 is not None  # a step starts from a stable, committed state
        members = [member_id(m) for m in c0.members]
        t0 = time.monotonic()
        self._seen, self._base_epoch = {}, c0.epoch
        inj = self._FAULTS[fault](self, c0, members)
        self._ensure_controller()
        # Keep enough ranks to hold every expert.
        while len(self.live_ranks()) * self.slots < self.spec.experts + self.slots:
            self.add_rank()
        s = self._wait(self._stable, self.recover_timeout_s, f"recovery after {fault}")
        if fault == "restart_etcd" and s.committed.epoch != c0.epoch:
            raise InvariantError(f"etcd restart changed the epoch {c0.epoch} -> {s.committed.epoch}: "
                                 "a rank was declared dead because etcd was away")
        detail = inj.detail + (f" (started {added} first, to hold every expert after the kills)" if added else "")
        res = StepResult(fault, detail, time.monotonic() - (inj.started or t0), s.committed.epoch,
                         killed=tuple(inj.killed), downgraded=inj.downgraded, hostile_writes=inj.hostile_writes)
        self.check(s, res)
        if fault == "kill_holders" and not inj.downgraded:
            self._check_disk_reads(inj, res)
        if inj.predicted_disk is not None:
            self._check_prediction(inj, res)
        self.results.append(res)
        note = f" [{res.downgraded}]" if res.downgraded else ""
        self.log(f"[seed {self.seed}] {fault}: {res.detail}{note}; stable at epoch {res.epoch} after "
                 f"{res.seconds:.2f} s; disk: {res.disk_experts} experts planned, {res.disk_bytes} B read, "
                 f"{res.unplanned_disk_bytes} B unplanned")
        return res

    # -- invariants --------------------------------------------------------------------
    def check(self, v: ClusterView, res: StepResult) -> None:
        """Fail the schedule on the first broken invariant, or on a member whose own ack
        key does not hold its ok ack of the committed epoch; fill in the step's disk
        reads: planned (experts with no live replica) and unplanned (a source died
        mid-transfer, the receiver fell through to disk)."""
        require(check_commit(v))
        self._check_own_acks(v)
        self._observe(v)
        for seen in self._seen.values():
            planned = seen.missing * seen.expert_bytes
            read = sum(seen.disk.values())
            res.disk_experts += seen.missing
            res.planned_disk_bytes += planned
            res.disk_bytes += read
            res.unplanned_disk_bytes += max(0, read - planned)
        res.disk_fallback = res.unplanned_disk_bytes > 0

    def _check_disk_reads(self, inj: Injected, res: StepResult) -> None:
        """After every holder of an expert died, a plan reads it from disk, and if the
        committed plan does, its ranks acked at least those bytes from disk. Holders
        that left in separate plans (their leases expired apart) may let the expert be
        copied from the one still alive: the step is then downgraded, not failed."""
        if not any(seen.missing for seen in self._seen.values()):
            if len(self._seen) < 2:
                raise InvariantError(f"kill_holders {inj.detail}, yet no plan up to epoch {res.epoch} reads an "
                                     f"expert from disk (seed {self.seed})")
            res.downgraded = "kill_holders: the holders left in separate plans, no expert lost every replica"
            return
        seen = self._seen.get(res.epoch)
        if seen is not None and seen.missing and sum(seen.disk.values()) < seen.missing * seen.expert_bytes:
            raise InvariantError(f"the plan of epoch {res.epoch} reads {seen.missing} experts "
                                 f"({seen.missing * seen.expert_bytes} B) from disk but its ranks acked "
                                 f"{sum(seen.disk.values())} B read from disk (seed {self.seed})")

    def _check_own_acks(self, v: ClusterView) -> None:
        c = v.committed
        if c is None or c.epoch == 0 or v.plan is None or v.plan.epoch != c.epoch:
            return
        client = self._client()
        for token in c.members:
            key = f"{self.cfg.root}/acks/{member_id(token)}"
            raw, _ = client.get(key)
            try:
                ack = None if raw is None else AckRecord.parse(key, raw)
            except ElasticEPError:
                ack = None
            if ack is None or ack.id != token or ack.epoch != c.epoch or not ack.ok:
                raise InvariantError(f"epoch {c.epoch} committed, but {key} does not hold {token}'s ok ack of "
                                     f"that epoch (seed {self.seed})")


def _token(members: list[str], rid: str) -> str:
    """The member token of rank id ``rid`` among ``members`` ("" if none)."""
    return next((m for m in members if member_id(m) == rid), "")


def _nodes(v: ClusterView) -> dict[str, str]:
    """Member token -> the node label its registration gives."""
    return {r.token: r.node for r in v.ranks.values()}


def _parsed(parse: Callable[[str, bytes], Any], key: str, raw: bytes) -> Any:
    """``parse(key, raw)``, or None for a value that is not a valid record."""
    try:
        return parse(key, raw)
    except ElasticEPError:
        return None


def _served(rec: LoadRecord) -> int:
    return int(rec.served.get("ok", 0)) + int(rec.served.get("bad", 0))


def random_schedule(rng: np.random.Generator, steps: int) -> list[str]:
    return [FAULTS[int(i)] for i in rng.integers(0, len(FAULTS), steps)]


# -- hostile values ------------------------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000
"""JSON nested 100k deep: more than any recursive parser follows."""


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # allow_nan: NaN and Infinity are written as such


def _oversized(rid: str) -> bytes:
    """A record-shaped value just under etcd's request limit."""
    head = json.dumps({"schema": 1, "id": rid, "pad": ""}).encode()[:-2]
    return head + b"a" * (ETCD_MAX_REQUEST_BYTES - 8192 - len(head)) + b'"}'


def _garbage(rng: np.random.Generator, rid: str) -> list[bytes]:
    """What any key may hold: not JSON, not an object, numbers too big or too deep."""
    return [b"x", b"null", b"1e400", str(10**30).encode(), b"9" * 5000, rng.bytes(512), b"\xff\xfe{", b"",
            DEEP, b'{"schema": 1, "id": ' + DEEP + b"}", _json({"schema": 10**30, "id": rid}),
            _json({"schema": float("nan"), "id": rid}), _oversized(rid)]


def _rank_values(rid: str) -> list[bytes]:
    rec = {"schema": 1, "id": rid, "host": "127.0.0.1", "device": "cpu", "node": "", "state": "joining",
           "endpoint": {}, "pid": 0, "incarnation": "hostile"}
    return [_json(rec), _json({**rec, "id": "r0"}), _json({**rec, "state": "bogus"}), _json({**rec, "pid": 1e400}),
            _json({**rec, "pid": "x"}), _json({**rec, "endpoint": [1, 2]}), _json({**rec, "host": None}),
            _json({**rec, "incarnation": 10**30})]


def _load_values(rid: str, layers: int, experts: int) -> list[bytes]:
    rec = {"schema": 1, "id": rid, "window_s": 1.0, "served": {}, "epochs": []}
    row = [1.0] * experts
    return [_json({**rec, "load": [[1.0, 2.0], [3.0]]}),
            _json({**rec, "load": [[float("nan")] * experts] * layers}),
            _json({**rec, "load": [[float("inf")] * experts] * layers}),
            _json({**rec, "load": [[-1.0] * experts] * layers}),
            _json({**rec, "load": [[10**30] * experts] * layers}),
            _json({**rec, "load": [row] * (layers + 5)}),
            _json({**rec, "load": [[row]] * layers}),
            _json({**rec, "load": "x"}),
            _json({**rec, "load": [row] * layers, "window_s": float("inf")}),
            _json({**rec, "load": [row] * layers, "window_s": "x"}),
            _json({**rec, "load": [row] * layers, "served": {"ok": "x", "bad": 1e400}}),
            _json({**rec, "load": [row] * layers, "epochs": [10**30, -1, "x", None]}),
            _json({**rec, "load": [[1.0] * 300_000]})]


def _ack_values(rid: str, tokens: list[str], epoch: int) -> list[bytes]:
    rec = {"schema": 1, "id": f"{rid}#hostile", "epoch": epoch + 1, "ok": True, "bytes": {}, "phases": {},
           "error": "", "mismatched": 0}
    out = [_json({**rec, "mismatched": m}) for m in ("x", None, float("inf"), 10**30)]
    out += [_json({**rec, "epoch": e}) for e in ("x", None, float("inf"), 10**30, -1)]
    out += [_json({**rec, "ok": "x"}), _json({**rec, "bytes": {"disk": -1, "peer": float("inf")}}),
            _json({**rec, "bytes": {"disk": "x"}}), _json({**rec, "bytes": [1]}),
            _json({**rec, "phases": {"transfer": float("nan")}}), _json({**rec, "error": {"x": DEEP.decode()[:64]}})]
    # Acks of the next plans claiming to be other members (ok and failed): a rank may
    # write only its own ack key, but anything inside it.
    out += [_json({**rec, "id": t, "epoch": epoch + k, "ok": ok, "mismatched": 0})
            for t in tokens for k in (1, 2) for ok in (True, False)]
    return out


@dataclass(frozen=True)
class HostileKey:
    """A key a rank may write (relative to the deployment's root), the hostile values it
    gets one per round, and the value it is left holding (``None``: leased, it vanishes)."""

    key: str
    values: tuple[bytes, ...]
    final: bytes | None


def hostile_keys(rng: np.random.Generator, survivors: list[str], epoch: int, layers: int,
                 experts: int) -> list[HostileKey]:
    """The keys of :func:`write_hostile_values` and their values: ``ranks/``, ``load/`` and
    ``acks/`` of fake ids, with a lease and without, and the ``load/`` and ``acks/`` of a
    real member (``survivors[0]``). ``survivors``: member tokens that outlive the step,
    whom forged acks claim to be; ``epoch``: the committed epoch (acks name the next).

    Left behind: a valid-looking registration without a lease, a record under another
    rank's key, JSON nested 100k deep, a ragged load, and acks of the next epoch that
    claim to be a surviving member (ok, and failed)."""
    real, other = member_id(survivors[0]), survivors[-1]

    def key(kind: str, rid: str, final: Callable[[list[bytes]], bytes] | None) -> HostileKey:
        own = {"ranks": lambda: _rank_values(rid), "load": lambda: _load_values(rid, layers, experts),
               "acks": lambda: _ack_values(rid, survivors, epoch)}[kind]()
        return HostileKey(f"{kind}/{rid}", tuple(_garbage(rng, rid) + own), None if final is None else final(own))

    def forged(ok: bool) -> Callable[[list[bytes]], bytes]:
        return lambda _: _json({"schema": 1, "id": other, "epoch": epoch + 1, "ok": ok, "bytes": {"disk": 0},
                                "phases": {}, "error": "", "mismatched": 0})

    return [
        key("ranks", "hostile-0", lambda own: own[0]),  # valid, but held by no lease
        key("ranks", "hostile-1", None),  # valid, under a lease that is never refreshed
        key("ranks", "hostile#2", lambda own: DEEP),
        key("ranks", "hostile-3/deeper", lambda own: own[1]),  # the record of another rank
        key("load", "hostile-0", lambda own: own[0]),
        key("load", "hostile-1", None),
        key("load", real, lambda own: own[2]),  # until the rank publishes its next window
        key("acks", "hostile-0", forged(True)),
        key("acks", "hostile-4", forged(False)),
        key("acks", "hostile-1", None),
        key("acks", real, lambda own: own[0]),  # until the rank acks the next plan
    ]


def write_hostile_values(client: Any, root: str, keys: list[HostileKey], hold_s: float = 0.25) -> int:
    """Write, as a rank with a plain etcd client could, every value of every key: in
    round ``i`` each key gets its ``i``-th value (so every key is oversized, or nested
    100k deep, at once), held ``hold_s`` so that the controllers read it; leased keys get
    a fresh 2 s lease each round and vanish after the last. Then each unleased key is
    left holding its ``final`` value, checked by reading it back. Returns the writes
    made."""
    rounds = max(len(k.values) for k in keys)
    writes = 0
    for i in range(rounds):
        lease = client.lease(2)
        for k in keys:
            client.put(f"{root}/{k.key}", k.values[i % len(k.values)], lease=lease if k.final is None else None)
            writes += 1
        time.sleep(hold_s)
    for k in keys:
        if k.final is not None:
            client.put(f"{root}/{k.key}", k.final)
            writes += 1
    for k in keys:
        got, _ = client.get(f"{root}/{k.key}")
        if k.final is not None and got != k.final:
            raise InvariantError(f"{root}/{k.key}: etcd does not hold the hostile value just written")
    return writes
