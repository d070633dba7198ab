"""Many simulated ranks in one process: the real agent protocol, no expert weights.

What the scale benchmark (``bench/bench_scale.py``) and ``elastic-ep simulate-ranks``
run to put hundreds of ranks in front of one controller on a few CPU cores. Each
simulated rank is a real :class:`~elastic_ep.runtime.agent.RankAgent`: it registers under
its own lease, keeps it alive, reads and fences plans, acks and commits exactly as a
serving rank does. Only the bytes are left out: its executor (:class:`CountingExecutor`)
counts what each route of the plan would move into this rank and moves nothing, and the
bootstrap load reports the disk bytes of the rank's slots without reading a file.

Glossary and numbers. ``SimulatedRanks(cfg, SimShape(58, 256, 9, 88_080_384))`` with
``start(32)`` hosts ranks ``sim-0 .. sim-31``; with ``node_size=8`` their node labels are
``node-0`` (sim-0..7) to ``node-3`` (sim-24..31). Each rank has two threads (its
``run`` loop and its lease keep-alive); by default all share one etcd client (one gRPC
channel), so a process of 64 ranks holds 128 threads and one connection.

Not simulated: the executor's per-layer barrier and heartbeat keys in the plan's store
(the real :class:`~elastic_ep.runtime.executor.PlanExecutor` writes them through
``store=``); this executor never touches the store, so the etcd load measured here is
the control plane's alone.

A dead rank is :meth:`SimulatedRanks.kill`: its thread stops first (so it cannot
register again), then its lease is revoked, so its key goes at once, as when a lease
expires after a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

from controller.decide import ModelShape
from controller.etcd_client import EtcdConfig, call, connect

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import ROUTES, TransferPlan
from elastic_ep.errors import ConfigError, PlanError, StaleEpochError
from elastic_ep.runtime.agent import AgentConfig, RankAgent
from elastic_ep.runtime.executor import plan_role

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
"""How long :meth:`SimulatedRanks.kill` waits for a rank's thread to end its pass."""


SimShape = ModelShape
"""The placement's shape the simulated ranks serve: ``SimShape(58, 256, 9, 88_080_384)``
(DeepSeek-V3: 58 MoE layers, 256 experts, 9 slots a rank, bytes of one expert): the
controller's own :class:`~controller.decide.ModelShape`."""


@dataclass
class CountedReport:
    """What :meth:`CountingExecutor.execute` returns: the part of
    :class:`~elastic_ep.runtime.executor.ExecutionReport` the agent reads.

    ``bytes``: route -> bytes this rank would receive by it, e.g.
    ``{"local": 0, "peer": 176160768, "disk": 88080384}`` (two peer slots, one disk slot
    of DeepSeek-V3); ``phase_seconds``: the executor's phases, all but ``count`` zero;
    ``excluded``: always empty (no barrier is simulated).
    """

    epoch: int
    old_rank: int | None
    new_rank: int | None
    bytes: dict[str, int]
    phase_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    excluded: dict[int, list[int]] = field(default_factory=dict)

    def bytes_by_route(self) -> dict[str, int]:
        return dict(self.bytes)


class CountingExecutor:
    """:class:`~elastic_ep.runtime.executor.PlanExecutor`'s one verb, counting instead of
    moving: this rank's receives of the plan, ``expert_bytes`` each, by planned route.

    It checks a plan as the real executor does (shape, stale epoch, a dead old rank, a
    joiner's new rank), so a wrong plan fails the ack here too.
    """

    def __init__(self, shape: SimShape) -> None:
        self.shape = shape
        self.last_epoch = -1

    def _check(self, plan: TransferPlan) -> None:
        s = self.shape
        if plan.epoch <= self.last_epoch:
            raise StaleEpochError("plan", plan.epoch, self.last_epoch)
        got = (plan.new.num_layers, plan.new.slots_per_rank, plan.expert_bytes)
        if got != (s.num_layers, s.slots_per_rank, s.expert_bytes):
            raise PlanError(f"plan has {got[0]} layers x {got[1]} slots per rank of {got[2]} B experts; these "
                            f"simulated ranks {s.num_layers} x {s.slots_per_rank} of {s.expert_bytes} B")

    def execute(
        self, plan: TransferPlan, old_rank: int | None = None, new_rank: int | None = None, *, store: Any = None,
        gone: Any = None, hooks: Any = None,
    ) -> CountedReport:
        """This rank's part of ``plan``, counted. ``store``, ``gone`` and ``hooks`` are
        accepted and left untouched (no barrier is simulated, nothing is served)."""
        t0 = time.perf_counter()
        self._check(plan)
        new = plan_role(plan, old_rank, new_rank)
        moved = dict.fromkeys(ROUTES, 0)
        for t in plan.receives(new) if new is not None else []:
            moved[t.route] += plan.expert_bytes
        self.last_epoch = plan.epoch
        seconds = time.perf_counter() - t0
        return CountedReport(plan.epoch, old_rank, new, moved, {"count": seconds}, seconds)


class CountingMirror:
    """A simulated rank's host-memory mirror: ``rows`` offered in its registration, and
    every row a commit assigns reported ready at once (no byte is copied), through
    ``publish`` (the agent's :meth:`~elastic_ep.runtime.agent.RankAgent.publish_mirror`).
    The controller then plans from it as from a serving rank's mirror."""

    def __init__(self, rows: int, publish: Any) -> None:
        self.rows, self.publish = rows, publish
        self.held: Any = None

    def assign(self, wanted: Any) -> None:
        self.held = wanted.copy()
        self.republish()

    def republish(self) -> None:
        if self.held is None:
            return
        try:
            self.publish(self.held)
        except Exception as e:  # etcd away or no lease: the next commit publishes again
            log.warning("simulated mirror not published: %s", e)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Hosted:
    """One simulated rank: its agent, the thread running it and that thread's stop."""

    agent: RankAgent
    thread: threading.Thread
    stop: threading.Event


class SimulatedRanks:
    """``SimulatedRanks(cfg, shape).start(16)`` -> ranks ``sim-0 .. sim-15``, each a real
    :class:`RankAgent` on its own thread, all on one etcd client unless ``ranks_per_client``.

    Args:
        cfg: the deployment's etcd settings (one client is connected unless ``client``).
        shape: what the controller places (checked against every plan).
        node_size: ranks per node label: rank ``i`` is on ``node-<i // node_size>``.
        lease_ttl_s: each rank's lease TTL.
        client: the one etcd client every rank uses (then ``ranks_per_client`` is ignored).
        ranks_per_client: ranks that share one client (0: all share one). gRPC's
            synchronous calls on one channel take turns, so on one client a lease
            refresh waits behind every other rank's reads: with many ranks it can wait
            past its TTL, which no serving rank (one process, one client) would see.
        mirror_rows: each rank's mirror rows (:class:`CountingMirror`; 0: none).
    """

    def __init__(self, cfg: EtcdConfig, shape: SimShape, node_size: int = 8, lease_ttl_s: int = 3,
                 client: Any = None, ranks_per_client: int = 0, mirror_rows: int = 0) -> None:
        if node_size < 1 or lease_ttl_s < 1 or ranks_per_client < 0:
            raise ConfigError(f"node_size {node_size} and lease_ttl_s {lease_ttl_s} must be at least 1, "
                              f"ranks_per_client {ranks_per_client} at least 0")
        self.cfg, self.shape, self.node_size, self.lease_ttl_s = cfg, shape, node_size, lease_ttl_s
        self.ranks_per_client, self.mirror_rows = ranks_per_client, mirror_rows
        self._clients: list[Any] = [client if client is not None else connect(cfg)]
        self._own_clients = client is None  # closed by close(); a given client is the caller's
        self._shared = client is not None or ranks_per_client == 0
        self.ranks: dict[str, _Hosted] = {}
        self._next = 0
        self._started = 0  # ranks started here so far, dead ones included
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The first etcd client (the only one unless ``ranks_per_client``)."""
        return self._clients[0]

    def _client_for(self, started: int) -> Any:
        """The client of the ``started``-th rank started here (a new one every
        ``ranks_per_client`` ranks)."""
        if self._shared:
            return self.client
        group = started // self.ranks_per_client
        while len(self._clients) <= group:
            self._clients.append(connect(self.cfg))
        return self._clients[group]

    def _load_initial(self, placement: ExpertPlacement, rank: int) -> int:
        """Disk bytes of ``rank``'s slots (the bootstrap load), read from nowhere."""
        return int(placement.rank_slots(rank).size) * self.shape.expert_bytes

    def _agent(self, index: int, client: Any) -> RankAgent:
        cfg = AgentConfig(self.cfg, f"sim-{index}", node=f"node-{index // self.node_size}",
                          lease_ttl_s=self.lease_ttl_s, endpoint={"transport": "simulated"})
        agent = RankAgent(cfg, CountingExecutor(self.shape), self._load_initial, client=client)
        if self.mirror_rows > 0:
            agent.mirror = CountingMirror(self.mirror_rows, agent.publish_mirror)  # type: ignore[assignment]
        return agent

    def start(self, count: int, start_index: int | None = None) -> list[str]:
        """Start ``count`` more ranks numbered from ``start_index`` (default: after the
        highest started so far); returns their ids. An id already hosted is refused."""
        first = self._next if start_index is None else start_index
        ids = [f"sim-{i}" for i in range(first, first + count)]
        with self._lock:
            taken = sorted(set(ids) & set(self.ranks))
            if taken:
                raise ConfigError(f"ranks {taken} are already hosted here: start at another index")
            for i, rid in zip(range(first, first + count), ids):
                stop = threading.Event()
                agent = self._agent(i, self._client_for(self._started))
                self._started += 1
                thread = threading.Thread(target=agent.run, args=(stop,), name=rid, daemon=True)
                self.ranks[rid] = _Hosted(agent, thread, stop)
                thread.start()
            self._next = max(self._next, first + count)
        log.info("started %d simulated ranks %s..%s", count, ids[0] if ids else "-", ids[-1] if ids else "-")
        return ids

    def alive(self) -> list[str]:
        """Ids of the ranks whose thread still runs."""
        return [rid for rid, h in self.ranks.items() if h.thread.is_alive()]

    def kill(self, *rank_ids: str) -> list[str]:
        """Make each of ``rank_ids`` a dead rank: stop its thread (all signalled first,
        then each waited for, bounded), then revoke its lease so its key goes now; the
        ranks die together, as on a node loss. Returns those killed (ids not hosted
        here, or already dead, are left out)."""
        with self._lock:
            gone = {rid: h for rid in rank_ids if (h := self.ranks.pop(rid, None)) is not None}
        for h in gone.values():  # signal all first: a node's ranks stop together
            h.stop.set()
            h.agent.stop()
        for rid, h in gone.items():
            h.thread.join(JOIN_TIMEOUT_S)
            if h.thread.is_alive():
                log.warning("rank %s: its pass did not end within %.0f s; revoking its lease anyway", rid, JOIN_TIMEOUT_S)
        for rid, h in gone.items():
            self._revoke(rid, h.agent)
        if gone:
            log.info("killed %s (threads stopped, leases revoked)", " ".join(gone))
        return list(gone)

    def _revoke(self, rank_id: str, agent: RankAgent) -> None:
        lease = agent.lease
        if lease is None:
            return
        try:
            call(agent.client.revoke_lease, f"revoke {rank_id}'s lease", lease.id)
        except Exception as e:  # already expired or etcd gone: the key goes with the lease anyway
            log.warning("rank %s: lease not revoked (%s); it expires within %d s", rank_id, e, self.lease_ttl_s)

    def close(self) -> None:
        """Kill every rank (keys gone at once), then close the clients made here."""
        self.kill(*list(self.ranks))
        if self._own_clients:
            for c in self._clients:
                c.close()


def apply_command(ranks: SimulatedRanks, line: str) -> str:
    """One control line: ``kill ID [ID ...]`` or ``start N``; returns what was done.

    Example: ``apply_command(ranks, "kill sim-8 sim-9")`` -> ``"killed sim-8 sim-9"``.
    """
    words = line.split()
    if not words:
        return ""
    if words[0] == "kill" and len(words) > 1:
        done = ranks.kill(*words[1:])
        missing = [w for w in words[1:] if w not in done]
        return f"killed {' '.join(done)}" + (f"; not hosted here: {' '.join(missing)}" if missing else "")
    if words[0] == "start" and len(words) == 2 and words[1].isdigit():
        return "started " + " ".join(ranks.start(int(words[1])))
    return f"unknown command {line.strip()!r}: use 'kill ID [ID ...]' or 'start N'"


def _follow(ranks: SimulatedRanks, commands: Iterable[str]) -> None:
    """Apply control lines until their end (a closed stdin ends nothing else)."""
    for line in commands:
        try:
            out = apply_command(ranks, line)
        except Exception as e:  # a bad command must not end the process
            out = f"command {line.strip()!r} failed: {type(e).__name__}: {e}"
        if out:
            print(out, flush=True)


def serve(cfg: EtcdConfig, shape: SimShape, count: int, stop: threading.Event, start_index: int = 0,
          commands: TextIO | None = None, **options: Any) -> int:
    """``elastic-ep simulate-ranks``: host ``count`` ranks until ``stop``; with ``commands``
    (stdin), apply its control lines (:func:`apply_command`) meanwhile. ``options``:
    :class:`SimulatedRanks`'s keywords. The ranks' leases are revoked on the way out.
    Returns the exit status."""
    ranks = SimulatedRanks(cfg, shape, **options)
    ids = ranks.start(count, start_index)
    print(f"hosting {len(ids)} simulated ranks {ids[0]}..{ids[-1]} "
          f"({shape.num_layers} layers x {shape.slots_per_rank} slots, {shape.num_logical} experts)", flush=True)
    if commands is not None:
        threading.Thread(target=_follow, args=(ranks, commands), name="simulate-commands", daemon=True).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ranks.close()
    return 0
