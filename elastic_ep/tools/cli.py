"""The ``elastic-ep`` command line: ``plan``, ``make-checkpoint``, ``inspect``,
``controller``, ``agent``, ``status`` and ``demo``. Every flag is defined once here;
the container entry point (:mod:`elastic_ep.tools.entrypoint`) turns the environment
into these flags."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from controller.etcd_client import EtcdConfig
from elastic_ep.errors import ConfigError, ElasticEPError
from elastic_ep.core.load_stats import zipf_load
from elastic_ep.core.eplb import rebalance_experts
from elastic_ep.core.placement import ExpertPlacement, balance
from elastic_ep.core.plan import build_plan, lower_bound_bytes, moved_bytes
from elastic_ep.core.policy import get_policy
from elastic_ep.core.rank_mapping import RankMapping

# DeepSeek-V3: 58 MoE layers, 256 routed experts, one bf16 expert = 3 x 2048 x 7168 x 2 B.
DSV3_EXPERT_BYTES = 88_080_384


class _Parser(argparse.ArgumentParser):
    """Usage errors in the CLI's one error format (``elastic-ep: ConfigError: ...``),
    exit status 2, as argparse does."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"elastic-ep: ConfigError: {self.prog}: {message}; see {self.prog} --help\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``low..high``, e.g. ``int_in(1)`` for counts
    that must be positive; argparse names the flag in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            want = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    return parse


def float_in(low: float, high: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= low`` (``> low`` when ``above``) and
    ``<= high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)
        if not ok:
            want = f"a number {'>' if above else '>='} {low}" + ("" if high is None else f" and <= {high}")
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    return parse


POSITIVE = int_in(1)
COUNT = int_in(0)
SEED = int_in(0, 2**63 - 1)
"""numpy's generators take non-negative seeds."""


def require(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem found in the flags."""
    if problems:
        raise ConfigError("; ".join(problems))


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
    check_plan_args(args)
    L, E, R, S = args.layers, args.experts, args.ranks, args.slots
    load = zipf_load(L, E, args.zipf, args.seed)
    rng = np.random.default_rng(args.seed)
    leaving = args.leave or []
    pool = [r for r in range(R) if r not in leaving]
    dead = args.dead if args.dead is not None else sorted(rng.choice(pool, args.fail, replace=False).tolist())
    t0 = time.perf_counter()
    old = ExpertPlacement(rebalance_experts(load, R * S, args.groups, args.nodes, R)[0], S, E)
    t1 = time.perf_counter()
    mapping = RankMapping.build(R, dead=dead, leaving=leaving, num_joining=args.join)
    options = {"num_groups": args.groups, "num_nodes": args.nodes} if args.policy == "deepseek" else {}
    new = get_policy(args.policy, **options).rebalance(old, mapping, load)
    t2 = time.perf_counter()
    mirrors = _plan_mirrors(args, old, load)
    plan = build_plan(old, new, mapping, args.expert_bytes, epoch=1, mirrors=mirrors["assignment"] if mirrors else None)
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
    if mirrors:
        result["mirrors"] = {k: v for k, v in mirrors.items() if k != "assignment"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {L} MoE layers x {E} experts, {R} ranks x {S} slots ({R * S - E} redundant), "
          f"{args.groups} groups on {args.nodes} nodes; Zipf({args.zipf}) load, seed {args.seed}")
    print(f"change: dead {dead}, leaving {leaving}, joining {args.join} -> {mapping.new_ep_size} ranks")
    print(f"policy {args.policy}: balance (mean/max rank load) {result['balance_before']:.3f} -> "
          f"{result['balance_after']:.3f}; {result['seconds']['policy'] * 1e3:.1f} ms, plan "
          f"{result['seconds']['plan'] * 1e3:.1f} ms")
    print(f"transfers: {s['transfers']} slots, {s['missing_experts']} (layer, expert) pairs from disk (neither a live "
          "replica nor a ready mirror)")
    print(f"{'route':<8}{'bytes':>14}")
    for route, b in s["bytes"].items():
        print(f"{route:<8}{_fmt_bytes(b):>14}")
    if mirrors:
        m = mirrors
        print(f"mirrors: {_fmt_bytes(m['budget_bytes'])} of host memory per rank = {m['rows_per_rank']} experts; "
              f"{m['assigned']} assigned; worst single node loss ({m['worst_node'] or '-'}): {m['worst_experts']} "
              f"experts ({_fmt_bytes(m['worst_bytes'])}) from disk; no disk read for any node loss from "
              f"{_fmt_bytes(m['min_budget_bytes'])} per rank")
    ratio = moved_bytes(plan) / lb if lb else float("nan")
    print(f"moved {_fmt_bytes(moved_bytes(plan))} across GPUs = {ratio:.2f} x the lower bound {_fmt_bytes(lb)}")
    busiest = sorted(s["bytes_by_dst_rank"].items(), key=lambda kv: -sum(kv[1].values()))[:4]
    print("busiest destination ranks: " + ", ".join(
        f"{r}: " + "/".join(_fmt_bytes(v[k]) for k in ROUTE_NAMES) for r, v in busiest
    ) + " (" + "/".join(ROUTE_NAMES) + ")")
    return 0


def _plan_mirrors(args: argparse.Namespace, old: Any, load: Any) -> dict[str, Any] | None:
    """``plan --mirror-budget-gib``: the mirrors that budget buys on the steady-state
    placement (ranks ``r`` on node ``r * nodes // ranks``), every one taken as ready."""
    from elastic_ep.core.mirrors import assign_mirrors, min_mirror_rows, worst_domain_loss

    if args.mirror_budget_gib <= 0:
        return None
    R, eb = args.ranks, args.expert_bytes
    node_of = [f"node-{r * args.nodes // R}" for r in range(R)]
    rows = min(int(args.mirror_budget_gib * GiB) // eb, args.layers * args.experts)
    assignment = assign_mirrors(old, node_of, [rows] * R, load)
    loss = worst_domain_loss(old, node_of, assignment)
    least = min_mirror_rows(old, node_of)
    return {"assignment": assignment, "budget_bytes": int(args.mirror_budget_gib * GiB), "rows_per_rank": rows,
            "assigned": assignment.count(), "worst_node": loss.label, "worst_experts": loss.experts,
            "worst_bytes": loss.experts * eb, "min_budget_bytes": least * eb}


def _rank_list_problems(flag: str, ranks: list[int], num_ranks: int) -> list[str]:
    """Duplicates and ranks outside ``0..num_ranks-1`` in ``--dead``/``--leave``."""
    out = []
    twice = sorted({r for r in ranks if ranks.count(r) > 1})
    if twice:
        out.append(f"{flag} lists ranks {twice} more than once: list each rank once")
    outside = sorted({r for r in ranks if not 0 <= r < num_ranks})
    if outside:
        out.append(f"{flag} ranks {outside} are outside 0..{num_ranks - 1} (--ranks {num_ranks})")
    return out


def check_plan_args(args: argparse.Namespace) -> None:
    """What ``plan``'s flags must agree on; one :class:`ConfigError` listing every problem,
    each naming its flags and the fix."""
    require(_change_problems(args) + _shape_problems(args))


def _change_problems(args: argparse.Namespace) -> list[str]:
    """``--dead``/``--fail``, ``--leave`` and ``--join`` against ``--ranks``."""
    R, dead, leaving = args.ranks, args.dead, args.leave or []
    problems = _rank_list_problems("--leave", leaving, R)
    if dead is not None:
        problems += _rank_list_problems("--dead", dead, R)
        both = sorted(set(dead) & set(leaving))
        if both:
            problems.append(f"ranks {both} are in both --dead and --leave: a rank either dies or leaves")
    elif args.fail > R - len(set(leaving)):
        problems.append(f"--fail {args.fail} is more than the {R - len(set(leaving))} ranks of --ranks {R} "
                        "that are not leaving: fail fewer ranks")
    return problems


def _shape_problems(args: argparse.Namespace) -> list[str]:
    """Slots for every expert before and after the change; the balancer's divisibility."""
    R, S, E, leaving = args.ranks, args.slots, args.experts, set(args.leave or [])
    problems = []
    if R * S < E:
        problems.append(f"--ranks {R} x --slots {S} = {R * S} slots cannot hold --experts {E}: add ranks or slots")
    removed = len(set(args.dead) | leaving) if args.dead is not None else args.fail + len(leaving)
    left = R - removed + args.join
    if left < 1:
        problems.append(f"no rank is left after the change: --ranks {R}, {removed} dead or leaving, "
                        f"--join {args.join}: fail fewer ranks or join more")
    elif left * S < E <= R * S:
        problems.append(f"after the change {left} ranks x --slots {S} = {left * S} slots cannot hold --experts {E}: "
                        "fail fewer ranks, --join more or add --slots")
    if args.groups % args.nodes == 0:  # the hierarchical balancer's preconditions
        if E % args.groups:
            problems.append(f"--experts {E} is not a multiple of --groups {args.groups}: change either")
        if R % args.nodes:
            problems.append(f"--ranks {R} is not a multiple of --nodes {args.nodes}: change either")
    return problems


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    """Write a deterministic synthetic MoE checkpoint and say what was written."""
    from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

    spec = SyntheticSpec(
        layers=args.layers, experts=args.experts, hidden=args.hidden, intermediate=args.intermediate,
        dtype=args.dtype, shards=args.shards, seed=args.seed, scheme=args.scheme,
        dense_layers=args.dense_layers,
    )
    out = make_checkpoint(args.dir, spec, force=args.force)
    for path, size in out.files:
        print(f"{path}  {_fmt_bytes(size)}")
    print(f"{len(out.files)} files, {out.tensors} tensors, {_fmt_bytes(out.tensor_bytes)} of tensors; "
          f"{spec.layers} MoE layers (checkpoint layers {spec.moe_layer_ids[0]}..{spec.moe_layer_ids[-1]}) "
          f"x {spec.experts} experts, expert_bytes={out.expert_bytes}, scheme {args.scheme}, dtype {args.dtype}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """What elastic-ep sees in a Hugging Face model directory."""
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


def add_etcd_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd")
    g.add_argument("--etcd", default="127.0.0.1:2379", help="host:port")
    g.add_argument("--prefix", default="/elastic-ep")
    g.add_argument("--deployment", default="default")
    g.add_argument("--etcd-ca", help="CA certificate (PEM) to check the server")
    g.add_argument("--etcd-cert", help="client certificate (PEM)")
    g.add_argument("--etcd-key", help="client key (PEM)")
    g.add_argument("--etcd-user")
    g.add_argument("--etcd-password-file", help="file holding the password (or set ELASTIC_EP_ETCD_PASSWORD)")


def etcd_config(args: argparse.Namespace) -> EtcdConfig:
    password = os.environ.get("ELASTIC_EP_ETCD_PASSWORD")
    if args.etcd_password_file:
        try:
            with open(args.etcd_password_file) as f:
                password = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--etcd-password-file {args.etcd_password_file}: {e}") from e
    return EtcdConfig(args.etcd, args.prefix, args.deployment, args.etcd_ca, args.etcd_cert, args.etcd_key,
                      args.etcd_user, password if args.etcd_user else None)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.controller import Controller, ControllerConfig
    from controller.metrics import ControllerMetrics, serve

    _logging(args.verbose)
    metrics = ControllerMetrics()
    shape = model_shape(args)
    if args.min_ranks * shape.slots_per_rank < shape.num_logical:
        raise ConfigError(f"--min-ranks {args.min_ranks} x --slots {shape.slots_per_rank} slots cannot hold the "
                          f"{shape.num_logical} experts of a layer: raise --min-ranks or --slots")
    # Given only when set, so the controller's own default applies otherwise.
    joiners = {} if args.max_joiners is None else {"max_joiners_per_plan": args.max_joiners}
    cfg = ControllerConfig(
        etcd_config(args), shape, id=args.id,
        min_ranks=args.min_ranks, policy=args.policy, settle_s=args.settle, leader_ttl_s=args.leader_ttl,
        imbalance_threshold=args.imbalance_threshold, **joiners,
    )
    ctl = Controller(cfg, metrics=metrics)
    if args.metrics_port >= 0:
        srv = serve(metrics, args.metrics_host, args.metrics_port)
        logging.info("metrics and health on http://%s:%d/metrics /healthz", args.metrics_host, srv.server_port)
    ctl.run(_stop_on_signals())
    return 0


def model_shape(args: argparse.Namespace) -> Any:
    """The placement's shape: from ``--model DIR`` (read like ``elastic-ep inspect``),
    or from ``--layers --experts --expert-bytes``."""
    from controller.controller import ModelShape

    if args.model:
        from loaders.checkpoint.hf_model import open_model

        m = open_model(args.model, templates=parse_templates(args.template))
        return ModelShape(m.layers, m.experts, args.slots, m.expert_bytes)
    missing = [f"--{k.replace('_', '-')}" for k in ("layers", "experts", "expert_bytes") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"give --model MODEL_DIR, or all of {missing} (the placement's shape)")
    return ModelShape(args.layers, args.experts, args.slots, args.expert_bytes)


def parse_templates(items: list[str] | None) -> dict[str, str] | None:
    """``["gate=a.{layer}.{expert}.w1", ...]`` -> role -> module path template."""
    if not items:
        return None
    out = {}
    for item in items:
        role, sep, template = item.partition("=")
        if not sep or not role or not template:
            raise ConfigError(f"--template {item!r}: expected ROLE=MODULE_PATH, e.g. "
                              "gate=model.layers.{layer}.moe.experts.{expert}.w_in")
        out[role] = template
    return out


def cmd_agent(args: argparse.Namespace) -> int:
    from elastic_ep.tools.synthetic_rank import SyntheticRank, run_agent
    from loaders.checkpoint.synthetic import SyntheticSpec

    _logging(args.verbose)
    if args.model:
        from loaders.checkpoint.hf_model import open_model

        spec: Any = open_model(args.model, templates=parse_templates(args.template))
        ckpt = args.model
    else:
        spec = SyntheticSpec(layers=args.layers, experts=args.experts, hidden=args.hidden,
                             intermediate=args.intermediate, dtype=args.dtype, seed=args.seed,
                             dense_layers=args.dense_layers)
        ckpt = args.ckpt
    rank = SyntheticRank(etcd_config(args), args.id, ckpt, spec, args.slots, args.transport, args.lease_ttl,
                         node=args.node, routes=tuple(args.routes), check=not args.no_check, load_seed=args.seed,
                         cut_links=tuple(args.drop_heartbeats_from), mirror_bytes=int(args.mirror_budget_gib * GiB),
                         mirror_fill_bytes_s=args.mirror_fill_mbps * 1e6)
    run_agent(rank, stop=_stop_on_signals())
    return 0


def status(cfg: EtcdConfig) -> dict[str, Any]:
    """The deployment as one JSON-able object: ranks, epochs, leader, last commit."""
    from controller.coverage import mirror_coverage
    from controller.etcd_client import connect
    from controller.view import read_view

    v = read_view(connect(cfg), cfg.root)
    c = v.committed
    cov = mirror_coverage(v)
    mirror = {m.id: m for m in cov.ranks}
    ranks = [{"id": r.id, "state": r.state, "rank": v.rank_of(r.id), "host": r.host, "node": r.node,
              "device": r.device, "pid": r.pid, "mirror_rows": r.mirror_rows,
              "mirror_ready": mirror[r.id].ready if r.id in mirror else 0}
             for r in sorted(v.ranks.values(), key=lambda r: r.id)]
    eb = c.expert_bytes if c is not None else 0
    return {
        "leader": v.leader, "epoch": v.epoch, "committed_epoch": c.epoch if c else None,
        "in_flight": v.in_flight,
        "last_rebalance": {"phases": c.phases, "bytes": c.bytes} if c else None,
        "ranks": ranks, "expert_bytes": eb, "mirrors": cov.to_dict(eb), "malformed": v.malformed,
    }


def cmd_status(args: argparse.Namespace) -> int:
    s = status(etcd_config(args))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"leader {s['leader']}  epoch {s['epoch']}  committed {s['committed_epoch']}"
          + ("  (plan in flight)" if s["in_flight"] else ""))
    eb = s["expert_bytes"]
    print(f"{'id':<16} {'state':<9} {'rank':>4}  {'node':<10} {'device':<8} {'mirror (ready/rows, bytes)':<28} host")
    for r in s["ranks"]:
        rank = "-" if r["rank"] is None else str(r["rank"])
        mirror = f"{r['mirror_ready']}/{r['mirror_rows']}, {_fmt_bytes(r['mirror_rows'] * eb)}" if r["mirror_rows"] else "-"
        print(f"{r['id']:<16} {r['state']:<9} {rank:>4}  {r['node']:<10} {r['device']:<8} {mirror:<28} {r['host']}")
    w = s["mirrors"]["worst_loss"]
    if s["committed_epoch"] is not None:
        print(f"worst single {w['kind']} loss: {w['label'] or '-'}, {w['experts']} experts ({_fmt_bytes(w['bytes'])}) "
              f"with neither a GPU replica nor a ready mirror elsewhere would come from disk"
              + (f"; {s['mirrors']['pending']} mirror rows still filling" if s["mirrors"]["pending"] else ""))
    if s["last_rebalance"]:
        ph = ", ".join(f"{k} {v:.3f} s" for k, v in s["last_rebalance"]["phases"].items())
        print(f"last rebalance: {ph}; bytes {s['last_rebalance']['bytes']}")
    for m in s["malformed"]:
        print(f"malformed: {m}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from elastic_ep.tools import demo

    return demo.cmd_demo(args)


def add_template_arg(p: Any) -> None:
    p.add_argument("--template", action="append", metavar="ROLE=PATH",
                   help="for an architecture elastic-ep does not know: where each of gate, up, down is, "
                        "e.g. gate=model.layers.{layer}.moe.experts.{expert}.w_in (repeat per role)")


def add_model_args(p: argparse.ArgumentParser, group: Any = None) -> None:
    """``--model MODEL_DIR`` (in ``group`` when given, e.g. a mutually exclusive one)
    and ``--template``."""
    (group or p).add_argument("--model", metavar="MODEL_DIR",
                              help="Hugging Face model directory (config.json and safetensors files)")
    add_template_arg(p)


def add_control_commands(sub: Any) -> None:
    c = sub.add_parser("controller", help="run a controller replica (one leader is elected)")
    add_etcd_args(c)
    c.add_argument("--id", default=f"controller-{os.getpid()}")
    add_model_args(c)
    c.add_argument("--layers", type=POSITIVE, help="MoE layers (without --model)")
    c.add_argument("--experts", type=POSITIVE, help="logical experts per layer (without --model)")
    c.add_argument("--slots", type=POSITIVE, required=True, help="slots per rank")
    c.add_argument("--expert-bytes", type=POSITIVE, help="bytes of one expert (without --model)")
    c.add_argument("--min-ranks", type=POSITIVE, default=1, help="ranks to wait for before the first placement")
    c.add_argument("--max-joiners", type=POSITIVE, help="ranks one plan adds at most; more wait for the next "
                                                       "plan (default: the controller's)")
    c.add_argument("--policy", default="min_migration", choices=["min_migration", "deepseek"])
    c.add_argument("--settle", type=float_in(0), default=1.0, help="seconds a change must hold before planning")
    c.add_argument("--leader-ttl", type=POSITIVE, default=3, help="seconds of the leader lease (etcd: whole seconds)")
    c.add_argument("--imbalance-threshold", type=float_in(0, 1), default=0.0,
                   help="rebalance below this balance (0: off)")
    c.add_argument("--metrics-host", default="127.0.0.1")
    c.add_argument("--metrics-port", type=int_in(-1, 65535), default=9400, help="-1: no endpoint, 0: any free port")
    c.add_argument("-v", "--verbose", action="store_true")
    c.set_defaults(func=cmd_controller)

    a = sub.add_parser("agent", help="run a stand-alone rank holding a model's experts in CPU tensors")
    add_etcd_args(a)
    a.add_argument("--id", required=True)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="synthetic checkpoint directory (elastic-ep make-checkpoint; with "
                                    "--layers --experts --hidden --intermediate --dtype --seed --dense-layers)")
    add_model_args(a, src)
    a.add_argument("--layers", type=POSITIVE, default=2)
    a.add_argument("--experts", type=POSITIVE, default=8)
    a.add_argument("--hidden", type=POSITIVE, default=64)
    a.add_argument("--intermediate", type=POSITIVE, default=32)
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    a.add_argument("--seed", type=SEED, default=0)
    a.add_argument("--dense-layers", type=COUNT, default=0)
    a.add_argument("--slots", type=POSITIVE, required=True, help="slots per rank")
    a.add_argument("--transport", default="torch", choices=["torch", "nixl", "mooncake"])
    a.add_argument("--lease-ttl", type=POSITIVE, default=3, help="seconds of the rank's lease (etcd: whole seconds)")
    a.add_argument("--node", default="")
    a.add_argument("--routes", nargs="+", default=list(ROUTE_NAMES), choices=ROUTE_NAMES,
                   help="routes the rank may use; 'disk' alone reloads every changed expert from disk (baseline)")
    add_mirror_args(a)
    a.add_argument("--no-check", action="store_true",
                   help="skip the bit-exact checks and the request stream (for timing runs)")
    a.add_argument("--drop-heartbeats-from", nargs="+", default=[], metavar="ID", help=argparse.SUPPRESS)
    a.add_argument("-v", "--verbose", action="store_true")
    a.set_defaults(func=cmd_agent)

    s = sub.add_parser("status", help="ranks, states, epochs and the last rebalance")
    add_etcd_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


ROUTE_NAMES = ("local", "peer", "mirror", "disk")
"""elastic_ep.core.plan.ROUTES, spelled out so that --help works without importing numpy."""
GiB = 1 << 30


def add_mirror_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror-budget-gib", type=float_in(0), default=0.0,
                   help="host memory per rank for mirrors of experts other nodes serve (0: none); the controller "
                        "assigns them so that a node's loss reads nothing from disk when the budget allows")
    p.add_argument("--mirror-fill-mbps", type=float_in(0, above=True), default=1000.0,
                   help="the most MB/s a rank's background mirror fill reads")


def add_demo_command(sub: Any) -> None:
    d = sub.add_parser("demo", help="local etcd, a controller and CPU ranks; kill a rank and watch the recovery")
    d.add_argument("--ranks", type=POSITIVE, default=4)
    d.add_argument("--layers", type=POSITIVE, default=4)
    d.add_argument("--experts", type=POSITIVE, default=16)
    d.add_argument("--slots", type=POSITIVE, help="slots per rank (default 6; with --model: enough for every "
                                              "expert on the ranks left after the change)")
    add_model_args(d)
    d.add_argument("--hidden", type=POSITIVE, default=512)
    d.add_argument("--intermediate", type=POSITIVE, default=256)
    d.add_argument("--transport", default="torch", choices=["torch", "nixl", "mooncake"])
    d.add_argument("--policy", default="min_migration", choices=["min_migration", "deepseek"])
    d.add_argument("--fail", type=COUNT, default=1, help="ranks to SIGKILL")
    d.add_argument("--fail-node", action="store_true",
                   help="SIGKILL every rank of one node instead (needs --ranks-per-node)")
    d.add_argument("--ranks-per-node", type=COUNT, default=0,
                   help="ranks per node label node-<rank // n> (0: no labels, each rank its own fault domain)")
    add_mirror_args(d)
    d.add_argument("--spread", action="store_true", help="kill one at a time (default: simultaneously)")
    d.add_argument("--leave", action="store_true", help="first drain one rank gracefully")
    d.add_argument("--join", type=COUNT, default=0, help="finally add this many ranks")
    d.add_argument("--lease-ttl", type=POSITIVE, default=2, help="seconds of each rank's lease")
    d.add_argument("--settle", type=float_in(0), default=0.5)
    d.add_argument("--timeout", type=float_in(0, above=True), default=120.0, help="seconds per membership change")
    d.add_argument("--seed", type=SEED, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_demo)


def cmd_simulate_ranks(args: argparse.Namespace) -> int:
    import dataclasses

    from elastic_ep.tools.simulate import SimShape, serve

    _logging(args.verbose)
    shape = SimShape(args.layers, args.experts, args.slots, args.expert_bytes)
    cfg = dataclasses.replace(etcd_config(args), timeout_s=args.etcd_timeout)
    return serve(cfg, shape, args.count, _stop_on_signals(), start_index=args.start_index,
                 commands=sys.stdin if args.stdin_commands else None, node_size=args.node_size,
                 lease_ttl_s=args.lease_ttl, ranks_per_client=args.ranks_per_client, mirror_rows=args.mirror_rows)


def add_simulate_command(sub: Any) -> None:
    s = sub.add_parser("simulate-ranks", help="host many simulated ranks in one process (real agent protocol, "
                                              "no weights) for scale tests; runs until SIGINT/SIGTERM")
    add_etcd_args(s)
    s.add_argument("--count", type=POSITIVE, required=True, help="ranks to host: sim-<start-index> ...")
    s.add_argument("--start-index", type=COUNT, default=0, help="number of the first rank id")
    s.add_argument("--node-size", type=POSITIVE, default=8, help="ranks per node label node-<index // size>")
    s.add_argument("--layers", type=POSITIVE, default=58, help="MoE layers (as the controller's)")
    s.add_argument("--experts", type=POSITIVE, default=256, help="logical experts per layer (as the controller's)")
    s.add_argument("--slots", type=POSITIVE, required=True, help="slots per rank (as the controller's)")
    s.add_argument("--expert-bytes", type=POSITIVE, default=DSV3_EXPERT_BYTES, help="bytes of one expert")
    s.add_argument("--lease-ttl", type=POSITIVE, default=3, help="seconds of each rank's lease")
    s.add_argument("--etcd-timeout", type=float_in(0, above=True), default=EtcdConfig.timeout_s,
                   help="seconds one etcd call may take (raise it when hundreds of ranks share a few cores)")
    s.add_argument("--mirror-rows", type=COUNT, default=0,
                   help="experts each simulated rank's mirror holds (reported ready at each commit; 0: none)")
    s.add_argument("--ranks-per-client", type=COUNT, default=0,
                   help="ranks sharing one etcd connection (0: all); calls on one connection take turns")
    s.add_argument("--stdin-commands", action="store_true",
                   help="read control lines from stdin: 'kill ID [ID ...]' (stop and revoke), 'start N'")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_simulate_ranks)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="elastic-ep", description="Elastic expert parallelism for MoE serving: "
                                "plan a membership change, run a controller or a rank, inspect a model, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="walk through one membership change and print the transfer plan summary")
    plan.add_argument("--layers", type=POSITIVE, default=58)
    plan.add_argument("--experts", type=POSITIVE, default=256)
    plan.add_argument("--ranks", type=POSITIVE, default=32)
    plan.add_argument("--slots", type=POSITIVE, default=9, help="slots per rank")
    plan.add_argument("--groups", type=POSITIVE, default=8, help="expert groups (DeepSeek-V3: 8)")
    plan.add_argument("--nodes", type=POSITIVE, default=4)
    plan.add_argument("--fail", type=COUNT, default=1, help="ranks that die, chosen by --seed")
    plan.add_argument("--dead", type=COUNT, nargs="*", help="ranks that die (overrides --fail)")
    plan.add_argument("--leave", type=COUNT, nargs="*", help="ranks that drain out gracefully")
    plan.add_argument("--join", type=COUNT, default=0, help="ranks that join")
    plan.add_argument("--policy", default="min_migration", choices=["min_migration", "deepseek"])
    plan.add_argument("--zipf", type=float_in(0), default=0.6, help="load skew exponent")
    plan.add_argument("--expert-bytes", type=POSITIVE, default=DSV3_EXPERT_BYTES)
    plan.add_argument("--seed", type=SEED, default=0)
    plan.add_argument("--mirror-budget-gib", type=float_in(0), default=0.0,
                      help="host memory per rank for mirrors: show what it covers (0: no mirrors)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    # Choices are spelled out here so that --help works without importing torch.
    mk = sub.add_parser("make-checkpoint", help="write a deterministic synthetic MoE safetensors checkpoint")
    mk.add_argument("dir", help="directory to write into (created; must be empty unless --force)")
    mk.add_argument("--force", action="store_true", help="write into a non-empty directory, replacing the "
                                                         "checkpoint files there (symlinks are still refused)")
    mk.add_argument("--layers", type=POSITIVE, default=2, help="MoE layers")
    mk.add_argument("--experts", type=POSITIVE, default=8, help="logical experts per MoE layer")
    mk.add_argument("--hidden", type=POSITIVE, default=64)
    mk.add_argument("--intermediate", type=POSITIVE, default=32)
    mk.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                    help="fp8: e4m3 weights with float32 weight_scale_inv blocks of 128")
    mk.add_argument("--shards", type=POSITIVE, default=1, help="files; more than 1 adds model.safetensors.index.json")
    mk.add_argument("--seed", type=SEED, default=0)
    mk.add_argument("--scheme", default="deepseek", choices=["deepseek", "qwen", "mixtral"])
    mk.add_argument("--dense-layers", type=COUNT, default=0, help="dense layers before the first MoE layer")
    mk.set_defaults(func=cmd_make_checkpoint)

    ins = sub.add_parser("inspect", help="the routed experts of a Hugging Face model directory")
    ins.add_argument("model_dir", help="directory with config.json and the safetensors files")
    add_template_arg(ins)
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=cmd_inspect)

    add_control_commands(sub)
    add_demo_command(sub)
    add_simulate_command(sub)
    return p


LONG_RUNNING = frozenset({cmd_agent, cmd_controller, cmd_simulate_ranks})
"""Commands that serve until stopped: they keep Python's SIGPIPE handling (an error on
the write, not a signal that kills the process)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and hasattr(signal, "SIGPIPE") and args.func not in LONG_RUNNING:
        # `elastic-ep inspect DIR | head`: stop quietly when the reader goes away. Never
        # for a process holding sockets to peers: a write to a reset one would kill it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return args.func(args)
    except ElasticEPError as e:
        print(f"elastic-ep: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
