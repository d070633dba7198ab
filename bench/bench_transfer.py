"""Peer transports moving the same plan between processes, against a plain memory copy.

A scale-up: ``--ranks`` ranks hold a synthetic checkpoint's experts, one rank joins and
is filled from its peers (the min_migration policy gives it its share of replicas).
Each backend runs the same plan in fresh processes; the figure is the peer bytes over
the wall time of the slowest rank's peer phase, against ``dst.copy_(src)`` of the same
byte count in this process. Peak staging memory is compared with one layer's local
weights (``slots_per_rank * expert_bytes``).

    python bench/bench_transfer.py                   # ~430 MB moved, 1.2 GB checkpoint
    python bench/bench_transfer.py --backends torch  # one backend

Last line: ``<backend>_copy_ratio=<x> ... peak_staging_ratio=<y>``.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from elastic_ep.core.plan import TransferPlan  # noqa: E402
from elastic_ep.runtime.executor import Participants  # noqa: E402
from elastic_ep.tools.synthetic_rank import RankJob, run_job, scenario  # noqa: E402
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint  # noqa: E402

MODULES = {"torch": "torch.distributed", "nixl": "nixl", "mooncake": "mooncake.engine"}


def copy_gbps(nbytes: int, repeats: int = 5) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def run_backend(backend: str, plan: TransferPlan, spec: SyntheticSpec, ckpt: str, timeout: float) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    parts = Participants.of(plan.mapping)
    base = dict(transport=backend, store_host="127.0.0.1", store_port=store.port, ckpt_dir=ckpt, spec=spec,
                plan_json=plan.to_json(), source_timeout_s=60.0, dead_after_s=30.0)
    jobs = [RankJob(old_rank=r, **base) for r in parts.old] + [RankJob(old_rank=None, new_rank=n, **base) for n in parts.joining]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_job, args=(j, results), daemon=True) for j in jobs]
    for p in procs:
        p.start()
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < len(jobs):
            try:
                out.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise SystemExit(f"{backend}: only {len(out)} of {len(jobs)} ranks finished in {timeout} s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for r in out:
        if "error" in r:
            raise SystemExit(f"{backend}: rank failed: {r['error']}")
        if r["mismatched"]:
            raise SystemExit(f"{backend}: slots not bit-exact: {r['mismatched'][:5]}")
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["torch", "nixl", "mooncake"])
    ap.add_argument("--ranks", type=int, default=3, help="ranks before the scale-up")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--slots", type=int, default=6, help="slots per rank")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=600)
    return ap.parse_args()


def ensure_checkpoint(ckpt: str, spec: SyntheticSpec) -> None:
    if os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")):
        return
    t = time.perf_counter()
    make_checkpoint(ckpt, spec)
    print(f"checkpoint: {spec.layers * spec.experts * spec.expert_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")


def measure(backend: str, plan: TransferPlan, spec: SyntheticSpec, ckpt: str, args: argparse.Namespace,
            base_gbps: float) -> tuple[float, float]:
    """Run ``plan`` through ``backend``: ``(peer GB/s over the copy's, peak staging over
    one layer's local weights)``."""
    out = run_backend(backend, plan, spec, ckpt, args.timeout)
    planned = plan.bytes_by_route()
    layer_bytes = args.slots * spec.expert_bytes
    peer_bytes = sum(r["report"]["bytes"]["peer"] for r in out)
    peer_s = max(r["report"]["phase_seconds"]["peer"] for r in out)
    total_s = max(r["report"]["seconds"] for r in out)
    peak = max(r["report"]["peak_staging_bytes"] for r in out)
    gbps = peer_bytes / peer_s / 1e9
    assert peer_bytes == planned["peer"], (peer_bytes, planned)
    print(f"{backend}: peer {peer_bytes / 1e6:.0f} MB in {peer_s:.3f} s = {gbps:.2f} GB/s "
          f"({gbps / base_gbps:.3f}x copy); whole plan {total_s:.3f} s; peak staging {peak / 2**20:.1f} MiB "
          f"= {peak / layer_bytes:.2f}x one layer's local weights ({layer_bytes / 2**20:.1f} MiB)")
    return gbps / base_gbps, peak / layer_bytes


def main() -> None:
    args = parse_args()
    print(f"seed={args.seed}")
    spec = SyntheticSpec(layers=args.layers, experts=args.experts, hidden=args.hidden,
                         intermediate=args.intermediate, dtype="bf16", shards=4, seed=args.seed)
    eb = spec.expert_bytes
    tmp = tempfile.TemporaryDirectory(prefix="elastic-ep-bench-transfer-") if args.dir is None else None
    ckpt = tmp.name if tmp is not None else args.dir
    ensure_checkpoint(ckpt, spec)
    plan = scenario(np.random.default_rng(args.seed), "join", processes=args.ranks + 1, layers=args.layers,
                    experts=args.experts, slots_per_rank=args.slots, expert_bytes=eb)
    planned = plan.bytes_by_route()
    print(f"plan: {args.ranks} ranks + 1 joining, {args.layers} layers x {args.slots} slots, expert {eb / 2**20:.1f} MiB; "
          f"peer {planned['peer'] / 1e6:.0f} MB, local {planned['local'] / 1e6:.0f} MB, disk {planned['disk'] / 1e6:.0f} MB")
    base = copy_gbps(planned["peer"])
    print(f"baseline memory copy of {planned['peer'] / 1e6:.0f} MB: {base:.2f} GB/s")
    ratios: dict[str, float] = {}
    peak_ratio = 0.0
    for backend in args.backends:
        try:
            importlib.import_module(MODULES[backend])
        except Exception as e:
            print(f"{backend}: cannot be imported ({e}), skipped")
            continue
        ratios[backend], peak = measure(backend, plan, spec, ckpt, args, base)
        peak_ratio = max(peak_ratio, peak)
    print(" ".join(f"{b}_copy_ratio={r:.3f}" for b, r in ratios.items()) + f" peak_staging_ratio={peak_ratio:.3f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
