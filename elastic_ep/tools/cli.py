"""The ``elastic-ep`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Sequence

import numpy as np

from elastic_ep.errors import ElasticEPError
from elastic_ep.core.load_stats import zipf_load
from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.core.placement import ExpertPlacement, balance
from elastic_ep.core.plan import build_plan, lower_bound_bytes, moved_bytes
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping

# DeepSeek-V3: 58 MoE layers, 256 routed experts, one bf16 expert = 3 x 2048 x 7168 x 2 B.
DSV3_EXPERT_BYTES = 88_080_384


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def cmd_plan(args: argparse.Namespace) -> int:
    """Walk through one membership change on a synthetic load: the steady-state
    DeepSeek placement, ranks failing / leaving / joining, the new placement from the
    chosen policy, and the transfer plan's summary."""
    L, E, R, S = args.layers, args.experts, args.ranks, args.slots
    load = zipf_load(L, E, args.zipf, args.seed)
    rng = np.random.default_rng(args.seed)
    dead = args.dead if args.dead is not None else sorted(rng.choice(R, args.fail, replace=False).tolist())
    leaving = args.leave or []
    t0 = time.perf_counter()
    old = ExpertPlacement(rebalance_experts(load, R * S, args.groups, args.nodes, R)[0], S, E)
    t1 = time.perf_counter()
    mapping = RankMapping.build(R, dead=dead, leaving=leaving, num_joining=args.join)
    options = {"num_groups": args.groups, "num_nodes": args.nodes} if args.policy == "deepseek" else {}
    new = get_policy(args.policy, **options).rebalance(old, mapping, load)
    t2 = time.perf_counter()
    plan = build_plan(old, new, mapping, args.expert_bytes, epoch=1)
    t3 = time.perf_counter()
    s = plan.summary()
    lb = lower_bound_bytes(old, mapping, args.expert_bytes)
    result = {
        "config": {"layers": L, "experts": E, "ranks": R, "slots_per_rank": S, "groups": args.groups,
                   "nodes": args.nodes, "policy": args.policy, "seed": args.seed},
        "dead": dead, "leaving": leaving, "joining": args.join,
        "balance_before": balance(old, load), "balance_after": balance(new, load),
        "bytes": s["bytes"], "moved_bytes": moved_bytes(plan), "lower_bound_bytes": lb,
        "transfers": s["transfers"], "missing_experts": s["missing_experts"],
        "seconds": {"initial_placement": t1 - t0, "policy": t2 - t1, "plan": t3 - t2},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {L} MoE layers x {E} experts, {R} ranks x {S} slots ({R * S - E} redundant), "
          f"{args.groups} groups on {args.nodes} nodes; Zipf({args.zipf}) load, seed {args.seed}")
    print(f"change: dead {dead}, leaving {leaving}, joining {args.join} -> {mapping.new_ep_size} ranks")
    print(f"policy {args.policy}: balance (mean/max rank load) {result['balance_before']:.3f} -> "
          f"{result['balance_after']:.3f}; {result['seconds']['policy'] * 1e3:.1f} ms, plan "
          f"{result['seconds']['plan'] * 1e3:.1f} ms")
    print(f"transfers: {s['transfers']} slots, {s['missing_experts']} (layer, expert) pairs with no live replica")
    print(f"{'route':<8}{'bytes':>14}")
    for route, b in s["bytes"].items():
        print(f"{route:<8}{_fmt_bytes(b):>14}")
    ratio = moved_bytes(plan) / lb if lb else float("nan")
    print(f"moved {_fmt_bytes(moved_bytes(plan))} across GPUs = {ratio:.2f} x the lower bound {_fmt_bytes(lb)}")
    busiest = sorted(s["bytes_by_dst_rank"].items(), key=lambda kv: -sum(kv[1].values()))[:4]
    print("busiest destination ranks: " + ", ".join(
        f"{r}: " + "/".join(_fmt_bytes(v[k]) for k in ("local", "peer", "disk")) for r, v in busiest
    ) + " (local/peer/disk)")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    """Write a deterministic synthetic MoE checkpoint and say what was written."""
    from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

    spec = SyntheticSpec(
        layers=args.layers, experts=args.experts, hidden=args.hidden, intermediate=args.intermediate,
        dtype=args.dtype, shards=args.shards, seed=args.seed, scheme=args.scheme,
        dense_layers=args.dense_layers,
    )
    out = make_checkpoint(args.dir, spec)
    for path, size in out.files:
        print(f"{path}  {_fmt_bytes(size)}")
    print(f"{len(out.files)} files, {out.tensors} tensors, {_fmt_bytes(out.tensor_bytes)} of tensors; "
          f"{spec.layers} MoE layers (checkpoint layers {spec.moe_layer_ids[0]}..{spec.moe_layer_ids[-1]}) "
          f"x {spec.experts} experts, expert_bytes={out.expert_bytes}, scheme {args.scheme}, dtype {args.dtype}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """What elastic-ep sees in a Hugging Face model directory."""
    from elastic_ep.tools.control_commands import parse_templates
    from loaders.checkpoint.hf_model import open_model

    m = open_model(args.model_dir, templates=parse_templates(args.template))
    d = m.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    ids = d["moe_layers"]
    print(f"model: {m.directory} ({m.architecture}, family {m.family})")
    print(f"quantization: {m.quantization}")
    print(f"MoE layers: {len(ids)} (model layers {_ranges(ids)})")
    print(f"routed experts per MoE layer: {m.experts}; {_fmt_bytes(d['routed_expert_bytes'])} of routed experts")
    tensors = d["expert_tensors"]
    print(f"one expert: {_fmt_bytes(m.expert_bytes)} ({m.expert_bytes} B) in {len(tensors)} tensors"
          + (" (slice [expert] of stacked tensors)" if m.naming.stacked else ""))
    for t in tensors:
        print(f"  {t['name']:<64} {t['dtype']:<8} {str(t['shape']):<18} -> {t['serving_tensor']}")
    print("serving layout (one slot): " + ", ".join(
        f"{t['name']} {t['dtype']} {t['row_shape']}" for t in d["serving_layout"]))
    print("left out:" + ("" if d["left_out"] else " nothing"))
    for x in d["left_out"]:
        print(f"  {x['what']}: {x['why']}")
    print(f"checked: {d['tensors_checked']} expert tensors (names, shapes, dtypes) across every MoE layer")
    return 0


def _ranges(ids: list[int]) -> str:
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastic-ep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="walk through one membership change and print the transfer plan summary")
    plan.add_argument("--layers", type=int, default=58)
    plan.add_argument("--experts", type=int, default=256)
    plan.add_argument("--ranks", type=int, default=32)
    plan.add_argument("--slots", type=int, default=9, help="slots per rank")
    plan.add_argument("--groups", type=int, default=8, help="expert groups (DeepSeek-V3: 8)")
    plan.add_argument("--nodes", type=int, default=4)
    plan.add_argument("--fail", type=int, default=1, help="ranks that die, chosen by --seed")
    plan.add_argument("--dead", type=int, nargs="*", help="ranks that die (overrides --fail)")
    plan.add_argument("--leave", type=int, nargs="*", help="ranks that drain out gracefully")
    plan.add_argument("--join", type=int, default=0, help="ranks that join")
    plan.add_argument("--policy", default="min_migration", choices=["min_migration", "deepseek"])
    plan.add_argument("--zipf", type=float, default=0.6, help="load skew exponent")
    plan.add_argument("--expert-bytes", type=int, default=DSV3_EXPERT_BYTES)
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    # Choices are spelled out here so that --help works without importing torch.
    mk = sub.add_parser("make-checkpoint", help="write a deterministic synthetic MoE safetensors checkpoint")
    mk.add_argument("dir", help="directory to write into (created; must hold no checkpoint yet)")
    mk.add_argument("--layers", type=int, default=2, help="MoE layers")
    mk.add_argument("--experts", type=int, default=8, help="logical experts per MoE layer")
    mk.add_argument("--hidden", type=int, default=64)
    mk.add_argument("--intermediate", type=int, default=32)
    mk.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                    help="fp8: e4m3 weights with float32 weight_scale_inv blocks of 128")
    mk.add_argument("--shards", type=int, default=1, help="files; more than 1 adds model.safetensors.index.json")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--scheme", default="deepseek", choices=["deepseek", "qwen", "mixtral"])
    mk.add_argument("--dense-layers", type=int, default=0, help="dense layers before the first MoE layer")
    mk.set_defaults(func=cmd_make_checkpoint)

    ins = sub.add_parser("inspect", help="the routed experts of a Hugging Face model directory")
    ins.add_argument("model_dir", help="directory with config.json and the safetensors files")
    ins.add_argument("--template", action="append", metavar="ROLE=PATH",
                     help="for an architecture elastic-ep does not know: where each of gate, up, down is, "
                          "e.g. gate=model.layers.{layer}.moe.experts.{expert}.w_in (repeat per role)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=cmd_inspect)

    from elastic_ep.tools.control_commands import add_commands

    from elastic_ep.tools.demo import add_command as add_demo

    add_commands(sub)
    add_demo(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # `elastic-ep inspect DIR | head`: stop quietly when the reader goes away.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ElasticEPError as e:
        print(f"elastic-ep: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
