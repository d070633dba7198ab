"""Rebalance policies on a DeepSeek-V3-sized case with one rank failing.

58 MoE layers, 256 logical experts, 32 ranks x 9 slots, 8 expert groups on 4 nodes,
a Zipf-like load. The steady state is DeepSeek's hierarchical placement for that load;
then one rank dies and each policy computes the placement on 31 ranks.

Prints, all measured in this run:
- DeepSeek's EPLB: the vectorised ``elastic_ep.core.eplb`` against a straightforward loop
  implementation of the same algorithm (``bench/eplb_loop.py``): time and ratio, and
  whether their outputs agree;
- per policy: time per full rebalance, plan build time, balance (mean/max rank load),
  bytes moved across GPUs as a ratio to the lower bound (one copy of every expert left
  without a surviving replica), averaged over several failed ranks;
- min_migration's trade-off between extra moves and balance (its move budget per
  layer and the least gain a move must bring);
- fault-aware placement: per policy, without and with node labels (``node_of``, 4 nodes
  of 8 ranks), the (layer, expert) pairs whose replicas (two or more) all share one
  node, moved slots, balance and seconds, and the ratios with/without, in the same run;
  from DeepSeek's node-local placement (first spread) and from a spread one (steady);
- scale: both policies' seconds (median of ``--repeat`` runs) at DeepSeek-V3 32, 128
  and 256 ranks x 9 slots (and Kimi-K2, 60 layers x 384 experts, at 128 x 4 with
  ``--kimi``), one rank failing, with balance, moved bytes (GiB, and over the lower
  bound), and min_migration's time as a ratio to deepseek's, run in the same process
  on the same inputs as the baseline.

Last line: ``moved_bytes_ratio_min_migration=<x> moved_bytes_ratio_deepseek=<y> policy_speedup=<z>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.eplb_loop import rebalance_loop  # noqa: E402
from elastic_ep.core.eplb import rebalance_experts  # noqa: E402
from elastic_ep.core.fault_domains import shared_node_experts  # noqa: E402
from elastic_ep.core.load_stats import zipf_load  # noqa: E402
from elastic_ep.core.placement import ExpertPlacement, balance  # noqa: E402
from elastic_ep.core.plan import build_plan, lower_bound_bytes, moved_bytes  # noqa: E402
from elastic_ep.core.policy import DeepSeekPolicy, MinMigrationPolicy, RebalancePolicy  # noqa: E402
from elastic_ep.core.rank_mapping import RankMapping  # noqa: E402

EXPERT_BYTES = 88_080_384  # DeepSeek-V3 expert, bf16


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--zipf", type=float, default=0.6)
    ap.add_argument("--failures", type=int, default=4, help="failed ranks to average over (one at a time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=4, help="nodes of the steady-state placement (1: global)")
    ap.add_argument("--no-scale", dest="scale", action="store_false", help="skip the 32/128/256-rank timings")
    ap.add_argument("--kimi", action="store_true", help="add Kimi-K2 (60 x 384 experts) at 128 x 4 to the scale timings")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scale timing (the median is shown)")
    args = ap.parse_args()
    L, E, R, S, G, N = args.layers, 256, 32, 9, 8, args.nodes
    print(f"case: {L} layers x {E} experts, {R} ranks x {S} slots, {G} groups, {N} nodes, "
          f"Zipf({args.zipf}) load, seed {args.seed}, torch threads {torch.get_num_threads()}")
    load = zipf_load(L, E, args.zipf, args.seed)

    # DeepSeek's EPLB: vectorised against the loop implementation, same inputs.
    t_vec, vec = timed(lambda: rebalance_experts(load, R * S, G, N, R), 5)
    t_loop, ref = timed(lambda: rebalance_loop(torch.from_numpy(load), R * S, G, N, R), 1)
    same = all(torch.equal(a, b) for a, b in zip(vec, ref))
    speedup = t_loop / t_vec
    print(f"\nrebalance_experts (hierarchical, {R} GPUs): vectorised {t_vec * 1e3:.1f} ms, "
          f"loop {t_loop * 1e3:.0f} ms, speedup {speedup:.1f}x, outputs identical: {same}")
    if not same:
        raise SystemExit("vectorised and loop outputs differ")

    old = ExpertPlacement(vec[0], S, E)
    rng = np.random.default_rng(args.seed)
    failed = sorted(rng.choice(R, args.failures, replace=False).tolist())
    policies: list[tuple[str, RebalancePolicy]] = [
        ("deepseek", DeepSeekPolicy(num_groups=G, num_nodes=N)),
        ("min_migration", MinMigrationPolicy()),
    ]
    # The trade-off: (max_moves_per_layer, min_gain) from none to unbounded.
    for budget, gain in ((0, 0.01), (16, 0.005), (32, 0.0)):
        policies.append((f"min_mig[{budget},{gain}]", MinMigrationPolicy(min_gain=gain, max_moves_per_layer=budget)))

    rows: dict[str, dict[str, list[float]]] = {name: {} for name, _ in policies}
    for dead in failed:
        m = RankMapping.build(R, dead=[dead])
        lb = lower_bound_bytes(old, m, EXPERT_BYTES)
        for name, policy in policies:
            t_pol, new = timed(lambda: policy.rebalance(old, m, load), 3)
            t_plan, plan = timed(lambda: build_plan(old, new, m, EXPERT_BYTES, epoch=1), 3)
            r = rows[name]
            for key, val in (("policy_ms", t_pol * 1e3), ("plan_ms", t_plan * 1e3),
                             ("balance", balance(new, load)), ("moved_gib", moved_bytes(plan) / 2**30),
                             ("lb_gib", lb / 2**30), ("ratio", moved_bytes(plan) / lb)):
                r.setdefault(key, []).append(val)

    print(f"\none rank failing, averaged over ranks {failed}; balance before: {balance(old, load):.3f}")
    print(f"{'policy':<20}{'policy ms':>10}{'plan ms':>9}{'balance':>9}{'moved GiB':>11}{'lower bd GiB':>13}{'moved/lb':>9}")
    for name, _ in policies:
        r = {k: statistics.mean(v) for k, v in rows[name].items()}
        print(f"{name:<20}{r['policy_ms']:>10.1f}{r['plan_ms']:>9.1f}{r['balance']:>9.3f}"
              f"{r['moved_gib']:>11.1f}{r['lb_gib']:>13.1f}{r['ratio']:>9.2f}")
    mm = statistics.mean(rows["min_migration"]["ratio"])
    ds = statistics.mean(rows["deepseek"]["ratio"])
    print(f"\nmin_migration moves {ds / mm:.1f}x fewer bytes than deepseek; balance "
          f"{statistics.mean(rows['min_migration']['balance']):.3f} vs {statistics.mean(rows['deepseek']['balance']):.3f}")
    spread(old, load, R, N, G, failed[0])
    if args.scale:
        scale(args.kimi, args.seed, args.repeat)
    print(f"moved_bytes_ratio_min_migration={mm:.3f} moved_bytes_ratio_deepseek={ds:.3f} policy_speedup={speedup:.1f}")


def spread(old: ExpertPlacement, load: np.ndarray, R: int, N: int, G: int, dead: int) -> None:
    """Each policy without and with node labels, one rank failing: shared-node pairs,
    moved slots, balance, seconds; first from ``old`` (DeepSeek's node-local placement),
    then from a placement already spread (the steady state)."""
    nodes = [f"n{r * N // R}" for r in range(R)]
    m = RankMapping.build(R, dead=[dead])
    node_of = [nodes[o] for o in m.new_to_old()]
    steady = DeepSeekPolicy(num_groups=G, num_nodes=N).rebalance(old, RankMapping.build(R), load, node_of=nodes)
    print(f"\nfault-aware placement: {N} nodes, rank {dead} failing; shared: (layer, expert) pairs with >= 2 "
          "replicas all on one node (after); x: with labels over without")
    print(f"{'from':<11}{'policy':<15}{'shared':>15}{'moved slots':>17}{'x':>6}{'balance':>16}{'seconds':>16}{'x':>6}")
    for start, base in (("node-local", old), ("spread", steady)):
        for name, policy in (("deepseek", DeepSeekPolicy(num_groups=G, num_nodes=N)), ("min_migration", MinMigrationPolicy())):
            (t0, a), (t1, b) = (timed(lambda: policy.rebalance(base, m, load, nodes=N, node_of=lab), 3)
                                for lab in (None, node_of))
            mv = [moved_bytes(build_plan(base, p, m, 1, epoch=1)) for p in (a, b)]
            print(f"{start:<11}{name:<15}{shared_node_experts(a, node_of):>7} -> {shared_node_experts(b, node_of):<5}"
                  f"{mv[0]:>8} -> {mv[1]:<6}{mv[1] / max(mv[0], 1):>6.2f}{balance(a, load):>8.3f} -> "
                  f"{balance(b, load):.3f}{t0:>8.3f} -> {t1:.3f}{t1 / t0:>6.2f}")


def scale(kimi: bool, seed: int, repeat: int) -> None:
    """Policy seconds as the deployment grows (one failed rank, median of ``repeat`` runs)."""
    cases = [("DeepSeek-V3", 58, 256, r, 9, 8) for r in (32, 128, 256)]
    if kimi:
        cases.append(("Kimi-K2", 60, 384, 128, 4, 1))
    print(f"\nscale: one rank failing, median of {repeat} runs; /deepseek: seconds over deepseek's on the same "
          "inputs; moved/lb: moved bytes over the lower bound (- when it is 0)")
    print(f"{'model':<12}{'ranks':>6}{'policy':>15}{'seconds':>9}{'/deepseek':>10}{'balance':>9}{'moved GiB':>11}"
          f"{'moved/lb':>10}")
    for model, L, E, R, S, G in cases:
        load = zipf_load(L, E, 0.6, seed)
        old = ExpertPlacement(rebalance_experts(load, R * S, G, 4 if G % 4 == 0 else 1, R)[0], S, E)
        m = RankMapping.build(R, dead=[R // 2])
        lb = lower_bound_bytes(old, m, EXPERT_BYTES)
        base = None
        for name, policy in (("deepseek", DeepSeekPolicy(num_groups=G, num_nodes=4)), ("min_migration", MinMigrationPolicy())):
            t, new = timed(lambda: policy.rebalance(old, m, load), repeat)
            base = base or t
            moved = moved_bytes(build_plan(old, new, m, EXPERT_BYTES, epoch=1))
            ratio = f"{moved / lb:.2f}" if lb else "-"
            print(f"{model:<12}{R:>6}{name:>15}{t:>9.3f}{t / base:>10.2f}{balance(new, load):>9.3f}"
                  f"{moved / 2**30:>11.1f}{ratio:>10}")


if __name__ == "__main__":
    main()
