"""Scale: one real controller and up to 320 simulated ranks against a real local etcd.

Each run starts a fresh etcd (``elastic_ep/tools/etcd_server.py``), the real controller
(``elastic-ep controller``, a subprocess) and the ranks as ``elastic-ep simulate-ranks``
subprocesses (``--per-process`` ranks each, real agents that move no bytes:
``elastic_ep/tools/simulate.py``). It waits for the bootstrap commit, measures the idle
cost, fires one event and waits for the commit that answers it:

- ``kill1``: rank ``sim-1`` dies (its thread stops and its lease is revoked, through the
  process's stdin: ``kill sim-1``); recovered = a commit of N-1 ranks without it.
- ``kill8``: node ``node-1`` (``sim-8 .. sim-15``) dies at once; N-8 ranks without them.
- ``join8``: a new ``simulate-ranks --count 8`` process starts; N+8 ranks with them.

Configurations (``--quick``: DeepSeek-V3 at 64 and 256 ranks, ``kill1``, both policies):

==============  ======  =======  ============  ===========================================
model           layers  experts  expert bytes  ranks x slots per rank
==============  ======  =======  ============  ===========================================
DeepSeek-V3     58      256      88080384      32, 64, 128, 256 x 9; 320 x 1
Kimi-K2         60      384      44040192      64, 128, 256 x (ceil(384 / ranks) + 1) = 7, 4, 3
Qwen3-235B      94      128      18874368      64, 128, 256 x (ceil(128 / ranks) + 1) = 3, 2, 2
==============  ======  =======  ============  ===========================================

Each with ``min_migration`` and ``deepseek``; a run whose ranks after the event cannot
hold every expert (DeepSeek-V3 32 x 9 less a node: 216 slots < 256) is skipped and says so.

Measured, from a watch on the deployment's prefix (each change timed on arrival):

- ``ev>pub``: the event (a kill: the kill command; a join: the first joiner's
  registration) to the first ``epoch`` write after it (``epoch`` and ``plan`` are
  written in one transaction: a publish); ``pub>ack``: the last publish before the
  commit to the last ack before the commit; ``ack>com``: that ack to the commit;
  ``pub>com``: the first publish to the commit (every plan of the recovery); ``plans``:
  publishes in between.
- ``rec KiB``: the largest value written under the prefix in the run (every put the
  watch saw; its key is printed below the table); ``resp KiB``: the largest response to
  the bench's own reads (keys plus values of ``read_view``, and of every key read one
  by one after the run).
- ``puts txns rpcs rx tx``: etcd's ``/metrics`` from the event to the commit
  (``etcd_mvcc_put_total``, ``etcd_mvcc_txn_total``, every handled gRPC call, client
  bytes received and sent), the bench's own watch and reads included.
- ``cpu ms``: CPU time of the simulate-ranks processes from the event to the commit, per
  rank: what one agent spends on the change (its idle cost included). ``idle %``: their
  CPU time over an idle window after the bootstrap, per wall second and rank: percent
  of one core per agent; ``idle rpc/s``: etcd calls per second in that window.

Hundreds of agents on a few cores are not a deployment (one agent per serving process,
its own cores and connection), so: the simulate-ranks processes run niced (``--nice``),
so that etcd and the controller are not starved; their leases are long (``--lease-ttl``,
60 s: kills revoke leases, so the TTL times nothing) and their etcd calls may take long
(``--etcd-timeout``), because while a plan is processed every agent of a process waits
its turn for the CPU (``ranks x cpu ms / cores``: 256 x 100 ms / 2 cores is 13 s), and
a lease not refreshed in time fences a rank. For the same reason ``pub>ack`` here grows
with ``ranks x cpu ms / cores``; on separate machines it would be about ``cpu ms``.

A run that does not commit within ``--timeout`` is reported FAILED (with why, and its
logs are kept) and not counted; the bench goes on. Every child process is killed by PID
at the end of its run, and each run has its own etcd.

Last line: ``max_ranks_recovered=<n> largest_record_kib=<x> worst_publish_to_commit_s=<y>
idle_agent_cpu_pct=<z>`` (the most ranks before an event that recovered; the largest value
of any run; the slowest first publish to commit of the runs that recovered; the highest
idle CPU per agent of any run).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from controller.etcd_client import EtcdConfig, connect  # noqa: E402
from controller.records import member_id  # noqa: E402
from controller.view import read_view  # noqa: E402
from elastic_ep.tools.etcd_server import EtcdServer  # noqa: E402

CLI = [sys.executable, "-m", "elastic_ep.tools.cli"]
DEPLOYMENT = "scale"
NODE_SIZE = 8
KiB = 1024


# -- what runs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """A model's shape as the controller places it: ``Model("DeepSeek-V3", 58, 256, 88_080_384)``."""

    name: str
    layers: int
    experts: int
    expert_bytes: int


DSV3 = Model("DeepSeek-V3", 58, 256, 88_080_384)
KIMI = Model("Kimi-K2", 60, 384, 44_040_192)
QWEN3 = Model("Qwen3-235B", 94, 128, 18_874_368)
MODELS = {m.name: m for m in (DSV3, KIMI, QWEN3)}

EVENTS = {"kill1": (1, 0), "kill8": (NODE_SIZE, 0), "join8": (0, NODE_SIZE)}
"""event -> (ranks removed, ranks joined)."""
POLICIES = ("min_migration", "deepseek")


@dataclass(frozen=True)
class Case:
    """One run: ``Case(DSV3, 64, 9, "kill1", "deepseek")``."""

    model: Model
    ranks: int
    slots: int
    event: str
    policy: str

    @property
    def ranks_after(self) -> int:
        removed, joined = EVENTS[self.event]
        return self.ranks - removed + joined

    def skip_reason(self) -> str:
        """Why this run cannot recover by capacity ("" when it can)."""
        for n, when in ((self.ranks, "before"), (self.ranks_after, f"after {self.event}")):
            if n * self.slots < self.model.experts:
                return (f"{when}: {n} ranks x {self.slots} slots = {n * self.slots} slots "
                        f"< {self.model.experts} experts")
        return ""


def sizes(model: Model) -> list[tuple[int, int]]:
    """(ranks, slots per rank) of each configuration of ``model``."""
    if model is DSV3:
        return [(32, 9), (64, 9), (128, 9), (256, 9), (320, 1)]
    return [(r, math.ceil(model.experts / r) + 1) for r in (64, 128, 256)]


def all_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(DSV3, r, 9, "kill1", p) for r in (64, 256) for p in POLICIES]
    return [Case(m, r, s, e, p) for m in MODELS.values() for r, s in sizes(m) for e in EVENTS for p in POLICIES]


# -- child processes -----------------------------------------------------------------------
class Procs:
    """The child processes of one run, each logging to ``<workdir>/<name>.log``; all
    killed by PID in :meth:`close`."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], stdin: bool = False, nice: int = 0) -> subprocess.Popen[bytes]:
        """Start ``argv``; ``nice`` lowers its CPU priority by that much (through nice(1):
        Python code run between fork and exec would meet this process's gRPC threads)."""
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        with open(os.path.join(self.workdir, f"{name}.log"), "wb") as out:
            p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def dead(self) -> list[str]:
        """Names of children that exited (none should, before close)."""
        return [f"{n} (exit {p.returncode}, see {self.workdir}/{n}.log)" for n, p in self.procs.items()
                if p.poll() is not None]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            p.wait(timeout=10)
            if p.stdin is not None:
                p.stdin.close()


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` (Linux ``/proc/<pid>/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


# -- etcd as the bench sees it -------------------------------------------------------------
def _payload_bytes(x: Any) -> int:
    """Keys plus values in an etcd3 response: ``(value, meta)`` pairs, nested in lists."""
    if isinstance(x, tuple) and len(x) == 2 and hasattr(x[1], "key"):
        return len(x[0] or b"") + len(x[1].key or b"")
    if isinstance(x, (list, tuple)):
        return sum(_payload_bytes(y) for y in x)
    return 0


class MeasuredClient:
    """An etcd3 client that remembers its largest response (keys plus values): what the
    bench's reads cost, ``read_view`` included. Everything else passes through."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.largest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _note(self, result: Any) -> Any:
        self.largest = max(self.largest, _payload_bytes(result))
        return result

    def transaction(self, *args: Any, **kwargs: Any) -> Any:
        return self._note(self._client.transaction(*args, **kwargs))

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._note(self._client.get(*args, **kwargs))

    def get_prefix(self, *args: Any, **kwargs: Any) -> Any:
        return self._note(list(self._client.get_prefix(*args, **kwargs)))


@dataclass(frozen=True)
class Seen:
    """One change under the deployment, timed when the watch delivered it."""

    t: float
    put: bool
    key: str  # relative to the deployment's root
    size: int
    revision: int  # the change's mod revision


class Watcher:
    """Every change under ``root``, in order, from a watch on its own thread."""

    def __init__(self, client: Any, root: str) -> None:
        self.root = root + "/"
        self.seen: list[Seen] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._events, self._cancel = client.watch_prefix(self.root)
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._events:
                key = ev.key.decode(errors="replace")[len(self.root):]
                s = Seen(time.monotonic(), type(ev).__name__ == "PutEvent", key, len(ev.value or b""), ev.mod_revision)
                with self._cond:
                    self.seen.append(s)
                    self._cond.notify_all()
        except BaseException as e:  # a dead watch fails the waits that need it, by timeout
            self.error = e

    def count(self) -> int:
        with self._cond:
            return len(self.seen)

    def wait_beyond(self, n: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until more than ``n`` changes were seen."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.seen) > n, timeout_s)

    def commits(self, i: int, j: int) -> list[float]:
        """When the ``committed`` key was written, among changes ``i .. j-1``."""
        with self._cond:
            return [s.t for s in self.seen[i:j] if s.put and s.key == "committed"]

    def time_of(self, key: str, revision: int, timeout_s: float) -> float | None:
        """When the put of ``key`` at ``revision`` arrived (waiting at most ``timeout_s``
        for it: a read can be ahead of the watch)."""
        def find() -> float | None:
            return next((s.t for s in self.seen if s.key == key and s.revision == revision), None)

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout_s)
            return find()

    def between(self, t0: float, t1: float) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if t0 <= s.t <= t1]

    def puts(self, t0: float, t1: float, match: Callable[[str], bool]) -> list[float]:
        return [s.t for s in self.between(t0, t1) if s.put and match(s.key)]

    def close(self) -> None:
        self._cancel()
        self._thread.join(5)


def etcd_metrics(endpoint: str) -> dict[str, float]:
    """etcd's Prometheus counters, summed over labels: name -> value."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.partition("{")[0]
            try:
                out[base] = out.get(base, 0.0) + float(value)
            except ValueError:
                continue
    return out


ETCD_COUNTERS = {
    "puts": "etcd_mvcc_put_total",
    "txns": "etcd_mvcc_txn_total",
    "rpcs": "grpc_server_handled_total",
    "rx": "etcd_network_client_grpc_received_bytes_total",
    "tx": "etcd_network_client_grpc_sent_bytes_total",
}


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(m, 0.0) - before.get(m, 0.0) for k, m in ETCD_COUNTERS.items()}


# -- one run ---------------------------------------------------------------------------------
@dataclass
class Result:
    """What one run measured (None: not measured; seconds, bytes, etcd counter deltas)."""

    case: Case
    status: str = "FAILED"  # ok, FAILED, skipped
    why: str = ""
    boot_s: float | None = None
    event_to_publish_s: float | None = None
    publish_to_acks_s: float | None = None
    acks_to_commit_s: float | None = None
    publish_to_commit_s: float | None = None
    plans: int = 0
    largest_record: int = 0
    largest_record_key: str = ""
    largest_response: int = 0
    etcd: dict[str, float] = field(default_factory=dict)
    idle_cpu_pct: float | None = None
    idle_rpc_per_s: float | None = None
    event_cpu_ms: float | None = None


class Run:
    """One case: etcd, controller, simulated ranks; :meth:`execute` fills a :class:`Result`."""

    def __init__(self, case: Case, args: argparse.Namespace, workdir: str) -> None:
        self.case, self.args, self.workdir = case, args, workdir
        self.result = Result(case)
        self.procs = Procs(workdir)
        self.sims: list[tuple[subprocess.Popen[bytes], range]] = []  # (process, rank indices it hosts)

    # -- starting ----------------------------------------------------------------------------
    def _etcd_flags(self, srv: EtcdServer) -> list[str]:
        return ["--etcd", srv.endpoint, "--deployment", DEPLOYMENT]

    def _start_controller(self, srv: EtcdServer) -> None:
        c, m = self.case, self.case.model
        self.procs.start("controller", CLI + ["controller", *self._etcd_flags(srv), "--id", "ctl-scale",
                         "--layers", str(m.layers), "--experts", str(m.experts), "--slots", str(c.slots),
                         "--expert-bytes", str(m.expert_bytes), "--min-ranks", str(c.ranks),
                         "--policy", c.policy, "--settle", str(self.args.settle), "--metrics-port", "-1"])

    def _start_sims(self, srv: EtcdServer, first: int, count: int) -> None:
        c, m = self.case, self.case.model
        for lo in range(first, first + count, self.args.per_process):
            n = min(self.args.per_process, first + count - lo)
            p = self.procs.start(f"sim-{lo}", CLI + ["simulate-ranks", *self._etcd_flags(srv), "--count", str(n),
                                 "--start-index", str(lo), "--node-size", str(NODE_SIZE),
                                 "--layers", str(m.layers), "--experts", str(m.experts), "--slots", str(c.slots),
                                 "--expert-bytes", str(m.expert_bytes), "--lease-ttl", str(self.args.lease_ttl),
                                 "--ranks-per-client", str(self.args.ranks_per_client),
                                 "--etcd-timeout", str(self.args.etcd_timeout), "--stdin-commands"],
                                 stdin=True, nice=self.args.nice)
            self.sims.append((p, range(lo, lo + n)))

    def _kill(self, indices: list[int]) -> None:
        """Tell the processes hosting ``sim-<i>`` to kill them (one line per process)."""
        for p, hosted in self.sims:
            mine = [f"sim-{i}" for i in indices if i in hosted]
            if mine and p.stdin is not None:
                p.stdin.write(("kill " + " ".join(mine) + "\n").encode())
                p.stdin.flush()

    # -- waiting -----------------------------------------------------------------------------
    def _wait_commit(self, watch: Watcher, client: MeasuredClient, root: str,
                     ok: Callable[[set[str]], bool], what: str) -> tuple[Any, float]:
        """The first commit whose member ids satisfy ``ok``, and when the watch saw it;
        raises TimeoutError after ``--timeout`` s, or at once when a child died."""
        deadline = time.monotonic() + self.args.timeout
        seen = 0
        while True:
            n = watch.count()
            if seen == 0 or watch.commits(seen, n):
                c = read_view(client, root).committed
                if c is not None and ok({member_id(m) for m in c.members}):
                    return c, self._commit_time(watch, client, root, deadline)
            seen = n
            dead = self.procs.dead()
            if dead:
                raise RuntimeError(f"waiting for {what}: children exited: {', '.join(dead)}")
            if watch.error is not None:
                raise RuntimeError(f"waiting for {what}: the bench's watch failed: {watch.error!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} within {self.args.timeout:.0f} s "
                                   f"(newest commit: {self._describe(client, root)})")
            watch.wait_beyond(n, min(left, 1.0))

    @staticmethod
    def _commit_time(watch: Watcher, client: MeasuredClient, root: str, deadline: float) -> float:
        """When the watch saw the ``committed`` value just read (by its mod revision)."""
        _, meta = client.get(f"{root}/committed")
        t = watch.time_of("committed", meta.mod_revision, max(1.0, deadline - time.monotonic()))
        if t is None:
            raise TimeoutError(f"the watch never delivered {root}/committed at revision {meta.mod_revision}")
        return t

    @staticmethod
    def _describe(client: MeasuredClient, root: str) -> str:
        try:
            v = read_view(client, root)
        except Exception as e:  # only for the message
            return f"not read: {e}"
        c = v.committed
        where = "none" if c is None else f"epoch {c.epoch} with {len(c.members)} ranks"
        return f"{where}; epoch {v.epoch}, {len(v.ranks)} ranks registered, {len(v.acks)} acks of the newest plan"

    # -- measuring ---------------------------------------------------------------------------
    def _sim_cpu(self) -> float:
        """CPU seconds of the simulate-ranks processes hosting the first ranks (joiners
        started later are left out: they did not exist at the start of a window)."""
        return cpu_seconds([p.pid for p, hosted in self.sims if hosted.start < self.case.ranks])

    def _idle(self, endpoint: str) -> None:
        """CPU per agent and etcd calls per second while nothing changes."""
        time.sleep(1.0)  # let the last acks and commits of the bootstrap drain
        m0, c0, t0 = etcd_metrics(endpoint), self._sim_cpu(), time.monotonic()
        time.sleep(self.args.idle)
        m1, c1, t1 = etcd_metrics(endpoint), self._sim_cpu(), time.monotonic()
        self.result.idle_cpu_pct = 100.0 * (c1 - c0) / (t1 - t0) / self.case.ranks
        self.result.idle_rpc_per_s = metrics_delta(m0, m1)["rpcs"] / (t1 - t0)

    def _timings(self, watch: Watcher, t_event: float, t_commit: float) -> None:
        r = self.result
        pubs = watch.puts(t_event, t_commit, lambda k: k == "epoch")
        if not pubs:
            raise RuntimeError("committed without a publish seen after the event")
        acks = watch.puts(pubs[-1], t_commit, lambda k: k.startswith("acks/"))
        last_ack = acks[-1] if acks else pubs[-1]
        r.plans = len(pubs)
        r.event_to_publish_s = pubs[0] - t_event
        r.publish_to_acks_s = last_ack - pubs[-1]
        r.acks_to_commit_s = t_commit - last_ack
        r.publish_to_commit_s = t_commit - pubs[0]

    def _records(self, watch: Watcher, client: MeasuredClient, root: str) -> None:
        """The largest value: of every put the watch saw, and of every key now, read one
        by one (so that no read is larger than one value)."""
        r = self.result
        sizes = [(s.size, s.key) for s in watch.between(0.0, math.inf) if s.put]
        for _, meta in client.get_prefix(root + "/", keys_only=True):
            value, _ = client.get(meta.key)
            sizes.append((len(value or b""), meta.key.decode(errors="replace")[len(root) + 1:]))
        r.largest_record, r.largest_record_key = max(sizes, default=(0, ""))
        r.largest_response = client.largest

    # -- the run -----------------------------------------------------------------------------
    def execute(self) -> Result:
        r = self.result
        with EtcdServer() as srv:
            cfg = EtcdConfig(srv.endpoint, deployment=DEPLOYMENT, timeout_s=10.0)
            client = MeasuredClient(connect(cfg))
            watch = Watcher(client, cfg.root)
            try:
                self._bootstrap_and_event(srv, watch, client, cfg.root)
                r.status, r.why = "ok", ""
            except Exception as e:  # the run fails, the bench goes on
                r.why = f"{type(e).__name__}: {e}"
                if not isinstance(e, (TimeoutError, RuntimeError)):
                    traceback.print_exc()
            finally:
                self.procs.close()
                try:
                    self._records(watch, client, cfg.root)
                except Exception as e:
                    r.why += f" (records not read: {e})"
                watch.close()
        return r

    def _bootstrap_and_event(self, srv: EtcdServer, watch: Watcher, client: MeasuredClient, root: str) -> None:
        c, r = self.case, self.result
        t0 = time.monotonic()
        self._start_controller(srv)
        self._start_sims(srv, 0, c.ranks)
        everyone = {f"sim-{i}" for i in range(c.ranks)}
        self._wait_commit(watch, client, root, lambda ids: ids == everyone, f"bootstrap commit of {c.ranks} ranks")
        r.boot_s = time.monotonic() - t0
        self._idle(srv.endpoint)
        before, cpu = etcd_metrics(srv.endpoint), self._sim_cpu()
        t_event, want = self._fire(srv, everyone)
        _, t_commit = self._wait_commit(watch, client, root, lambda ids: ids == want,
                                        f"commit of {len(want)} ranks after {c.event}")
        r.etcd = metrics_delta(before, etcd_metrics(srv.endpoint))
        r.event_cpu_ms = 1e3 * (self._sim_cpu() - cpu) / c.ranks
        if c.event == "join8":  # the event is the first joiner's registration, seen by the watch
            keys = {f"ranks/{i}" for i in want - everyone}
            joined = watch.puts(t_event, t_commit, lambda k: k in keys)
            t_event = min(joined, default=t_event)
        self._timings(watch, t_event, t_commit)

    def _fire(self, srv: EtcdServer, everyone: set[str]) -> tuple[float, set[str]]:
        """Start the event; returns when, and the member ids that answer it."""
        n = self.case.ranks
        if self.case.event == "join8":
            t = time.monotonic()
            self._start_sims(srv, n, NODE_SIZE)
            return t, everyone | {f"sim-{i}" for i in range(n, n + NODE_SIZE)}
        victims = [1] if self.case.event == "kill1" else list(range(NODE_SIZE, 2 * NODE_SIZE))  # node-1
        t = time.monotonic()
        self._kill(victims)
        return t, everyone - {f"sim-{i}" for i in victims}


# -- the report --------------------------------------------------------------------------------
COLUMNS = ("model", "ranks", "slots", "event", "policy", "status", "boot s", "ev>pub", "pub>ack", "ack>com",
           "pub>com", "plans", "rec KiB", "resp KiB", "puts", "txns", "rpcs", "rx MiB", "tx MiB", "cpu ms",
           "idle %", "idle rpc/s")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def row(r: Result) -> list[str]:
    c, e = r.case, r.etcd
    return [c.model.name, str(c.ranks), str(c.slots), c.event, c.policy, r.status, _f(r.boot_s, 1),
            _f(r.event_to_publish_s), _f(r.publish_to_acks_s), _f(r.acks_to_commit_s), _f(r.publish_to_commit_s),
            str(r.plans) if r.status == "ok" else "-", _f(r.largest_record / KiB if r.largest_record else None, 1),
            _f(r.largest_response / KiB if r.largest_response else None, 1),
            *(str(int(e[k])) if e else "-" for k in ("puts", "txns", "rpcs")),
            *(_f(e[k] / 2**20, 1) if e else "-" for k in ("rx", "tx")),
            _f(r.event_cpu_ms, 0), _f(r.idle_cpu_pct, 3), _f(r.idle_rpc_per_s, 0)]


def print_table(results: list[Result]) -> None:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(x[i]) for x in rows) for i in range(len(COLUMNS))]
    for x in rows:
        print("  ".join(v.rjust(w) if i > 4 else v.ljust(w) for i, (v, w) in enumerate(zip(x, widths))))
    for r in results:
        if r.status != "ok":
            c = r.case
            print(f"{r.status}: {c.model.name} {c.ranks} x {c.slots} {c.event} {c.policy}: {r.why}")
    biggest = max(results, key=lambda r: r.largest_record, default=None)
    if biggest is not None and biggest.largest_record:
        print(f"largest record: {biggest.largest_record / KiB:.1f} KiB at {biggest.largest_record_key} "
              f"({biggest.case.model.name}, {biggest.case.ranks} ranks)")


def summary(results: list[Result]) -> str:
    ok = [r for r in results if r.status == "ok"]
    worst = max((r.publish_to_commit_s for r in ok if r.publish_to_commit_s is not None), default=math.nan)
    idle = max((r.idle_cpu_pct for r in results if r.idle_cpu_pct is not None), default=math.nan)
    largest = max((r.largest_record for r in results), default=0)
    return (f"max_ranks_recovered={max((r.case.ranks for r in ok), default=0)} "
            f"largest_record_kib={largest / KiB:.1f} worst_publish_to_commit_s={worst:.2f} "
            f"idle_agent_cpu_pct={idle:.3f}")


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="DeepSeek-V3 at 64 and 256 ranks, kill1, both policies")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="only these models (repeat)")
    p.add_argument("--ranks", action="append", type=int, help="only these rank counts (repeat)")
    p.add_argument("--event", action="append", choices=sorted(EVENTS), help="only these events (repeat)")
    p.add_argument("--policy", action="append", choices=POLICIES, help="only these policies (repeat)")
    p.add_argument("--timeout", type=float, help="seconds for each commit to come (default 120, --quick 90)")
    p.add_argument("--per-process", type=int, default=64, help="simulated ranks per simulate-ranks process")
    p.add_argument("--ranks-per-client", type=int, default=0,
                   help="simulated ranks sharing one etcd connection (0: all of a process)")
    p.add_argument("--etcd-timeout", type=float, default=60.0,
                   help="seconds one etcd call of a simulated rank may take: the ranks of a process take turns "
                        "on its CPU and its connection, which no serving rank does")
    p.add_argument("--nice", type=int, default=10,
                   help="CPU priority drop of the simulate-ranks processes, so that etcd and the controller "
                        "(their own machines in a deployment) are not starved by hundreds of agents on a few cores")
    p.add_argument("--settle", type=float, default=0.5, help="the controller's --settle")
    p.add_argument("--lease-ttl", type=int, default=60,
                   help="each simulated rank's lease TTL (kills revoke leases, so it times nothing)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of the idle window")
    p.add_argument("--keep-logs", action="store_true", help="keep the logs of every run (those of failed runs are always kept)")
    args = p.parse_args(argv)
    if args.timeout is None:
        args.timeout = 90.0 if args.quick else 120.0
    if args.per_process < 1 or args.timeout <= 0 or args.idle <= 0 or args.lease_ttl < 1 or args.ranks_per_client < 0:
        p.error("--per-process, --timeout, --idle and --lease-ttl must be positive, --ranks-per-client at least 0")
    return args


def selected(args: argparse.Namespace) -> Iterator[Case]:
    for c in all_cases(args.quick):
        if ((args.model is None or c.model.name in args.model) and (args.ranks is None or c.ranks in args.ranks)
                and (args.event is None or c.event in args.event) and (args.policy is None or c.policy in args.policy)):
            yield c


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    base = tempfile.mkdtemp(prefix="elastic-ep-scale-")
    for i, case in enumerate(selected(args)):
        why = case.skip_reason()
        if why:
            results.append(Result(case, "skipped", why))
            print(f"skipped {case.model.name} {case.ranks} x {case.slots} {case.event} {case.policy}: {why}",
                  flush=True)
            continue
        workdir = os.path.join(base, f"run-{i}")
        os.makedirs(workdir)
        t = time.monotonic()
        r = Run(case, args, workdir).execute()
        results.append(r)
        print(f"{r.status}: {case.model.name} {case.ranks} x {case.slots} {case.event} {case.policy} in "
              f"{time.monotonic() - t:.0f} s" + (f": {r.why}" if r.why else ""), flush=True)
        if r.status == "ok" and not args.keep_logs:  # a failed run's logs stay, for its why
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(results)
    if os.listdir(base):
        print(f"logs (controller, ranks): {base}")
    else:
        os.rmdir(base)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
