"""``elastic-ep demo``: the whole system on one machine, a rank killed, the recovery shown.

It writes a synthetic MoE checkpoint (or, with ``--model``, uses a Hugging Face model
directory's real experts), starts a local etcd on 127.0.0.1, a controller,
and ``--ranks`` rank processes (``elastic-ep agent``) that load their experts, serve a
stream of fake requests checking the bytes of every slot they touch, and publish their
load. Then it changes membership (SIGKILL by default; ``--leave``, ``--join``), follows
the recovery through etcd (detect, plan, transfer, commit) and checks every invariant
of docs/DESIGN.md. Exit status 0 only if all held and every slot is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from controller.records import member_id
from controller.view import ClusterView, read_view
from elastic_ep.errors import ConfigError, ElasticEPError
from elastic_ep.runtime.serving import plan_pauses
from elastic_ep.tools.invariants import Check, check_commit
from elastic_ep.tools.polling import wait_for


@dataclass
class Change:
    """One membership change as the demo saw it through etcd."""

    kind: str
    ranks: list[str]
    t_start: float
    marks: dict[str, float] = field(default_factory=dict)  # event -> seconds after t_start
    epoch: int = 0
    pauses: dict[str, float] = field(default_factory=dict)  # serving pauses of the plan, from its acks


def node_of(rank_id: str, ranks_per_node: int) -> str:
    """The demo's node label of ``rank-<i>``: ``node-<i // ranks_per_node>`` ("" without nodes)."""
    return f"node-{int(rank_id.rsplit('-', 1)[1]) // ranks_per_node}" if ranks_per_node else ""


class Demo:
    def __init__(self, args: argparse.Namespace, out: Any = sys.stdout, model: Any = None) -> None:
        self.args = args
        self.out = out
        self.quiet = args.json
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.checks: list[Check] = []
        self.changes: list[Change] = []
        self.model = model
        self.coverage: Any = None  # the mirrors' coverage before the first change

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.out, flush=True)

    # -- setup -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from controller.controller import Controller, ControllerConfig, ModelShape
        from controller.etcd_client import EtcdConfig, connect
        from elastic_ep.tools.etcd_server import EtcdServer
        from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

        a = self.args
        rng = np.random.default_rng(a.seed)
        self.say(f"seed={a.seed}")
        with tempfile.TemporaryDirectory(prefix="elastic-ep-demo-") as work, EtcdServer() as etcd:
            if self.model is not None:
                self.spec = spec = self.model
                ckpt = a.model
                self.say(f"model: {ckpt} ({spec.family}, {spec.quantization}): {spec.layers} MoE layers x "
                         f"{spec.experts} experts, {spec.expert_bytes / 2**20:.2f} MiB per expert "
                         f"({len(spec.expert_layout.spans)} tensors)")
            else:
                self.spec = spec = SyntheticSpec(layers=a.layers, experts=a.experts, hidden=a.hidden,
                                                 intermediate=a.intermediate, dtype="bf16", shards=2, seed=a.seed)
                ckpt = os.path.join(work, "ckpt")
                make_checkpoint(ckpt, spec)
                self.say(f"checkpoint: {a.layers} MoE layers x {a.experts} experts, "
                         f"{spec.expert_bytes / 2**20:.2f} MiB per expert, in {ckpt}")
            self.say(f"etcd: 127.0.0.1:{etcd.client_port} (pid {etcd.proc.pid if etcd.proc else '?'})")
            import logging

            # The controller runs in this process: its log goes to a file, the terminal
            # shows the recovery as seen through etcd.
            handler = logging.FileHandler(os.path.join(work, "controller.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logging.getLogger().addHandler(handler)
            logging.getLogger().setLevel(logging.INFO)
            self.cfg = EtcdConfig(etcd.endpoint, deployment="demo", timeout_s=3.0)
            self.client = connect(self.cfg)
            ctl = Controller(ControllerConfig(
                self.cfg, ModelShape(spec.layers, spec.experts, a.slots, spec.expert_bytes), id="demo-controller",
                min_ranks=a.ranks, policy=a.policy, settle_s=a.settle, leader_ttl_s=3))
            stop = threading.Event()
            ctl_thread = threading.Thread(target=ctl.run, args=(stop,), name="controller", daemon=True)
            ctl_thread.start()
            try:
                ids = [f"rank-{i}" for i in range(a.ranks)]
                for rid in ids:
                    self._agent(rid, ckpt, work)
                self.say(f"started {a.ranks} ranks ({a.transport} transport), {a.slots} slots each; waiting for the placement")
                c = self._wait(lambda: self._view().committed, 180, "the first placement")
                self.say(f"epoch {c.epoch} committed: {len(c.members)} ranks serving")
                if a.mirror_budget_gib > 0:
                    self._wait_mirrors(c)
                self._serving_pause(2.0)
                self._changes(c, rng, ckpt, work)
                self._serving_pause(1.5)
                return self._summary()
            finally:
                stop.set()
                ctl_thread.join(10)
                for p in self.procs.values():
                    if p.poll() is None:
                        p.kill()
                    p.wait(10)

    def _agent(self, rid: str, ckpt: str, work: str) -> None:
        a, s = self.args, self.spec
        log = open(os.path.join(work, f"{rid}.log"), "wb")
        cmd = [sys.executable, "-m", "elastic_ep.tools.cli", "agent", "--etcd", self.cfg.endpoint, "--deployment", "demo",
               "--id", rid, "--seed", str(a.seed), "--slots", str(a.slots), "--transport", a.transport,
               "--lease-ttl", str(a.lease_ttl), "--node", node_of(rid, a.ranks_per_node),
               "--mirror-budget-gib", repr(a.mirror_budget_gib), "--mirror-fill-mbps", repr(a.mirror_fill_mbps)]
        if self.model is not None:
            cmd += ["--model", ckpt] + [f"--template={t}" for t in a.template or []]
        else:
            cmd += ["--ckpt", ckpt, "--layers", str(s.layers), "--experts", str(s.experts),
                    "--hidden", str(s.hidden), "--intermediate", str(s.intermediate)]
        self.procs[rid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    # -- reading etcd --------------------------------------------------------------------
    def _view(self) -> ClusterView:
        return read_view(self.client, self.cfg.root, whole_plan=True, loads=True)

    def _wait(self, pred: Any, timeout: float, what: str) -> Any:
        v = wait_for(pred, timeout, 0.02)
        if not v:
            raise ElasticEPError(f"timed out after {timeout:.0f} s waiting for {what}")
        return v

    def _serving_pause(self, seconds: float) -> None:
        time.sleep(seconds)
        served = [ld.served for ld in self._view().loads.values()]
        ok = sum(s.get("ok", 0) for s in served)
        bad = sum(s.get("bad", 0) for s in served)
        self.say(f"requests so far: {ok} expert hits checked, {bad} wrong")

    def _wait_mirrors(self, c: Any) -> None:
        """Wait until every rank filled the mirrors the commit assigned it, then say
        what they cover: the single node (or rank) whose loss would read the most."""
        from controller.coverage import mirrors_filled

        cov = self._wait(lambda: mirrors_filled(self._view()), 120, "the ranks' mirrors to fill")
        per_rank = max((r.rows for r in cov.ranks), default=0) * self.spec.expert_bytes
        self.say(f"mirrors ready: {cov.ready} experts in host memory ({per_rank / 2**20:.2f} MiB budget per rank "
                 f"at most); worst single {cov.domain_kind} loss ({cov.worst_label or '-'}): "
                 f"{cov.worst_experts} experts ({cov.worst_experts * self.spec.expert_bytes / 2**20:.2f} MiB) "
                 "would come from disk")
        self.coverage = cov

    # -- the membership changes ------------------------------------------------------------
    def _changes(self, c: Any, rng: np.random.Generator, ckpt: str, work: str) -> None:
        a = self.args
        members = [member_id(m) for m in c.members]
        steps: list[tuple[str, list[str]]] = []
        if a.leave:
            steps.append(("leave", [members[-1]]))
        if a.fail_node:
            nodes = sorted({node_of(m, a.ranks_per_node) for m in members})
            lost = nodes[int(rng.integers(len(nodes)))]
            steps.append(("kill", [m for m in members if node_of(m, a.ranks_per_node) == lost]))
        elif a.fail:
            pool = [m for m in members if all(m not in r for _, r in steps)]
            victims = [pool[i] for i in rng.choice(len(pool), size=min(a.fail, len(pool) - 1), replace=False)]
            if a.spread:
                steps += [("kill", [v]) for v in victims]
            else:
                steps.append(("kill", victims))
        if a.join:
            steps.append(("join", [f"rank-{a.ranks + i}" for i in range(a.join)]))
        for kind, ranks in steps:
            before = self._view().committed
            ch = Change(kind, ranks, time.monotonic())
            self.changes.append(ch)
            verb = {"kill": "SIGKILL", "leave": "draining", "join": "starting"}[kind]
            self.say(f"\n{verb} {', '.join(ranks)}")
            for r in ranks:
                if kind == "kill":
                    os.kill(self.procs[r].pid, signal.SIGKILL)
                    self.procs[r].wait(10)
                elif kind == "leave":
                    key = f"{self.cfg.root}/ranks/{r}"
                    v, meta = self.client.get(key)
                    rec = json.loads(v)
                    rec["state"] = "draining"
                    self.client.put(key, json.dumps(rec), lease=meta.lease_id)
                else:
                    self._agent(r, ckpt, work)
            self._follow(ch, before)

    def _follow(self, ch: Change, before: Any) -> None:
        """Print suspected, gone, masked, plan, commit as they appear in etcd."""
        def mark(name: str, msg: str) -> None:
            if name not in ch.marks:
                ch.marks[name] = time.monotonic() - ch.t_start
                self.say(f"  +{ch.marks[name]:6.3f} s  {msg}")

        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            v = self._view()
            if ch.kind == "kill":
                self._follow_kill(ch, before, v, mark)
            p = v.plan
            if p is not None and p.epoch > before.epoch and p.plan is not None:
                ch.epoch = p.epoch
                s = p.plan.summary()
                mirrored = sum(1 for t in p.plan.transfers if t.route == "mirror")
                mark("plan", f"plan epoch {p.epoch} published: {s['new_ep_size']} ranks, "
                     f"{len(p.plan.transfers)} slot transfers ({mirrored} from host-memory mirrors), "
                     f"{s['missing_experts']} experts from disk")
                acks = {t: a for t, a in v.acks.items() if a.epoch == p.epoch and a.succeeded}
                if acks:
                    mark("first_ack", f"first rank finished its transfers ({member_id(next(iter(acks)))})")
                if set(p.new_members) <= acks.keys():
                    mark("all_served", "every new member wrote its slots: every expert served again")
                    ch.pauses = plan_pauses(acks.values())
            c = v.committed
            if c is not None and ch.epoch and c.epoch == ch.epoch:
                mark("commit", f"epoch {c.epoch} committed: {len(c.members)} ranks, bytes {c.bytes}")
                self.checks += check_commit(v, exact_disk=True, epochs_seen=[x.epoch for x in self.changes if x.epoch])
                return
            time.sleep(0.01)
        raise ElasticEPError(f"no recovery committed within {self.args.timeout:.0f} s after {ch.kind} {ch.ranks}")

    def _follow_kill(self, ch: Change, before: Any, v: ClusterView, mark: Any) -> None:
        """A kill's first phases: a peer's suspicion, the victims gone from etcd, and
        the routing around them that restores coverage before any weight moves."""
        reports = [m.key.decode().rsplit("/", 1)[-1] for _, m in self.client.get_prefix(f"{self.cfg.root}/suspects/")]
        if set(ch.ranks) & set(reports):
            mark("suspected", f"a peer reported {', '.join(sorted(set(ch.ranks) & set(reports)))} dead")
        if not set(ch.ranks) & set(v.ranks):
            how = "confirmed and fenced" if "suspected" in ch.marks else "lease expired"
            mark("detect", f"{how}: {', '.join(ch.ranks)} gone")
        r = v.routing
        if r is not None and r.epoch == before.epoch and {member_id(t) for t in r.dead} & set(ch.ranks):
            dead = [before.members.index(t) for t in r.dead if t in before.members]
            lost = sum(len(u) for u in before.placement.masked(dead).unavailable())
            mark("masked", f"routing around {', '.join(member_id(t) for t in r.dead)}: every expert with a "
                           f"live replica served again; {lost} (layer, expert) pairs wait for the plan")

    def _summary(self) -> dict[str, Any]:
        v = self._view()
        c, p = v.committed, v.plan
        ok_req = sum(ld.served.get("ok", 0) for ld in v.loads.values())
        bad_req = sum(ld.served.get("bad", 0) for ld in v.loads.values())
        rerouted = sum(ld.served.get("rerouted", 0) for ld in v.loads.values())
        unavailable = sum(ld.served.get("unavailable", 0) for ld in v.loads.values())
        self.checks.append(Check("requests saw only correct expert bytes", bad_req == 0, f"{ok_req} ok, {bad_req} wrong"))
        disk_experts = {str(layer): list(m) for layer, m in enumerate(p.plan.missing) if m} if p and p.plan else {}
        last = self.changes[-1] if self.changes else None
        self._check_prediction(last, sum(len(m) for m in disk_experts.values()))
        phases = {}
        if c is not None:
            phases = {k: round(float(v), 4) for k, v in c.phases.items()}
        if last is not None:
            phases["wall_to_commit"] = round(last.marks.get("commit", 0.0), 4)
            for mark in ("suspected", "detect", "masked", "all_served"):
                if mark in last.marks:
                    phases[{"detect": "gone"}.get(mark, mark)] = round(last.marks[mark], 4)
        ok = all(x.ok for x in self.checks)
        result = {
            "ok": ok,
            "epoch": c.epoch if c else None,
            "ranks": len(c.members) if c else 0,
            "bytes": c.bytes if c else {},
            "phases": phases,
            "disk_experts": disk_experts,
            "changes": [{"kind": x.kind, "ranks": x.ranks, "epoch": x.epoch,
                         "marks": {k: round(v, 4) for k, v in x.marks.items()}} for x in self.changes],
            "requests": {"ok": ok_req, "bad": bad_req, "rerouted": rerouted, "unavailable": unavailable},
            "serving_pauses": last.pauses if last is not None else {},
            "mirrors": self.coverage.to_dict(self.spec.expert_bytes) if self.coverage is not None else None,
            "checks": [{"name": x.name, "ok": x.ok, "detail": x.detail} for x in self.checks],
            "seed": self.args.seed,
            "model": self.model.to_dict() if self.model is not None else None,
        }
        if not self.quiet:
            self._table(result, p)
        return result

    def _check_prediction(self, last: Change | None, disk_experts: int) -> None:
        """With mirrors, a kill of one fault domain (a node, or one unlabeled rank) reads
        from disk exactly the experts the coverage report predicted for it."""
        cov = self.coverage
        if cov is None or last is None or last.kind != "kill":
            return
        domains = {node_of(r, self.args.ranks_per_node) or r for r in last.ranks}
        if len(domains) != 1:
            return
        label = domains.pop()
        want = cov.per_domain.get(label, 0)
        self.checks.append(Check(f"the experts read from disk are the {want} the coverage report predicted for the "
                                 f"loss of {label}", disk_experts == want, f"{disk_experts} read from disk"))

    def _table(self, r: dict[str, Any], p: Any) -> None:
        say = self.say
        say("\nrecovery phases (last change)")
        for k, v in r["phases"].items():
            say(f"  {k:<16} {v:8.3f} s")
        sp = r["serving_pauses"]
        if sp:
            say("serving pauses (last plan; the engine's lock held for one layer's switch or write)")
            say(f"  longest          {sp['longest_s'] * 1e3:8.3f} ms   (the longest copy of one layer's slots "
                f"inside a pause: {sp['layer_write_s'] * 1e3:.3f} ms)")
            say(f"  total per rank   {sp['total_s'] * 1e3:8.3f} ms   (most paused rank; the plan ran "
                f"{sp['plan_s'] * 1e3:.1f} ms)")
        q = r["requests"]
        say(f"requests: {q['ok']} expert hits checked, {q['bad']} wrong bytes, {q['rerouted']} rerouted to a "
            f"surviving replica, {q['unavailable']} for experts with no live replica")
        say("bytes by route")
        for k, v in r["bytes"].items():
            say(f"  {k:<16} {v / 2**20:10.2f} MiB")
        if r["disk_experts"]:
            dead = sorted(p.plan.mapping.dead)
            say(f"experts read from disk (every replica was on dead rank(s) {dead} of epoch {p.epoch - 1})")
            for layer, es in r["disk_experts"].items():
                say(f"  layer {layer}: {es}")
        else:
            say("experts read from disk: none (every expert had a live replica or a ready mirror)")
        say("invariants")
        for x in r["checks"]:
            say(f"  [{'ok' if x['ok'] else 'FAIL'}] {x['name']}" + (f"  ({x['detail']})" if x["detail"] else ""))
        say("\nOK: every invariant held" if r["ok"] else "\nFAILED: see the checks above")


def cmd_demo(args: argparse.Namespace) -> int:
    left = args.ranks - args.fail - int(args.leave)
    model = None
    experts = args.experts
    if args.model:
        from elastic_ep.tools.cli import parse_templates
        from loaders.checkpoint.hf_model import open_model

        model = open_model(args.model, templates=parse_templates(args.template))
        experts = model.experts
    if left < 1:
        raise ConfigError(f"--ranks {args.ranks} minus --fail {args.fail}{' and --leave' if args.leave else ''} "
                          "leaves no rank: add ranks")
    if args.fail_node:
        if not args.ranks_per_node or args.ranks % args.ranks_per_node:
            raise ConfigError(f"--fail-node kills one node's ranks: give --ranks-per-node, a divisor of --ranks "
                              f"{args.ranks}")
        left = args.ranks - args.ranks_per_node - int(args.leave)
    if args.slots is None:
        # The fewest slots that still hold every expert once the ranks are gone.
        args.slots = -(-experts // left) if model is not None else 6
    if left < 1 or left * args.slots < experts:
        raise ConfigError(
            f"--ranks {args.ranks} minus --fail {args.fail}{' and --leave' if args.leave else ''} leaves {left} "
            f"ranks x {args.slots} slots, too few for {experts} experts: add ranks or --slots"
        )
    result = Demo(args, model=model).run()
    if args.json:
        print(json.dumps(result))
    return 0 if result["ok"] else 1
