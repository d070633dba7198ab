"""Soak: random chaos schedules on fresh clusters for a given time (elastic_ep/tools/chaos.py).

    python bench/soak.py --minutes 10 --seed 1

Schedules draw every fault of ``FAULTS``: kills, an etcd restart, hostile values, and
the false-suspicion faults (a short stall that must evict no one, a long one that must
be fenced, a cut link, a lost node left to the lease).

Prints one line per step and a table: schedules run, faults injected, ranks and
controllers killed, hostile writes, recoveries, steps downgraded (and why), planned disk
reads (experts and bytes, from the plans' experts with no live replica), unplanned disk
fallbacks, invariant violations, median and worst recovery time (and the worst's fault;
``stall_short`` removes no one and is not a recovery). Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from elastic_ep.errors import ElasticEPError  # noqa: E402
from elastic_ep.tools.chaos import ChaosCluster, StepResult, random_schedule  # noqa: E402

NO_RECOVERY = frozenset({"stall_short"})
"""Faults after which nothing recovers (no one is removed): left out of the recovery times."""


@dataclass
class Tally:
    """What the soak saw, summed over its schedules."""

    schedules: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    rank_kills: int = 0
    controller_kills: int = 0
    violations: int = 0
    steps: list[StepResult] = field(default_factory=list)

    def add_cluster(self, c: ChaosCluster) -> None:
        self.rank_kills += c.kills
        self.controller_kills += c.controller_kills


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(t: Tally) -> list[str]:
    """The table, one row per line."""
    steps = t.steps
    downgraded = Counter(r.downgraded for r in steps if r.downgraded)
    by_fault = Counter(r.fault for r in steps)
    holders = [r for r in steps if r.fault == "kill_holders"]
    fallbacks = [r for r in steps if r.disk_fallback]
    hostile = [r for r in steps if r.fault == "hostile_values"]
    recovered = [r for r in steps if r.fault not in NO_RECOVERY]
    seconds = [r.seconds for r in recovered]
    worst = max(recovered, key=lambda r: r.seconds, default=None)
    rows = [
        ("schedules run", str(t.schedules)),
        ("faults injected", f"{sum(t.faults.values())}  " + ", ".join(f"{k} {v}" for k, v in sorted(t.faults.items()))),
        ("ranks killed", str(t.rank_kills)),
        ("controllers killed", str(t.controller_kills)),
        ("hostile writes", f"{sum(r.hostile_writes for r in hostile)} in {len(hostile)} hostile_values steps"),
        ("recoveries", f"{len(steps)}  " + ", ".join(f"{k} {v}" for k, v in sorted(by_fault.items()))),
        ("downgraded steps", f"{sum(downgraded.values())}" + "".join(f"\n{'':<24}{v} x {k}" for k, v in
                                                                     sorted(downgraded.items()))),
        ("planned disk reads", f"{sum(r.disk_experts for r in steps)} experts, "
                               f"{_mib(sum(r.planned_disk_bytes for r in steps))} planned, "
                               f"{_mib(sum(r.disk_bytes for r in steps))} read "
                               f"(kill_holders: {sum(r.disk_experts for r in holders)} experts in "
                               f"{len(holders)} steps)"),
        ("unplanned fallbacks", f"{len(fallbacks)} steps, {_mib(sum(r.unplanned_disk_bytes for r in steps))}"),
        ("invariant violations", str(t.violations)),
        ("recovery", f"median {statistics.median(seconds):.2f} s, worst {max(seconds):.2f} s ({worst.fault})"
                     if worst is not None else "-"),
    ]
    return [f"{name:<24}{value}" for name, value in rows]


def run_schedule(t: Tally, seed: int, steps: int, end: float) -> None:
    schedule = random_schedule(np.random.default_rng(seed), steps)
    t.schedules += 1
    with tempfile.TemporaryDirectory(prefix="elastic-ep-soak-") as d:
        c = None
        try:
            with ChaosCluster(d, seed=seed) as c:
                for fault in schedule:
                    t.faults[fault] += 1
                    t.steps.append(c.step(fault))
                    if time.monotonic() > end:
                        break
        except ElasticEPError as e:
            t.violations += 1
            print(f"VIOLATION (seed {seed}, schedule {schedule}): {type(e).__name__}: {e}")
        finally:
            if c is not None:
                t.add_cluster(c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=4, help="faults per schedule")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.minutes <= 0 or args.steps < 1 or args.seed < 0:
        ap.error("--minutes must be > 0, --steps >= 1 and --seed >= 0")
    print(f"seed={args.seed}")
    rng = np.random.default_rng(args.seed)
    end = time.monotonic() + args.minutes * 60
    t = Tally()
    while time.monotonic() < end:
        run_schedule(t, int(rng.integers(1 << 31)), args.steps, end)
    print()
    print("\n".join(report(t)))
    return 1 if t.violations else 0


if __name__ == "__main__":
    sys.exit(main())
