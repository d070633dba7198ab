"""`elastic-ep demo` as a new user runs it: exit status 0 and every invariant held."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _demo(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "elastic_ep.tools.cli", "demo", "--json", *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert (p.returncode == 0) == out["ok"]
    return out


def test_demo_default_kill_recovers_bit_exact():
    r = _demo()
    failed = [c for c in r["checks"] if not c["ok"]]
    assert r["ok"] and not failed, failed
    assert r["ranks"] == 3 and r["requests"]["ok"] > 0 and r["requests"]["bad"] == 0
    assert set(r["bytes"]) == {"local", "peer", "mirror", "disk"} and r["bytes"]["mirror"] == 0
    assert r["mirrors"] is None, "no budget, no mirrors"
    # Disk exactly for the experts that lost every replica.
    missing = sum(len(v) for v in r["disk_experts"].values())
    assert r["bytes"]["disk"] == missing * 3 * 512 * 256 * 2  # gate, up, down in bf16
    assert {"detect", "plan", "transfer"} <= set(r["phases"])


@pytest.mark.parametrize("args", [["--ranks", "6", "--leave", "--join", "1", "--fail", "2", "--spread", "--seed", "3"]])
def test_demo_leave_kills_join(args):
    r = _demo(*args)
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    assert [c["kind"] for c in r["changes"]] == ["leave", "kill", "kill", "join"]
    epochs = [c["epoch"] for c in r["changes"]]
    assert epochs == sorted(set(epochs))


def test_demo_node_loss_with_mirrors_reads_nothing_from_disk():
    # Half the experts have a single GPU replica; a whole node of 4 ranks is SIGKILLed.
    r = _demo("--ranks", "12", "--ranks-per-node", "4", "--layers", "2", "--experts", "32", "--slots", "4",
              "--hidden", "64", "--intermediate", "32", "--fail-node", "--mirror-budget-gib", "0.01")
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    assert [c["kind"] for c in r["changes"]] == ["kill"] and len(r["changes"][0]["ranks"]) == 4
    nodes = {int(x.split("-")[1]) // 4 for x in r["changes"][0]["ranks"]}
    assert len(nodes) == 1, "the ranks of one node"
    assert r["bytes"]["disk"] == 0 and r["bytes"]["mirror"] > 0 and not r["disk_experts"], r["bytes"]
    m = r["mirrors"]
    assert m["worst_loss"] == {"kind": "node", "label": m["worst_loss"]["label"], "experts": 0, "bytes": 0}
    assert m["pending"] == 0 and m["ready"] == m["assigned"] > 0
    assert any("coverage report predicted" in c["name"] and c["ok"] for c in r["checks"])


def test_demo_refuses_impossible_config():
    p = subprocess.run([sys.executable, "-m", "elastic_ep.tools.cli", "demo", "--ranks", "2", "--fail", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "too few for 16 experts" in p.stderr
