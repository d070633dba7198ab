"""``elastic-ep controller``, ``elastic-ep agent`` and ``elastic-ep status``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from typing import Any

from elastic_ep.errors import ConfigError

from controller.etcd_client import EtcdConfig


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


def add_model_args(p: argparse.ArgumentParser, group: Any = None) -> None:
    (group or p).add_argument("--model", metavar="MODEL_DIR",
                              help="Hugging Face model directory (config.json and safetensors files)")
    p.add_argument("--template", action="append", metavar="ROLE=PATH",
                   help="with --model, for an architecture elastic-ep does not know: where each of gate, up, "
                        "down is, e.g. gate=model.layers.{layer}.moe.experts.{expert}.w_in (repeat per role)")


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.controller import Controller, ControllerConfig
    from controller.metrics import ControllerMetrics, serve

    _logging(args.verbose)
    metrics = ControllerMetrics()
    cfg = ControllerConfig(
        etcd_config(args), model_shape(args), id=args.id,
        min_ranks=args.min_ranks, policy=args.policy, settle_s=args.settle, leader_ttl_s=args.leader_ttl,
        imbalance_threshold=args.imbalance_threshold,
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
    from elastic_ep.tools.synthetic_rank import run_agent
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
    run_agent(etcd_config(args), args.id, ckpt, spec, args.slots, args.transport, args.lease_ttl,
              node=args.node, stop=_stop_on_signals(), routes=args.routes, check=not args.no_check,
              load_seed=args.seed)
    return 0


def status(cfg: EtcdConfig) -> dict[str, Any]:
    """The deployment as one JSON-able object: ranks, epochs, leader, last commit."""
    from controller.controller import Controller, ControllerConfig, ModelShape

    ctl = Controller(ControllerConfig(cfg, ModelShape(1, 1, 1, 1)))
    v = ctl.view()
    leader = ctl.election.observe()
    c = v.committed
    members = c.members if c else []
    ranks = []
    for r in sorted(v.ranks.values(), key=lambda r: r.id):
        tok = f"{r.id}#{r.incarnation}"
        ranks.append({"id": r.id, "state": r.state, "rank": members.index(tok) if tok in members else None,
                      "host": r.host, "node": r.node, "device": r.device, "pid": r.pid})
    return {
        "leader": leader, "epoch": v.epoch, "committed_epoch": c.epoch if c else None,
        "in_flight": bool(v.plan and (c is None or v.plan.epoch > c.epoch)),
        "last_rebalance": {"phases": c.phases, "bytes": c.bytes} if c else None,
        "ranks": ranks, "malformed": v.malformed,
    }


def cmd_status(args: argparse.Namespace) -> int:
    s = status(etcd_config(args))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"leader {s['leader']}  epoch {s['epoch']}  committed {s['committed_epoch']}"
          + ("  (plan in flight)" if s["in_flight"] else ""))
    print(f"{'id':<16} {'state':<9} {'rank':>4}  {'node':<10} {'device':<8} host")
    for r in s["ranks"]:
        rank = "-" if r["rank"] is None else str(r["rank"])
        print(f"{r['id']:<16} {r['state']:<9} {rank:>4}  {r['node']:<10} {r['device']:<8} {r['host']}")
    if s["last_rebalance"]:
        ph = ", ".join(f"{k} {v:.3f} s" for k, v in s["last_rebalance"]["phases"].items())
        print(f"last rebalance: {ph}; bytes {s['last_rebalance']['bytes']}")
    for m in s["malformed"]:
        print(f"malformed: {m}")
    return 0


def add_commands(sub: Any) -> None:
    c = sub.add_parser("controller", help="run a controller replica (one leader is elected)")
    add_etcd_args(c)
    c.add_argument("--id", default=f"controller-{os.getpid()}")
    add_model_args(c)
    c.add_argument("--layers", type=int, help="MoE layers (without --model)")
    c.add_argument("--experts", type=int, help="logical experts per layer (without --model)")
    c.add_argument("--slots", type=int, required=True, help="slots per rank")
    c.add_argument("--expert-bytes", type=int, help="bytes of one expert (without --model)")
    c.add_argument("--min-ranks", type=int, default=1, help="ranks to wait for before the first placement")
    c.add_argument("--policy", default="min_migration", choices=["min_migration", "deepseek"])
    c.add_argument("--settle", type=float, default=1.0, help="seconds a change must hold before planning")
    c.add_argument("--leader-ttl", type=int, default=3)
    c.add_argument("--imbalance-threshold", type=float, default=0.0, help="rebalance below this balance (0: off)")
    c.add_argument("--metrics-host", default="127.0.0.1")
    c.add_argument("--metrics-port", type=int, default=9400, help="-1: no endpoint")
    c.add_argument("-v", "--verbose", action="store_true")
    c.set_defaults(func=cmd_controller)

    a = sub.add_parser("agent", help="run a stand-alone rank holding a model's experts in CPU tensors")
    add_etcd_args(a)
    a.add_argument("--id", required=True)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="synthetic checkpoint directory (elastic-ep make-checkpoint; with "
                                    "--layers --experts --hidden --intermediate --dtype --seed --dense-layers)")
    add_model_args(a, src)
    a.add_argument("--layers", type=int, default=2)
    a.add_argument("--experts", type=int, default=8)
    a.add_argument("--hidden", type=int, default=64)
    a.add_argument("--intermediate", type=int, default=32)
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--dense-layers", type=int, default=0)
    a.add_argument("--slots", type=int, required=True, help="slots per rank")
    a.add_argument("--transport", default="torch", choices=["torch", "nixl", "mooncake"])
    a.add_argument("--lease-ttl", type=int, default=3)
    a.add_argument("--node", default="")
    a.add_argument("--routes", nargs="+", default=["local", "peer", "disk"], choices=["local", "peer", "disk"],
                   help="routes the rank may use; 'disk' alone reloads every changed expert from disk (baseline)")
    a.add_argument("--no-check", action="store_true",
                   help="skip the bit-exact checks and the request stream (for timing runs)")
    a.add_argument("-v", "--verbose", action="store_true")
    a.set_defaults(func=cmd_agent)

    s = sub.add_parser("status", help="ranks, states, epochs and the last rebalance")
    add_etcd_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
