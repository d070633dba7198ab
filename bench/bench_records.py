"""What validating every etcd value costs: each record type parsed through
``controller.records`` (size cap, depth scan, strict numbers, every field checked)
against plain ``json.loads`` of the same bytes, in the same run, at DeepSeek-V3 size
(58 MoE layers x 256 experts, 32 ranks x 9 slots), plus the time a hostile value takes
to be refused.

    python bench/bench_records.py [--repeat 5]

Prints, per record, its size, both times and ``validate_ratio`` (validated / plain).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from controller import plan_chunks  # noqa: E402
from controller.records import AckRecord, CommitRecord, LoadRecord, PlanRecord, RankRecord, member_token  # noqa: E402
from elastic_ep.core.load_stats import zipf_load  # noqa: E402
from elastic_ep.core.placement import ExpertPlacement  # noqa: E402
from elastic_ep.core.eplb import rebalance_experts  # noqa: E402
from elastic_ep.core.plan import build_plan  # noqa: E402
from elastic_ep.core.policy import get_policy  # noqa: E402
from elastic_ep.core.rank_mapping import RankMapping  # noqa: E402
from elastic_ep.errors import MalformedValueError  # noqa: E402

LAYERS, EXPERTS, RANKS, SLOTS, EB = 58, 256, 32, 9, 88_080_384


def best(fn: Callable[[], Any], repeat: int) -> float:
    """The median of ``repeat`` timed calls, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def records() -> dict[str, tuple[str, bytes, Callable[[str, bytes], Any]]]:
    """name -> (key, value, parse) for one of each record at DeepSeek-V3 size."""
    load = zipf_load(LAYERS, EXPERTS, 0.6, 0)
    old = ExpertPlacement(rebalance_experts(load, RANKS * SLOTS, 8, 4, RANKS)[0], SLOTS, EXPERTS)
    mapping = RankMapping.build(RANKS, dead=[5])
    new = get_policy("min_migration").rebalance(old, mapping, load)
    members = [member_token(f"rank-{i}", "1f0c9a2e") for i in range(RANKS)]
    plan = PlanRecord(2, "ctl-a", members, [m for i, m in enumerate(members) if i != 5],
                      build_plan(old, new, mapping, EB, epoch=2), new, "dead [rank-5]")
    rank = RankRecord("rank-3", "10.0.0.7", "cuda:3", "node-0", "active", {"transport": "nixl"}, 4242, "1f0c9a2e")
    values = plan_chunks.encode(plan)
    head = plan_chunks.head(plan, values, "0" * 16)
    part = max((n for n in values if n != plan_chunks.OLD), key=lambda n: len(values[n]))
    return {
        "rank": ("/ep/ranks/rank-3", rank.to_json().encode(), RankRecord.parse),
        "load": ("/ep/load/rank-3", LoadRecord("rank-3", load.tolist(), 2.0, {"ok": 10}, [1, 2]).to_json().encode(),
                 LoadRecord.parse),
        "ack": ("/ep/acks/rank-3", AckRecord(2, members[3], True, {"peer": 10**9, "disk": 0},
                                             {"transfer": 1.5}, mismatched=0).to_json().encode(), AckRecord.parse),
        "plan head": ("/ep/plan", head.to_json().encode(), PlanRecord.parse),
        "plan part": (f"/ep/plans/{part}", values[part],
                      lambda key, raw: plan_chunks.parse(key, raw, head, part)),
        "plan old": ("/ep/plans/old", values[plan_chunks.OLD],
                     lambda key, raw: plan_chunks.parse(key, raw, head, plan_chunks.OLD)),
        "committed": ("/ep/committed", CommitRecord(2, plan.new_members, new).to_json().encode(), CommitRecord.parse),
    }


# name -> (parse, key, value): each must be refused (size, depth or numbers).
HOSTILE: dict[str, tuple[Callable[[str, bytes], Any], str, bytes]] = {
    "load nested 1M deep": (LoadRecord.parse, "/ep/load/r", b"[" * 1_000_000 + b"]" * 1_000_000),
    "ack with 1e400": (AckRecord.parse, "/ep/acks/r",
                       b'{"schema": 1, "epoch": 1, "id": "r#1", "ok": true, "mismatched": 1e400}'),
    "load of 4 MiB digits": (LoadRecord.parse, "/ep/load/r", b"9" * ((4 << 20) - 1)),
    "ack over its cap": (AckRecord.parse, "/ep/acks/r", b" " * (1 << 20)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"DeepSeek-V3 size: {LAYERS} layers x {EXPERTS} experts, {RANKS} ranks x {SLOTS} slots; "
          f"median of {args.repeat}")
    print(f"{'record':<12}{'bytes':>12}{'json.loads ms':>16}{'validated ms':>15}{'validate_ratio':>16}")
    for name, (key, raw, parse) in records().items():
        plain = best(lambda: json.loads(raw), args.repeat)
        checked = best(lambda: parse(key, raw), args.repeat)
        print(f"{name:<12}{len(raw):>12,}{plain * 1e3:>16.2f}{checked * 1e3:>15.2f}{checked / plain:>16.2f}")
    print(f"{'hostile value':<22}{'bytes':>12}{'refused in ms':>16}")
    for name, (parse, key, raw) in HOSTILE.items():
        def refuse() -> None:
            try:
                parse(key, raw)
            except MalformedValueError:
                return
            raise AssertionError(f"{name} was accepted")
        print(f"{name:<22}{len(raw):>12,}{best(refuse, args.repeat) * 1e3:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
