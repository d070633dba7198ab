"""MooncakeTransport between real processes on loopback (TCP protocol).

The pytest process is the TCPStore master and the reading participant; the sources
are spawned processes that register their weights, publish their endpoint and serve
until told to stop. Weights are filled from (rank, layer) seeds, so the reader can
rebuild any peer's slot and check the staged bytes against ``layout.pack_slot``.

Starting a process costs seconds here (importing torch), so the tests share one
module-wide set of participants, each test with its own sources (see ``ROLES``):
tests stay independent of each other's order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Iterator

import pytest
import torch
from torch.distributed import TCPStore

from elastic_ep.errors import TransportError
from loaders.layout import ExpertLayout, moe_layout
from loaders.transport import PeerRead, get_transport, wait_for_key
from tests.procs import seeded_weights

# The transport module sets mooncake's environment defaults before importing it, so it
# is imported first (mooncake reads its log level on import).
try:
    from loaders.transport.mooncake_backend import MooncakeTransport
except ImportError as e:
    if "mooncake" not in str(e) and not (e.name or "").startswith("mooncake"):
        raise
    pytest.skip(f"mooncake cannot be imported ({e}); pip install 'elastic-ep[mooncake]'", allow_module_level=True)

PREFIX = "test/mooncake"
EPOCH = 3
LAYERS = 3
SLOTS = 4
STOP_KEY = f"{PREFIX}/stop"
SERVE_S = 60.0  # a source serves at most this long if the test never stops it
MARGIN_S = 1.0  # allowed beyond a round's timeout


def _layout() -> ExpertLayout:
    return moe_layout(hidden=64, intermediate=32, dtype=torch.bfloat16, fused=True)


def _weights(layout: ExpertLayout, rank: int, layers: int = LAYERS) -> list[dict[str, torch.Tensor]]:
    return seeded_weights(layout, rank, layers, SLOTS)


def _serve(rank: int, world: int, port: int) -> None:
    """A source participant: register, publish, serve until STOP_KEY appears."""
    store = TCPStore("127.0.0.1", port, world, is_master=False)
    layout = _layout()
    t = MooncakeTransport(layout, prefix=PREFIX)
    t.register_weights(_weights(layout, rank))
    t.connect(EPOCH, rank, world, store)
    t.register_staging(torch.zeros(layout.expert_bytes, dtype=torch.uint8))
    try:
        wait_for_key(store, STOP_KEY, time.monotonic() + SERVE_S)
    except TransportError:
        pass
    t.close()


ROLES = {
    "live": [0, 1],
    "never_started": [2],
    "killed_after_contact": [3],
    "killed_before_contact": [4],
    "stopped_after_contact": [5],
    "stopped_before_contact": [6],
}
WORLD = 8  # the reader is participant 7


class Cluster:
    """A TCPStore on a free port, source processes, and the reader (this process)."""

    def __init__(self, world: int, sources: list[int]) -> None:
        self.world = world
        self.store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.procs = {r: ctx.Process(target=_serve, args=(r, world, self.store.port), daemon=True) for r in sources}
        for p in self.procs.values():
            p.start()
        try:
            self.layout = _layout()
            self.expected = {r: _weights(self.layout, r) for r in range(world)}
            self.me = world - 1
            self.reader = MooncakeTransport(self.layout, prefix=PREFIX)
            self.reader.register_weights(self.expected[self.me])
            self.reader.connect(EPOCH, self.me, world, self.store)
            self.fresh_staging()
        except BaseException:
            self._end_sources()
            raise

    def fresh_staging(self) -> torch.Tensor:
        """A new staging buffer of 8 slots, every byte 0xAB (also clears ``staging_poisoned``)."""
        self.staging = torch.full((8 * self.layout.expert_bytes,), 0xAB, dtype=torch.uint8)
        self.reader.register_staging(self.staging)
        return self.staging

    def wait_published(self, ranks: list[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for r in ranks:
            wait_for_key(self.store, self.reader.endpoint_key(r), deadline)

    def check(self, layer: int, reads: list[PeerRead]) -> None:
        """Every read's staging bytes equal the source's packed slot."""
        eb = self.layout.expert_bytes
        for r in reads:
            want = self.layout.pack_slot(self.expected[r.src][layer], r.src_slot)
            got = self.staging[r.dst_offset : r.dst_offset + eb]
            assert torch.equal(got, want), f"layer {layer} {r}: staged bytes differ from the source's slot"

    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL, f"source {rank} still there after SIGKILL (exitcode {p.exitcode})"

    def stop(self, rank: int) -> None:
        """SIGSTOP the source and wait until every thread of it is stopped (the signal
        is asynchronous: a thread running elsewhere could still answer a request)."""
        pid = self.procs[rank].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = []
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            if all(st in ("T", "t") for st in states):
                return
            time.sleep(0.01)
        raise AssertionError(f"source {rank} not stopped 10 s after SIGSTOP (thread states {states})")

    def transfer(self, layer: int, reads: list[PeerRead], timeout: float) -> tuple[list[BaseException | None], float]:
        t = time.monotonic()
        out = self.reader.transfer(layer, reads, [], timeout)
        return out, time.monotonic() - t

    def _end_sources(self) -> None:
        self.store.set(STOP_KEY, "1")
        for p in self.procs.values():
            p.join(15)
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)

    def close(self) -> None:
        try:
            self._end_sources()
        finally:
            self.reader.close()
        for r in ROLES["live"]:
            assert self.procs[r].exitcode == 0, f"source {r} ended with exit code {self.procs[r].exitcode}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    sources = [r for name, ranks in ROLES.items() if name != "never_started" for r in ranks]
    c = Cluster(WORLD, sources)
    try:
        c.wait_published(sources)
        yield c
    finally:
        c.close()


def test_reads_slots_of_several_layers_bit_exact(cluster: Cluster) -> None:
    c, eb = cluster, cluster.layout.expert_bytes
    plans = {
        0: [PeerRead(0, 3, 0), PeerRead(0, 0, 2 * eb), PeerRead(0, 2, 5 * eb)],
        1: [PeerRead(0, 1, 7 * eb), PeerRead(c.me, 2, 3 * eb)],  # the second: the reader's own slot
        2: [PeerRead(0, s, (3 - s) * eb) for s in range(SLOTS)],
    }
    for layer, reads in plans.items():
        staging = c.fresh_staging()
        out, _ = c.transfer(layer, reads, timeout=10.0)
        assert out == [None] * len(reads)
        c.check(layer, reads)
        written = {r.dst_offset // eb for r in reads}
        for k in set(range(8)) - written:  # nothing outside the requested ranges
            assert bool((staging[k * eb : (k + 1) * eb] == 0xAB).all()), f"layer {layer}: slot range {k} was written"
        assert not c.reader.staging_poisoned


def test_one_round_reads_from_two_peers(cluster: Cluster) -> None:
    c, eb = cluster, cluster.layout.expert_bytes
    c.fresh_staging()
    reads = [PeerRead(1, 3, 0), PeerRead(0, 3, eb), PeerRead(0, 1, 2 * eb), PeerRead(1, 0, 3 * eb)]
    out, _ = c.transfer(1, reads, timeout=10.0)
    assert out == [None] * len(reads)
    c.check(1, reads)


def test_unpublished_peer_fails_within_the_timeout(cluster: Cluster) -> None:
    """Its reads fail at the deadline; the live peers' reads in the same round do not wait."""
    c, eb = cluster, cluster.layout.expert_bytes
    (never,) = ROLES["never_started"]
    c.fresh_staging()
    timeout = 1.5
    reads = [PeerRead(never, 0, 0), PeerRead(0, 2, eb), PeerRead(never, 3, 2 * eb), PeerRead(1, 1, 3 * eb)]
    out, took = c.transfer(0, reads, timeout)
    assert timeout - 0.1 < took < timeout + MARGIN_S
    for i in (0, 2):
        assert isinstance(out[i], TransportError) and "no endpoint" in str(out[i]), out[i]
    assert out[1] is None and out[3] is None
    c.check(0, [reads[1], reads[3]])
    out, took = c.transfer(0, [PeerRead(never, 1, 0)], timeout)
    assert took < 0.5 and isinstance(out[0], TransportError) and "failed earlier" in str(out[0])


def test_killed_sources_fail_their_reads_at_once(cluster: Cluster) -> None:
    """One source dies after it was read from, one before first contact."""
    c, eb = cluster, cluster.layout.expert_bytes
    (warm,), (cold,) = ROLES["killed_after_contact"], ROLES["killed_before_contact"]
    c.fresh_staging()
    out, _ = c.transfer(0, [PeerRead(warm, 0, 0)], timeout=10.0)
    assert out == [None]
    c.kill(warm)
    c.kill(cold)
    timeout = 3.0
    reads = [PeerRead(warm, 1, 0), PeerRead(cold, 1, eb), PeerRead(0, 1, 2 * eb), PeerRead(warm, 2, 3 * eb)]
    out, took = c.transfer(2, reads, timeout)
    print(f"round with two killed sources took {took:.3f} s")
    assert took < timeout + MARGIN_S
    for i in (0, 1, 3):
        assert isinstance(out[i], TransportError), out[i]
        assert f"participant {reads[i].src}" in str(out[i]) and "layer 2" in str(out[i])
    assert "rc -" in str(out[0]) and "probe" in str(out[1])
    assert out[2] is None
    c.check(2, [reads[2]])
    # The dead are remembered: no second wait; the live source still serves.
    c.fresh_staging()
    reads = [PeerRead(warm, 3, 0), PeerRead(0, 3, eb)]
    out, took = c.transfer(1, reads, timeout)
    assert took < 0.5
    assert isinstance(out[0], TransportError) and "failed earlier" in str(out[0])
    assert out[1] is None
    c.check(1, [reads[1]])


def test_frozen_sources_fail_their_reads_at_the_deadline(cluster: Cluster) -> None:
    """One source is stopped after it was read from, one before first contact; a live
    source read afterwards must not wait for either (the engine's handshake lock)."""
    c, eb = cluster, cluster.layout.expert_bytes
    (warm,), (cold,) = ROLES["stopped_after_contact"], ROLES["stopped_before_contact"]
    c.fresh_staging()
    out, _ = c.transfer(0, [PeerRead(warm, 0, 0)], timeout=10.0)
    assert out == [None]
    try:
        c.stop(warm)
        c.stop(cold)
        timeout = 1.0
        out, took = c.transfer(1, [PeerRead(warm, 1, 0), PeerRead(cold, 1, eb)], timeout)
        print(f"round with two frozen sources took {took:.3f} s")
        assert timeout - 0.1 < took < timeout + MARGIN_S
        assert isinstance(out[0], TransportError) and "read not answered" in str(out[0]), out[0]
        assert isinstance(out[1], TransportError) and "probe not answered" in str(out[1]), out[1]
        assert c.reader.staging_poisoned  # the abandoned read may still land
        c.fresh_staging()
        reads = [PeerRead(1, 2, 2 * eb)]
        out, took = c.transfer(2, reads, timeout=5.0)
        assert out == [None] and took < 0.5, (out, took)
        c.check(2, reads)
    finally:
        for r in (warm, cold):
            c.kill(r)  # SIGKILL ends a stopped process too
    # Both abandoned engine calls end once their peers are gone.
    deadline = time.monotonic() + 10
    while any(t.name.startswith("mooncake-read") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("mooncake-read") for t in threading.enumerate())


def test_get_transport_builds_it(cluster: Cluster) -> None:
    t = get_transport("mooncake", cluster.layout, prefix=PREFIX, host="127.0.0.1", protocol="tcp")
    assert isinstance(t, MooncakeTransport) and t.endpoint()["session"].startswith("127.0.0.1:")
