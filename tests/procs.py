"""Rank processes for executor tests: spawn one per job, optionally SIGKILL a victim at
its fault point, collect every report, and check slots bit-exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from typing import Any

from controller.records import CommitRecord
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
