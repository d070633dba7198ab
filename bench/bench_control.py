"""Control-plane latencies against a real local etcd.

1. Failure detection: ``--kills`` times, SIGKILL one ``elastic-ep agent`` process and
   time until its registration disappears (lease expiry, seen through a watch, as the
   controller sees it), against the lease TTL; then the time to the recovery commit.
2. Plan publication for the DeepSeek-V3-sized case (58 MoE layers, 256 experts, 32
   ranks x 9 slots, one rank failed): the fenced transaction that writes the plan,
   against a plain put of the same bytes (ratio).

Last line: ``detect_over_ttl=<x> publish_ms=<y>``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from controller.controller import Controller, ControllerConfig, ModelShape  # noqa: E402
from controller.etcd_client import EtcdConfig, connect  # noqa: E402
from elastic_ep.tools.etcd_server import EtcdServer  # noqa: E402
from controller.records import CommitRecord, PlanRecord  # noqa: E402
from elastic_ep.core.load_stats import zipf_load  # noqa: E402
from elastic_ep.core.placement import ExpertPlacement  # noqa: E402
from elastic_ep.core.plan import build_plan  # noqa: E402
from elastic_ep.core.policy import get_policy  # noqa: E402
from elastic_ep.core.rank_mapping import RankMapping  # noqa: E402
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint  # noqa: E402

SPEC = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=1, seed=1)
SLOTS = 4


def detection(srv: EtcdServer, kills: int, ttl: int, workdir: str) -> tuple[list[float], list[float]]:
    cfg = EtcdConfig(srv.endpoint, deployment="bench", timeout_s=2.0)
    ckpt = os.path.join(workdir, "ckpt")
    make_checkpoint(ckpt, SPEC)
    ctl = Controller(ControllerConfig(cfg, ModelShape(SPEC.layers, SPEC.experts, SLOTS, SPEC.expert_bytes),
                                      min_ranks=kills + 2, settle_s=0.2, leader_ttl_s=ttl))
    stop = threading.Event()
    threading.Thread(target=ctl.run, args=(stop,), daemon=True).start()
    procs = {}
    for i in range(kills + 2):
        rid = f"r{i}"
        procs[rid] = subprocess.Popen(
            [sys.executable, "-m", "elastic_ep.tools.cli", "agent", "--etcd", srv.endpoint, "--deployment", "bench",
             "--id", rid, "--ckpt", ckpt, "--layers", str(SPEC.layers), "--experts", str(SPEC.experts),
             "--hidden", str(SPEC.hidden), "--intermediate", str(SPEC.intermediate), "--seed", str(SPEC.seed),
             "--slots", str(SLOTS), "--lease-ttl", str(ttl)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = connect(cfg)

    def committed() -> CommitRecord | None:
        v, _ = client.get(f"{cfg.root}/committed")
        return None if v is None else CommitRecord.parse("committed", v)

    def wait(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (v := pred()):
                return v
            time.sleep(0.01)
        raise SystemExit(f"timed out waiting for {what}")

    detect, recover = [], []
    try:
        c = wait(committed, 120, "bootstrap")
        for k in range(kills):
            victim = c.members[k % len(c.members)].split("#")[0]
            gone = threading.Event()
            watch_id = client.add_watch_callback(f"{cfg.root}/ranks/{victim}", lambda ev: gone.set())
            t0 = time.monotonic()
            os.kill(procs[victim].pid, signal.SIGKILL)
            if not gone.wait(10 * ttl):
                raise SystemExit(f"{victim}: lease never expired")
            detect.append(time.monotonic() - t0)
            client.cancel_watch(watch_id)
            c = wait(lambda: (n := committed()) and n.epoch > c.epoch and n, 60, "recovery")
            recover.append(time.monotonic() - t0)
            print(f"kill {k + 1}: {victim} gone after {detect[-1]:.3f} s (TTL {ttl} s), recovery committed "
                  f"after {recover[-1]:.3f} s; phases {{{', '.join(f'{p}: {s:.3f}' for p, s in c.phases.items())}}}")
    finally:
        stop.set()
        for p in procs.values():
            p.kill()
            p.wait(10)
    return detect, recover


def publication(srv: EtcdServer, repeats: int) -> tuple[float, float, int]:
    cfg = EtcdConfig(srv.endpoint, deployment="publish", timeout_s=5.0)
    L, E, R, S = 58, 256, 32, 9
    load = zipf_load(L, E, 0.6, 0)
    old = get_policy("deepseek", num_groups=8, num_nodes=4).rebalance(
        ExpertPlacement(np.tile(np.arange(R * S) % E, (L, 1)), S, E), RankMapping.build(R), load)
    mapping = RankMapping.build(R, dead=[5])
    new = get_policy("min_migration").rebalance(old, mapping, load)
    ctl = Controller(ControllerConfig(cfg, ModelShape(L, E, S, 88_080_384), id="bench"))
    assert ctl.election.campaign()
    members = [f"r{i}#x" for i in range(R)]
    client = ctl.client
    fenced, plain = [], []
    for i in range(repeats):
        plan = build_plan(old, new, mapping, 88_080_384, epoch=i + 1)
        rec = PlanRecord(i + 1, "bench", members, [m for j, m in enumerate(members) if j != 5], plan, new, "bench")
        body = rec.to_json()
        t = time.perf_counter()
        ctl.publish(rec, i)
        fenced.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.put(f"{cfg.root}/plain", body)
        plain.append(time.perf_counter() - t)
    return statistics.median(fenced) * 1e3, statistics.median(plain) * 1e3, len(body)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=4, help="agents to SIGKILL, one at a time")
    ap.add_argument("--ttl", type=int, default=2, help="rank lease TTL, seconds")
    ap.add_argument("--repeats", type=int, default=10, help="plan publications to time")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="elastic-ep-bench-control-") as d, EtcdServer() as srv:
        detect, recover = detection(srv, args.kills, args.ttl, d)
        pub_ms, put_ms, size = publication(srv, args.repeats)
    ratio = statistics.mean(detect) / args.ttl
    print(f"detection: mean {statistics.mean(detect):.3f} s, max {max(detect):.3f} s over {len(detect)} kills "
          f"= {ratio:.2f}x the {args.ttl} s TTL; kill -> recovery committed: mean {statistics.mean(recover):.3f} s")
    print(f"publication (DeepSeek-V3 case, plan record {size / 1024:.0f} KiB): publish (serialise + fenced txn) {pub_ms:.1f} ms vs a plain put of the same bytes "
          f"{put_ms:.1f} ms ({pub_ms / put_ms:.2f}x)")
    print(f"detect_over_ttl={ratio:.3f} publish_ms={pub_ms:.2f}")


if __name__ == "__main__":
    main()
