"""End-to-end recovery after one rank failure: P2P first (this project) against reloading
every changed expert from disk (what serving engines did before peer transfer).

Both runs use the same synthetic model, ranks, seed and victim, on a real local etcd
with a controller and ``elastic-ep agent`` processes; the checkpoint is evicted from
the page cache just before the kill, so disk reads are cold in both. The figure is
SIGKILL -> recovery committed (the lease TTL is the same in both and part of both).

Last line: ``recovery_s=<x> full_disk_s=<y> speedup=<z>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elastic_ep.tools.chaos import ChaosCluster  # noqa: E402
from loaders.checkpoint.synthetic import SyntheticSpec  # noqa: E402


def evict(directory: str) -> None:
    """Drop the checkpoint's pages from the page cache (cold reads)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(mode: str, spec: SyntheticSpec, args: argparse.Namespace, workdir: str) -> dict:
    # Checks off in both runs: they are not part of a recovery (tests and the demo check).
    extra = ("--no-check", "--routes", "disk") if mode == "full_disk" else ("--no-check",)
    with ChaosCluster(workdir, seed=args.seed, ranks=args.ranks, slots=args.slots, spec=spec, controllers=1,
                      agent_args=("--transport", args.transport, *extra), log=lambda s: None) as c:
        evict(c.ckpt)
        res = c.step("kill_one")
        s = c.read()
        com = s.committed
        acks = [a for a in s.acks.values() if a.epoch == com.epoch]
        rank_phases = {k: max(a.phases.get(k, 0.0) for a in acks) for k in ("connect", "local", "peer", "disk", "barrier", "write")}
        plan = s.plan.plan
        return {"seconds": res.seconds, "phases": com.phases, "bytes": com.bytes, "rank_phases": rank_phases,
                "detail": res.detail, "transfers": len(plan.transfers), "missing": sum(len(m) for m in plan.missing)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--transport", default="torch", choices=["torch", "nixl", "mooncake"])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"seed={args.seed}")
    spec = SyntheticSpec(layers=args.layers, experts=args.experts, hidden=args.hidden,
                         intermediate=args.intermediate, dtype="bf16", shards=4, seed=args.seed)
    print(f"model: {args.layers} layers x {args.experts} experts of {spec.expert_bytes / 2**20:.1f} MiB; "
          f"{args.ranks} ranks x {args.slots} slots; transport {args.transport}; one rank SIGKILLed")
    out = {}
    for mode in ("p2p_first", "full_disk"):
        with tempfile.TemporaryDirectory(prefix=f"elastic-ep-bench-recovery-{mode}-") as d:
            out[mode] = r = run(mode, spec, args, d)
        b = {k: f"{v / 2**20:.0f} MiB" for k, v in r["bytes"].items()}
        ph = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
        rp = ", ".join(f"{k} {v:.3f}" for k, v in r["rank_phases"].items())
        print(f"{mode:>10}: {r['detail']}; plan: {r['transfers']} slot transfers, {r['missing']} experts with no live replica")
        print(f"{mode:>10}: kill -> committed {r['seconds']:.3f} s; controller phases [{ph}] s; "
              f"slowest rank [{rp}] s; bytes {b}")
    rec, disk = out["p2p_first"]["seconds"], out["full_disk"]["seconds"]
    tr_p, tr_d = out["p2p_first"]["phases"].get("transfer", 0), out["full_disk"]["phases"].get("transfer", 0)
    print(f"transfer phase alone: p2p-first {tr_p:.3f} s vs full disk {tr_d:.3f} s ({tr_d / max(tr_p, 1e-9):.2f}x)")
    print(f"recovery_s={rec:.3f} full_disk_s={disk:.3f} speedup={disk / rec:.3f}")


if __name__ == "__main__":
    main()
