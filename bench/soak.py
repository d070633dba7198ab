"""Soak: random chaos schedules on fresh clusters for a given time (elastic_ep/tools/chaos.py).

    python bench/soak.py --minutes 10 --seed 1

Prints one line per step and a table: schedules run, faults injected, kills, recoveries,
disk fallbacks, invariant violations, worst recovery time. Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from elastic_ep.tools.chaos import ChaosCluster, InvariantError, random_schedule  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=4, help="faults per schedule")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"seed={args.seed}")
    rng = np.random.default_rng(args.seed)
    end = time.monotonic() + args.minutes * 60
    faults: Counter[str] = Counter()
    schedules = recoveries = violations = fallbacks = kills = 0
    worst = 0.0
    while time.monotonic() < end:
        seed = int(rng.integers(1 << 31))
        schedule = random_schedule(np.random.default_rng(seed), args.steps)
        schedules += 1
        with tempfile.TemporaryDirectory(prefix="elastic-ep-soak-") as d:
            try:
                with ChaosCluster(d, seed=seed) as c:
                    for fault in schedule:
                        faults[fault] += 1
                        r = c.step(fault)
                        recoveries += 1
                        fallbacks += int(r.disk_fallback)
                        worst = max(worst, r.seconds)
                        if time.monotonic() > end:
                            break
                    kills += c.kills
            except InvariantError as e:
                violations += 1
                print(f"VIOLATION (seed {seed}, schedule {schedule}): {e}")
    print()
    print(f"{'schedules run':<24}{schedules}")
    print(f"{'faults injected':<24}{sum(faults.values())}  " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print(f"{'ranks killed':<24}{kills}")
    print(f"{'recoveries':<24}{recoveries}")
    print(f"{'disk fallbacks':<24}{fallbacks}")
    print(f"{'invariant violations':<24}{violations}")
    print(f"{'worst recovery':<24}{worst:.2f} s")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
