"""Rank processes for executor tests: spawn one per job, optionally SIGKILL a victim at
its fault point, collect every report, and check slots bit-exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from controller.controller import Controller, ControllerConfig, ModelShape
from controller.etcd_client import EtcdConfig, connect
from controller.records import CommitRecord
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.polling import wait_until
from elastic_ep.tools.synthetic_rank import SyntheticRank, run_agent
from loaders.checkpoint.model import ExpertModel
from elastic_ep.core.plan import TransferPlan
from elastic_ep.tools.synthetic_rank import FaultPoint, RankJob, run_job

EXIT_GRACE_S = 10.0
"""How long a rank process may take to exit after it reported, whatever is left of the
overall deadline: a loaded machine is slow to tear down torch and gloo, and a rank that
reported must not be killed for it."""


def run_jobs(jobs: list[RankJob], store=None, fault: FaultPoint | None = None, timeout: float = 90.0,
             target=run_job) -> dict:
    """Spawn one process per job running ``target(job, results)``; with ``fault``, SIGKILL
    the victim when it reaches the fault point and release the others. Every rank reports
    within ``timeout`` and then has ``EXIT_GRACE_S`` to exit. Returns results by old rank
    (or ``j<new>``)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = {}
    for j in jobs:
        p = ctx.Process(target=target, args=(j, results), daemon=True)
        p.start()
        procs[j.old_rank if j.old_rank is not None else f"j{j.new_rank}"] = p
    out: dict = {}
    reported_at: dict = {}
    deadline = time.monotonic() + timeout
    try:
        if fault is not None:
            while not store.check([f"{fault.key}/at"]):
                assert time.monotonic() < deadline, "the victim never reached the fault point"
                time.sleep(0.01)
            victim = procs[fault.victim]
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            assert victim.exitcode == -signal.SIGKILL
            store.set(f"{fault.key}/go", "1")
        expected = len(jobs) - (1 if fault is not None else 0)
        while len(out) < expected:
            left = deadline - time.monotonic()
            assert left > 0, f"only {sorted(map(str, out))} of {expected} ranks reported in {timeout} s"
            try:
                r = results.get(timeout=min(left, 5))
            except queue.Empty:
                dead = [k for k, p in procs.items() if p.exitcode not in (None, 0) and not (fault and k == fault.victim)]
                assert not dead, f"rank processes {dead} died"
                continue
            key = r["old_rank"] if r["old_rank"] is not None else f"j{r['new_rank']}"
            out[key] = r
            reported_at[key] = time.monotonic()
    finally:
        _reap(procs, reported_at)
    errors = {k: r["error"] for k, r in out.items() if "error" in r}
    assert not errors, errors
    codes = {k: p.exitcode for k, p in procs.items() if not (fault and k == fault.victim)}
    assert all(c == 0 for c in codes.values()), f"rank exit codes {codes}"
    return out


def _reap(procs: dict, reported_at: dict) -> None:
    """Wait for each rank to exit: ``EXIT_GRACE_S`` from its own report; a rank that never
    reported (the run already failed) is killed at once."""
    for k, p in procs.items():
        t = reported_at.get(k)
        p.join(timeout=0.1 if t is None else max(0.1, t + EXIT_GRACE_S - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def check_exact(plan: TransferPlan, out: dict) -> None:
    for k, r in out.items():
        assert r["mismatched"] == [], f"rank {k}: slots (layer, slot, expert) not bit-exact: {r['mismatched']}"
        n = r["report"]["new_rank"]
        if n is not None:
            assert len(r["outcomes"]) == len(plan.receives(n)), k


def read_committed(client: Any, root: str) -> CommitRecord | None:
    """The deployment's committed record under ``root``, or None before the first commit."""
    v, _ = client.get(f"{root}/committed")
    return None if v is None else CommitRecord.parse(f"{root}/committed", v)



@contextlib.contextmanager
def running_deployment(
    spec: ExpertModel, slots: int, ids: list[str], make_rank: Callable[[EtcdConfig, str], SyntheticRank],
    settle_s: float, confirm_settle_s: float,
) -> Iterator[tuple[Controller, dict[str, Any], Any, str, CommitRecord]]:
    """etcd, a controller in this process for ``spec`` with ``slots`` per rank (settle
    windows ``settle_s`` and, after confirmed deaths, ``confirm_settle_s``) and one
    spawned rank process per id, ``make_rank(cfg, id)`` on that etcd. Yields
    ``(controller, processes by id, client, root, bootstrap commit)`` once the
    bootstrap committed and the peers had a moment to start watching each other (they
    watch from the commit on). Stopped processes are resumed before they are killed."""
    with EtcdServer() as srv:
        cfg = EtcdConfig(srv.endpoint, deployment="peers", timeout_s=2.0)
        ctl = Controller(ControllerConfig(cfg, ModelShape(spec.layers, spec.experts, slots, spec.expert_bytes),
                                          id="ctl-a", min_ranks=len(ids), settle_s=settle_s, leader_ttl_s=3,
                                          confirm_settle_s=confirm_settle_s))
        stop = threading.Event()
        t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
        t.start()
        ctx = mp.get_context("spawn")
        procs = {rid: ctx.Process(target=run_agent, args=(make_rank(cfg, rid),), daemon=True) for rid in ids}
        for p in procs.values():
            p.start()
        client = connect(cfg)
        try:
            c = wait_until(lambda: read_committed(client, cfg.root), 120 + settle_s, "the bootstrap commit")
            time.sleep(1.0)
            yield ctl, procs, client, cfg.root, c
        finally:
            stop.set()
            t.join(10)
            for p in procs.values():
                if p.is_alive():
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                p.join(5)


def seeded_weights(layout: Any, rank: int, layers: int, slots: int) -> list[dict[str, Any]]:
    """Serving tensors of ``rank`` (``layers`` x ``slots`` slots of ``layout``), every byte
    drawn from a generator seeded by (rank, layer): what a transport test reads back."""
    import torch

    out = []
    for layer in range(layers):
        g = torch.Generator().manual_seed(1000 * rank + layer)
        named = layout.allocate(slots)
        for w in named.values():
            flat = w.view(torch.uint8).reshape(-1)
            flat.copy_(torch.randint(0, 256, flat.shape, generator=g, dtype=torch.uint8))
        out.append(named)
    return out
