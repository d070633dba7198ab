"""Host-memory mirrors in a real deployment: etcd, a controller, six rank processes on
three labeled nodes, each with a mirror. A whole node SIGKILLed after the mirrors are
filled reads nothing from disk; one killed while they are still filling reads from a
mirror only rows its rank had reported ready with that expert, and from disk exactly
the rest. Every slot is checked bit-exact against the checkpoint (each rank's ack)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

import numpy as np

from controller.coverage import mirror_coverage, mirrors_filled, ready_mirrors
from elastic_ep.core.mirrors import needs_mirror
from elastic_ep.tools.cli import main as cli_main, status
from controller.records import CommitRecord, member_id
from controller.view import read_view
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.polling import wait_until
from elastic_ep.tools.synthetic_rank import SyntheticRank
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint
from tests.procs import read_committed, running_deployment

SPEC = SyntheticSpec(layers=2, experts=16, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=13)
SLOTS, RANKS, PER_NODE = 4, 6, 2
IDS = [f"r{i}" for i in range(RANKS)]
EB = SPEC.expert_bytes


def node(rid: str) -> str:
    return f"node-{int(rid[1:]) // PER_NODE}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: Any) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)


def deployment(ckpt: str, fill_bytes_s: float) -> Any:
    return running_deployment(
        SPEC, SLOTS, IDS,
        lambda cfg, rid: SyntheticRank(cfg, rid, ckpt, SPEC, SLOTS, lease_ttl_s=3, node=node(rid),
                                       mirror_bytes=16 * EB, mirror_fill_bytes_s=fill_bytes_s),
        settle_s=0.5, confirm_settle_s=0.05)


def kill_node(procs: dict[str, Any], c: CommitRecord, label: str) -> list[str]:
    victims = [member_id(m) for m in c.members if node(member_id(m)) == label]
    for v in victims:
        os.kill(procs[v].pid, signal.SIGKILL)
    return victims


def best_protected(view: Any, c: CommitRecord) -> str:
    """The node whose loss the mirrors ready now cover best (most experts confined to
    it with a ready mirror elsewhere)."""
    labels = [node(member_id(m)) for m in c.members]
    need, confining = needs_mirror(c.placement, labels)
    ready = ready_mirrors(view, list(c.members))
    assert ready is not None
    covered = need & (ready.rank >= 0)
    counts = {lab: int(np.sum(covered & (confining == d))) for d, lab in enumerate(dict.fromkeys(labels))}
    return max(counts, key=counts.__getitem__)


def next_commit(client: Any, root: str, after: int) -> CommitRecord:
    return wait_until(lambda: (c := read_committed(client, root)) is not None and c.epoch > after and c, 60.0,
                      f"a commit after epoch {after}")


def check_status(cfg: Any, assigned: int, capsys: Any) -> None:
    """``elastic-ep status``: every rank's mirror (ready/rows, bytes) and the worst loss."""
    s = status(cfg)
    assert s["mirrors"]["worst_loss"] == {"kind": "node", "label": "node-0", "experts": 0, "bytes": 0}
    assert sum(r["mirror_ready"] for r in s["ranks"]) == assigned and all(r["mirror_rows"] == 16 for r in s["ranks"])
    capsys.readouterr()
    assert cli_main(["status", "--etcd", cfg.endpoint, "--deployment", cfg.deployment]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "worst single node loss: node-0, 0 experts (0 B)" in out
    assert all(f"/16, {16 * EB // 1024}.0 KiB" in line for line in out.splitlines() if line.startswith("r"))


def test_a_node_loss_reads_nothing_from_disk_once_the_mirrors_are_filled(ckpt: str, capsys: Any) -> None:
    with deployment(ckpt, float(1 << 30)) as (ctl, procs, client, root, c1):
        assert c1.mirrors is not None and c1.mirrors.count() > 0, "the bootstrap plan assigns mirrors"
        cov = wait_until(lambda: mirrors_filled(read_view(client, root)), 30.0,
                         "every assigned mirror row ready")
        print(f"mirrors: {cov.ready} rows ready; worst node loss {cov.worst_label}: {cov.worst_experts} experts")
        assert cov.domain_kind == "node" and cov.worst_experts == 0 and cov.ready == c1.mirrors.count()
        check_status(ctl.cfg.etcd, c1.mirrors.count(), capsys)
        victims = kill_node(procs, c1, "node-1")
        c2 = next_commit(client, root, c1.epoch)
        view = read_view(client, root, whole_plan=True, loads=True)
        require(check_commit(view, exact_disk=True))
        assert {member_id(m) for m in c2.members}.isdisjoint(victims) and len(c2.members) == RANKS - PER_NODE
        print(f"node-1 lost: bytes {c2.bytes}")
        assert c2.bytes.get("disk", 0) == 0 and c2.bytes.get("mirror", 0) > 0, c2.bytes
        assert view.plan is not None and view.plan.plan is not None and not any(view.plan.plan.missing)


def test_a_node_lost_while_mirrors_fill_reads_only_ready_rows(ckpt: str) -> None:
    # One row every 1.5 s per rank: the node dies while most rows are still empty.
    with deployment(ckpt, EB / 1.5) as (ctl, procs, client, root, c1):
        assert c1.mirrors is not None
        t0 = time.monotonic()
        ready_at_kill = wait_until(lambda: (x := mirror_coverage(read_view(client, root))).ready * 3 >= x.assigned
                                   and x.pending > 0 and x, 30.0, "a third of the mirror rows ready, not all")
        victims = kill_node(procs, c1, best_protected(read_view(client, root), c1))
        # The plan is read as soon as it is out, with the reports it was made from (a
        # rank fills no row while a plan runs, and rewrites none before the next commit).
        head = wait_until(lambda: (v := read_view(client, root, whole_plan=True)).plan is not None
                          and v.plan.epoch > c1.epoch and v.plan.plan is not None and v, 30.0, "the plan")
        plan = head.plan.plan
        reports = head.read_mirrors()
        mirrored = [t for t in plan.transfers if t.route == "mirror"]
        for t in mirrored:
            src = t.sources[0]
            rid = member_id(c1.members[src.rank])
            rows = reports[rid].rows
            row = src.slot - SLOTS
            assert rid not in victims and row < len(rows) and rows[row] == t.layer * SPEC.experts + t.logical, \
                f"{t}: {rid} reports row {row} holding {rows[row] if row < len(rows) else None}"
        c2 = next_commit(client, root, c1.epoch)
        view = read_view(client, root, whole_plan=True, loads=True)
        require(check_commit(view, exact_disk=True))
        print(f"killed {victims} {time.monotonic() - t0:.2f} s in with {ready_at_kill.ready}/"
              f"{ready_at_kill.assigned} rows ready; {len(mirrored)} slots from mirrors, bytes {c2.bytes}")
        assert c2.bytes.get("disk", 0) == sum(len(m) for m in plan.missing) * EB
        assert mirrored, "the node chosen had experts whose only other copy was a ready mirror"
        # The survivors go on to fill what the new commit assigns them.
        cov = wait_until(lambda: mirrors_filled(read_view(client, root)), 60.0,
                         "the new assignment filled")
        assert cov.worst_experts == 0
