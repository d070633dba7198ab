"""Control-plane latencies against a real local etcd.

1. Recovery timeline: ``--kills`` times (20 by default), SIGKILL one of ``--ranks``
   ``elastic-ep agent`` processes and time, from the kill, through a watch on the
   deployment's prefix: a peer's suspicion, the registration gone (confirmed and fenced
   by the controller, or its lease expired), the routing around it (coverage: every
   expert with a live replica served again), the last ack of the recovery plan (every
   rank wrote its slots: every expert served) and the recovery commit (balanced); then
   restart it and wait until it is committed back in. Prints p50/p99/max of each phase
   next to the lease TTL, the serving pauses of each recovery plan (the longest hold of
   a rank's engine lock, and the most paused rank's total, from the acks) and the request
   stream's view (hits checked, wrong bytes, hits rerouted to a surviving replica, hits
   for experts with no live replica, summed over the ranks' published counters).
2. Plan publication for the DeepSeek-V3-sized case (58 MoE layers, 256 experts, 32
   ranks x 9 slots, one rank failed): the fenced transaction that writes the plan,
   against a plain put of the same bytes (ratio).

Last line: ``detect_p99_s=<x> coverage_p99_s=<y> commit_p99_s=<z> detect_over_ttl=<r>``.
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
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord  # noqa: E402
from elastic_ep.core.load_stats import zipf_load  # noqa: E402
from elastic_ep.core.placement import ExpertPlacement  # noqa: E402
from elastic_ep.core.plan import build_plan  # noqa: E402
from elastic_ep.core.policy import get_policy  # noqa: E402
from elastic_ep.core.rank_mapping import RankMapping  # noqa: E402
from elastic_ep.runtime.serving import plan_pauses  # noqa: E402
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint  # noqa: E402

# The demo's size (`elastic-ep demo` defaults): 4 MoE layers x 16 experts of 768 KiB, 6 slots per rank.
SPEC = SyntheticSpec(layers=4, experts=16, hidden=512, intermediate=256, dtype="bf16", shards=2, seed=1)
SLOTS = 6


def _spawn(srv: EtcdServer, rid: str, ckpt: str, ttl: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "elastic_ep.tools.cli", "agent", "--etcd", srv.endpoint, "--deployment", "bench",
         "--id", rid, "--ckpt", ckpt, "--layers", str(SPEC.layers), "--experts", str(SPEC.experts),
         "--hidden", str(SPEC.hidden), "--intermediate", str(SPEC.intermediate), "--seed", str(SPEC.seed),
         "--slots", str(SLOTS), "--lease-ttl", str(ttl)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Timeline:
    """Arrival times (monotonic) of the etcd events of one kill, from a watch on the
    deployment's prefix: the first suspicion of the victim, its registration gone, the
    routing around it, and the commit of a newer epoch."""

    def __init__(self, root: str, victim: str, token: str, epoch: int) -> None:
        self.root, self.victim, self.token, self.epoch = root, victim, token, epoch
        self.at: dict[str, float] = {}
        self.acks: dict[int, float] = {}

    def see(self, events: list) -> None:
        now = time.monotonic()
        for ev in events:
            key = ev.key.decode()
            name = None
            if key.startswith(f"{self.root}/suspects/") and key.endswith(f"/{self.victim}"):
                name = "suspected"
            elif key == f"{self.root}/ranks/{self.victim}" and type(ev).__name__ == "DeleteEvent":
                name = "confirmed"
            elif key == f"{self.root}/routing" and self.token.encode() in ev.value:
                name = "masked"
            elif key == f"{self.root}/committed" and CommitRecord.parse(key, ev.value).epoch > self.epoch:
                name = "committed"
            elif key.startswith(f"{self.root}/acks/") and type(ev).__name__ == "PutEvent":
                ack = AckRecord.parse(key, ev.value)
                if ack.epoch > self.epoch and ack.succeeded:
                    self.acks[ack.epoch] = now  # the last ack of each epoch
            if name is not None:
                self.at.setdefault(name, now)

    def finish(self, epoch: int) -> None:
        """The committed ``epoch``'s last ack: every rank wrote its slots."""
        if epoch in self.acks:
            self.at["all_served"] = self.acks[epoch]


PHASES = ("suspected", "confirmed", "masked", "all_served", "committed")
PAUSES = ("longest_s", "layer_write_s", "total_s")
SERVED = ("ok", "bad", "rerouted", "unavailable")


def detection(srv: EtcdServer, kills: int, ranks: int, ttl: int, workdir: str
              ) -> tuple[list[dict[str, float]], dict[str, int]]:
    """``kills`` times: SIGKILL one rank, time each phase of its recovery from the kill,
    then start it again and wait for it to be committed back in."""
    cfg = EtcdConfig(srv.endpoint, deployment="bench", timeout_s=2.0)
    ckpt = os.path.join(workdir, "ckpt")
    make_checkpoint(ckpt, SPEC)
    ctl = Controller(ControllerConfig(cfg, ModelShape(SPEC.layers, SPEC.experts, SLOTS, SPEC.expert_bytes),
                                      min_ranks=ranks, settle_s=0.2, leader_ttl_s=max(ttl, 2)))
    stop = threading.Event()
    threading.Thread(target=ctl.run, args=(stop,), daemon=True).start()
    procs = {f"r{i}": _spawn(srv, f"r{i}", ckpt, ttl) for i in range(ranks)}
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

    out = []
    try:
        c = wait(lambda: (n := committed()) and len(n.members) == ranks and n, 180, "bootstrap")
        time.sleep(1.0)  # peers start watching each other at the commit
        for k in range(kills):
            token = c.members[k % len(c.members)]
            victim = token.split("#")[0]
            tl = Timeline(cfg.root, victim, token, c.epoch)
            watch_id = client.add_watch_prefix_callback(cfg.root + "/", lambda r: tl.see(getattr(r, "events", [])))
            t0 = time.monotonic()
            os.kill(procs[victim].pid, signal.SIGKILL)
            c = wait(lambda: (n := committed()) and n.epoch > c.epoch and n, 60, "recovery")
            wait(lambda: "committed" in tl.at, 5, "the commit event")
            client.cancel_watch(watch_id)
            tl.finish(c.epoch)
            procs[victim].wait(10)
            out.append({p: tl.at[p] - t0 for p in PHASES if p in tl.at} | _pauses(client, cfg.root, c.epoch))
            print(f"kill {k + 1}: {victim} " + ", ".join(f"{p} +{s:.3f} s" if p in PHASES else f"{p} {s * 1e3:.2f} ms"
                                                         for p, s in out[-1].items()), flush=True)
            procs[victim] = _spawn(srv, victim, ckpt, ttl)
            c = wait(lambda: (n := committed()) and len(n.members) == ranks and n, 120, f"{victim} back")
            time.sleep(0.5)
        served = _served(client, cfg.root)
    finally:
        stop.set()
        for p in procs.values():
            p.kill()
            p.wait(10)
    return out, served


def _pauses(client, root: str, epoch: int) -> dict[str, float]:
    """Serving pauses of plan ``epoch`` from its acks (:func:`plan_pauses`)."""
    acks = [AckRecord.parse(m.key.decode(), v) for v, m in client.get_prefix(f"{root}/acks/")]
    pauses = plan_pauses(a for a in acks if a.epoch == epoch)
    return {k: pauses[k] for k in PAUSES if k in pauses}


def _served(client, root: str) -> dict[str, int]:
    """The request stream's counters summed over the ranks' load records."""
    loads = [LoadRecord.parse(m.key.decode(), v) for v, m in client.get_prefix(f"{root}/load/")]
    return {k: sum(ld.served.get(k, 0) for ld in loads) for k in SERVED}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


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
        _, meta = client.get(f"{cfg.root}/epoch")
        t = time.perf_counter()
        ctl.publish(rec, meta.mod_revision if meta is not None else 0)
        fenced.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.put(f"{cfg.root}/plain", body)
        plain.append(time.perf_counter() - t)
    return statistics.median(fenced) * 1e3, statistics.median(plain) * 1e3, len(body)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="ranks to SIGKILL, one at a time (each restarted)")
    ap.add_argument("--ranks", type=int, default=4, help="rank processes")
    ap.add_argument("--ttl", type=int, default=2, help="rank lease TTL, seconds")
    ap.add_argument("--repeats", type=int, default=10, help="plan publications to time")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="elastic-ep-bench-control-") as d, EtcdServer() as srv:
        runs, served = detection(srv, args.kills, args.ranks, args.ttl, d)
        pub_ms, put_ms, size = publication(srv, args.repeats)
    print(f"\n{'phase (from the kill)':<24}{'p50 s':>8}{'p99 s':>8}{'max s':>8}   lease TTL {args.ttl} s, {len(runs)} kills")
    stats = {}
    for p in PHASES:
        xs = [r[p] for r in runs if p in r]
        stats[p] = _pct(xs, 99)
        print(f"{p:<24}{_pct(xs, 50):>8.3f}{stats[p]:>8.3f}{max(xs, default=float('nan')):>8.3f}"
              + (f"   ({len(runs) - len(xs)} kills without this phase)" if len(xs) < len(runs) else ""))
    for p, what in zip(PAUSES, ("longest serving pause", "longest layer copy", "most paused rank, total")):
        xs = [r[p] for r in runs if p in r]
        print(f"{what:<24}{_pct(xs, 50) * 1e3:>7.2f}m{_pct(xs, 99) * 1e3:>7.2f}m{max(xs, default=float('nan')) * 1e3:>7.2f}m"
              f"   (ms; per recovery plan, from {len(xs)} plans' acks)")
    print(f"requests (live ranks' counters): {served['ok']} expert hits checked, {served['bad']} wrong bytes, "
          f"{served['rerouted']} rerouted to a surviving replica, {served['unavailable']} for experts with no "
          "live replica")
    print(f"publication (DeepSeek-V3 case, plan head {size / 1024:.0f} KiB): chunks + fenced head {pub_ms:.1f} ms "
          f"vs a plain put of the head {put_ms:.1f} ms ({pub_ms / put_ms:.2f}x)")
    print(f"detect_p99_s={stats['confirmed']:.3f} coverage_p99_s={stats['masked']:.3f} "
          f"commit_p99_s={stats['committed']:.3f} detect_over_ttl={stats['confirmed'] / args.ttl:.3f}")


if __name__ == "__main__":
    main()
