"""Chaos schedules over real processes: a local etcd, controller processes and rank
agents, hit by seeded random faults, with every invariant of docs/DESIGN.md checked
after each step. Used by ``tests/chaos`` (a short set) and ``bench/soak.py``.

Faults (:data:`FAULTS`): SIGKILL of one or two ranks, of every holder of some logical
expert (forcing disk reads), of a rank while a plan is being executed, of the leader
controller; an etcd restart; a rank joining right after a failure; a second failure
before the first recovery committed; hostile values written where a rank may write,
then a kill.

A step either does what its name says or says why not: every kill is checked (the
process is gone, killed by SIGKILL), and a step that did less because the ranks left
could not hold every expert otherwise (``kill_two`` with too few ranks) is recorded as
downgraded, with the reason, instead of passing as the fault it is named after. Any
other shortfall fails the schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from controller.etcd_client import EtcdConfig, connect
from controller.records import AckRecord, PlanRecord, member_id
from controller.view import ClusterView, read_view
from elastic_ep.errors import ElasticEPError, EtcdError
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.invariants import InvariantError, check_commit, require
from elastic_ep.tools.polling import wait_for
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

__all__ = ["FAULTS", "ChaosCluster", "HostileKey", "InvariantError", "StepResult", "hostile_keys", "random_schedule",
           "write_hostile_values"]

FAULTS = ("kill_one", "kill_two", "kill_holders", "kill_in_transfer", "kill_leader", "restart_etcd",
          "join_after_failure", "double_failure", "hostile_values")

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

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.next_rank = 0
        self.kills = 0
        self.controller_kills = 0
        self.killed: set[str] = set()
        self.results: list[StepResult] = []
        self._seen: dict[int, _PlanSeen] = {}
        self._base_epoch = 0

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

    def _ensure_controller(self) -> None:
        if not self.live_controllers():
            self._controller(f"ctl-{len([n for n in self.procs if n.startswith('ctl')])}")

    def add_rank(self) -> str:
        s, rid = self.spec, f"r{self.next_rank}"
        self.next_rank += 1
        self._spawn(rid, ["agent", "--id", rid, "--ckpt", self.ckpt, "--layers", str(s.layers), "--experts",
                          str(s.experts), "--hidden", str(s.hidden), "--intermediate", str(s.intermediate),
                          "--seed", str(s.seed), "--slots", str(self.slots), "--lease-ttl", str(self.lease_ttl),
                          *self.agent_args])
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
        return [n for n, p in self.procs.items() if n.startswith("r") and p.poll() is None]

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

    def _wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        v = wait_for(pred, timeout, 0.05)
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
        # Every holder of the expert with the fewest replicas: it must come from disk.
        cnt = c0.placement.logcnt[0]
        e = int(np.argmin(cnt))
        holders = sorted({members[int(c0.placement.log2phy[0, e, k]) // self.slots] for k in range(cnt[e])})
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

    _FAULTS: ClassVar[dict[str, Callable[["ChaosCluster", Any, list[str]], Injected]]] = {
        "kill_one": _kill_one, "kill_two": _kill_two, "kill_holders": _kill_holders,
        "kill_in_transfer": _kill_in_transfer, "kill_leader": _kill_leader, "restart_etcd": _restart_etcd,
        "join_after_failure": _join_after_failure, "double_failure": _double_failure,
        "hostile_values": _hostile_values,
    }

    _KILLS: ClassVar[dict[str, int]] = {"kill_two": 2, "kill_in_transfer": 2, "double_failure": 2, "kill_holders": 2}
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
