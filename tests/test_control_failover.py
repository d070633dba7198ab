"""Controllers and ranks as separate `elastic-ep` processes against a real etcd: the
leader killed, etcd restarted mid-run, a rank killed after each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from controller.etcd_client import EtcdConfig, connect
from controller.records import CommitRecord
from controller.view import read_view
from elastic_ep.tools.cli import status
from elastic_ep.tools.etcd_server import EtcdServer
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.polling import wait_for
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=1, seed=5)
SLOTS = 4


def _wait(pred, timeout: float, what: str, poll: float = 0.1):
    def tolerant():
        try:
            return pred()
        except Exception:  # etcd briefly away during a restart
            return None

    v = wait_for(tolerant, timeout, poll)
    assert v, f"timed out after {timeout} s waiting for {what}"
    return v


class Cluster:
    def __init__(self, srv: EtcdServer, ckpt: str, logdir: str) -> None:
        self.srv, self.ckpt, self.logdir = srv, ckpt, logdir
        self.cfg = EtcdConfig(srv.endpoint, deployment="fo", timeout_s=2.0)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.logdir, f"{name}.log"), "wb")
        cmd = [sys.executable, "-m", "elastic_ep.tools.cli", *args, "--etcd", self.srv.endpoint, "--deployment", "fo"]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def controller(self, cid: str) -> None:
        self._spawn(cid, ["controller", "--id", cid, "--layers", str(SPEC.layers), "--experts", str(SPEC.experts),
                          "--slots", str(SLOTS), "--expert-bytes", str(SPEC.expert_bytes), "--min-ranks", "3",
                          "--settle", "0.3", "--leader-ttl", "2", "--metrics-port", "-1"])

    def agent(self, rid: str) -> None:
        self._spawn(rid, ["agent", "--id", rid, "--ckpt", self.ckpt, "--layers", str(SPEC.layers),
                          "--experts", str(SPEC.experts), "--hidden", str(SPEC.hidden),
                          "--intermediate", str(SPEC.intermediate), "--seed", str(SPEC.seed),
                          "--slots", str(SLOTS), "--lease-ttl", "2"])

    def kill(self, name: str) -> None:
        p = self.procs[name]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def committed(self) -> CommitRecord | None:
        v, _ = connect(self.cfg).get(f"{self.cfg.root}/committed")
        return None if v is None else CommitRecord.parse("committed", v)

    def check(self, c: CommitRecord) -> None:
        v = read_view(connect(self.cfg), self.cfg.root, whole_plan=True, loads=True)
        assert v.committed is not None and v.committed.epoch == c.epoch, (v.committed, c.epoch)
        require(check_commit(v))

    def logs(self) -> str:
        out = []
        for name in self.procs:
            with open(os.path.join(self.logdir, f"{name}.log"), "rb") as f:
                out.append(f"--- {name}\n" + f.read().decode(errors="replace")[-3000:])
        return "\n".join(out)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def cluster(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, SPEC)
    with EtcdServer() as srv:
        c = Cluster(srv, str(ckpt), str(tmp_path))
        try:
            c.controller("ctl-a")
            _wait(lambda: status(c.cfg)["leader"] == "ctl-a", 30, "ctl-a to lead")
            c.controller("ctl-b")
            for r in ("r0", "r1", "r2"):
                c.agent(r)
            _wait(lambda: c.committed(), 90, "bootstrap commit")
            yield c
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.close()


def test_leader_killed_then_rank_killed(cluster):
    c1 = cluster.committed()
    cluster.check(c1)
    cluster.kill("ctl-a")
    _wait(lambda: status(cluster.cfg)["leader"] == "ctl-b", 30, "ctl-b to take over")
    victim = c1.members[0].split("#")[0]
    cluster.kill(victim)
    c2 = _wait(lambda: (c := cluster.committed()) and c.epoch > c1.epoch and c, 60, "recovery by ctl-b")
    assert len(c2.members) == 2 and not any(m.startswith(victim + "#") for m in c2.members)
    cluster.check(c2)


def test_etcd_restart_declares_nobody_dead(cluster):
    c1 = cluster.committed()
    cluster.srv.stop()
    time.sleep(3.0)  # longer than the ranks' 2 s lease TTL
    cluster.srv.start()
    # Leases survive a restart (etcd extends them), so no rank is declared dead.
    time.sleep(3.0)
    s = status(cluster.cfg)
    assert s["committed_epoch"] == c1.epoch and len(s["ranks"]) == 3, s
    assert all(p.poll() is None for p in cluster.procs.values()), cluster.logs()
    # The control plane still works: a rank killed now is recovered.
    victim = c1.members[2].split("#")[0]
    cluster.kill(victim)
    c2 = _wait(lambda: (c := cluster.committed()) and c.epoch > c1.epoch and c, 60, "recovery after restart")
    assert len(c2.members) == 2
    cluster.check(c2)


def test_controller_process_started_during_an_etcd_outage_waits_then_leads(tmp_path):
    """``elastic-ep controller`` started while etcd is down stays up (no exit at
    start-up) and leads once etcd answers."""
    srv = EtcdServer()
    c = Cluster(srv, str(tmp_path), str(tmp_path))
    try:
        c.controller("ctl-c")
        time.sleep(3.0)
        assert c.procs["ctl-c"].poll() is None, c.logs()
        srv.start()
        _wait(lambda: status(c.cfg)["leader"] == "ctl-c", 30, "ctl-c to lead once etcd is up")
        assert c.procs["ctl-c"].poll() is None, c.logs()
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()
        srv.close()
