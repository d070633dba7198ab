"""A death during a plan costs no more than one outside it: a participant that freezes
or crashes mid-plan is confirmed dead by its peers and the controller, and the waits
that depend on it (two-sided reads from it, the layer barrier) end at once.

The ranks wait for a silent participant 60 s by their own deadlines (heartbeat
staleness, source timeout) and leases are 30 s, so a recovery within the 25 s bound
below can only come from the confirmed death ending those waits."""

from __future__ import annotations

import os
import signal
import time

import pytest

from controller.etcd_client import EtcdConfig
from controller.records import member_id
from controller.view import read_view
from elastic_ep.tools.invariants import check_commit, require
from elastic_ep.tools.polling import wait_until
from elastic_ep.tools.synthetic_rank import SyntheticRank
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint
from tests.procs import read_committed, running_deployment

SPEC = SyntheticSpec(layers=3, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=9)
SLOTS, LEASE_S, WAIT_S = 4, 30, 60.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return str(d)



@pytest.mark.parametrize("transport,freeze", [
    ("torch", ("peer", 1, "SIGSTOP")),  # the survivors wait in two-sided reads from it
    ("torch", ("barrier", 1, "SIGSTOP")),  # ... at the layer barrier
    ("torch", ("peer", 1, "SIGKILL")),
    ("nixl", ("write", 0, "SIGSTOP")),  # one-sided reads of its frozen memory never end
])
def test_a_participant_lost_mid_plan_ends_the_waits_on_it(ckpt, transport, freeze):
    def make_rank(cfg: EtcdConfig, rid: str) -> SyntheticRank:
        return SyntheticRank(cfg, rid, ckpt, SPEC, SLOTS, transport=transport, lease_ttl_s=LEASE_S,
                             source_timeout_s=WAIT_S, dead_after_s=WAIT_S, freeze=freeze if rid == "r2" else None)

    with running_deployment(SPEC, SLOTS, ["r0", "r1", "r2", "r3"], make_rank, 10.0, 0.05) as (_, procs, client,
                                                                                               root, c1):
        # r3 killed outside a plan: the plan that replaces it stops r2 mid-way.
        t0 = time.monotonic()
        os.kill(procs["r3"].pid, signal.SIGKILL)
        c2 = wait_until(lambda: (c := read_committed(client, root))
                        and not {"r2", "r3"} & {member_id(m) for m in c.members} and c, 25,
                        f"a commit without r3 and r2 ({freeze[2]} at {freeze[0]} of layer {freeze[1]})")
        print(f"{freeze}: kill -> committed without both {time.monotonic() - t0:.2f} s, epochs "
              f"{c1.epoch} -> {c2.epoch}; phases {c2.phases}")
        assert len(c2.members) == 2 and c2.epoch >= c1.epoch + 2
        require(check_commit(read_view(client, root, whole_plan=True, loads=True)))
