"""Mirror rows (a rank's host-memory copies of packed experts) read through every
transport: participant 1 (a spawned process) registers weights and a mirror, and
participant 0 (this process, also the TCPStore master) reads in one exchange a mirror
row of participant 1, a GPU slot of participant 1 and a row of its own mirror, checked
byte for byte. A row beyond a mirror is a ConfigError outcome, never a crash. In this
process: the weight table with and without a mirror, and bad mirror buffers.

Participant 1 takes commands from the store (``cmd/<n>``: the layer and the sends a
two-sided transport must post for participant 0's reads) and acks each (``ack/<n>``),
so one driver serves the one-sided backends (nothing to post) and torch alike.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from datetime import timedelta
from typing import Any, Iterator

import pytest

# See tests/test_nixl_transport.py: UCX's InfiniBand module crashes nixl's process at exit.
os.environ.setdefault("UCX_MODULES", "^ib")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from elastic_ep.errors import ConfigError, TransportError  # noqa: E402
from loaders.layout import ExpertLayout, moe_layout  # noqa: E402
from loaders.transport import (  # noqa: E402
    PeerSend,
    PeerSource,
    PeerTransport,
    Receive,
    ReceiveOutcome,
    Segment,
    WeightTable,
    get_transport,
    wait_for_key,
)
from tests.procs import seeded_weights  # noqa: E402

LAYERS, SLOTS = 3, 4
ROWS = {0: 2, 1: 3}  # mirror rows of each participant
EPOCH = 1
TIMEOUT = 5.0  # of each round of reads
WAIT_S = 60.0  # upper bound on any wait for the other process
LAYOUT: ExpertLayout = moe_layout(hidden=64, intermediate=32, dtype=torch.bfloat16, fused=True, scale_block=16)
EB = LAYOUT.expert_bytes
BACKEND_MODULES = {"torch": "torch.distributed", "nixl": "loaders.transport.nixl_backend",
                   "mooncake": "loaders.transport.mooncake_backend"}


def make_weights(rank: int) -> list[dict[str, torch.Tensor]]:
    return seeded_weights(LAYOUT, rank, LAYERS, SLOTS)


def make_mirror(rank: int) -> torch.Tensor:
    """``ROWS[rank]`` packed experts: row r is slot ``r % SLOTS`` of layer ``r % LAYERS``
    of a checkpoint rank (seed ``50 + rank``) that serves nowhere, so no row equals a
    GPU slot of any participant."""
    source = make_weights(50 + rank)
    rows = [LAYOUT.pack_slot(source[r % LAYERS], r % SLOTS) for r in range(ROWS[rank])]
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.uint8)


def epoch_store(store: Any) -> Any:
    """The epoch's own keys, as the executor scopes each plan's."""
    return dist.PrefixStore(f"epoch/{EPOCH}", store)


def peer_main(backend: str, port: int) -> None:
    """Participant 1: register weights and a mirror, connect, then run the exchanges the
    store commands until ``stop`` (or ``WAIT_S`` without a command)."""
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=WAIT_S))
    tp = get_transport(backend, LAYOUT)
    weights, mirror = make_weights(1), make_mirror(1)
    tp.register_weights(weights)
    tp.register_mirror(mirror)
    tp.connect(EPOCH, 1, 2, epoch_store(store), timeout=WAIT_S)
    tp.register_staging(torch.zeros(EB, dtype=torch.uint8))
    store.set("ready/1", "1")
    n = 0
    while True:
        try:
            cmd = json.loads(wait_for_key(store, f"cmd/{n}", time.monotonic() + WAIT_S))
        except TransportError:
            break  # the test is gone
        if cmd == "stop":
            break
        try:
            tp.exchange(cmd["layer"], [], [PeerSend(dst, slot) for dst, slot in cmd["sends"]], TIMEOUT)
            store.set(f"ack/{n}", "ok")
        except Exception as e:  # noqa: BLE001 (any failure is reported to the test, which fails on it)
            store.set(f"ack/{n}", f"{type(e).__name__}: {e}")
        n += 1
    tp.close()


class Pair:
    """Participant 0 (this process) and participant 1 (spawned) on one backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=WAIT_S))
        self.proc = mp.get_context("spawn").Process(target=peer_main, args=(backend, self.store.port), daemon=True)
        self.proc.start()
        self.n = 0
        self.tp: PeerTransport | None = None
        try:
            self.tp = get_transport(backend, LAYOUT)
            self.weights, self.mirror = make_weights(0), make_mirror(0)
            self.tp.register_weights(self.weights)
            self.tp.register_mirror(self.mirror)
            self.tp.connect(EPOCH, 0, 2, epoch_store(self.store), timeout=WAIT_S)
            self.tp.register_staging(torch.empty(8 * EB, dtype=torch.uint8))
            wait_for_key(self.store, "ready/1", time.monotonic() + WAIT_S)
        except BaseException:
            self.close()
            raise

    def exchange(self, layer: int, receives: list[Receive], peer_sends: list[tuple[int, int]]) -> list[ReceiveOutcome]:
        """Participant 0's exchange of ``receives`` while participant 1 runs its own with
        ``peer_sends`` ((dst, slot) pairs); staging is filled with 0xA5 first."""
        assert self.tp is not None and self.tp.staging is not None
        self.tp.staging.fill_(0xA5)
        n, self.n = self.n, self.n + 1
        self.store.set(f"cmd/{n}", json.dumps({"layer": layer, "sends": peer_sends}))
        out = self.tp.exchange(layer, receives, [], TIMEOUT)
        ack = wait_for_key(self.store, f"ack/{n}", time.monotonic() + WAIT_S).decode()
        assert ack == "ok", f"participant 1 failed its part of exchange {n}: {ack}"
        return out

    def staged(self, offset: int) -> torch.Tensor:
        assert self.tp is not None and self.tp.staging is not None
        return self.tp.staging[offset : offset + EB]

    def close(self) -> None:
        try:
            if self.tp is not None:
                self.tp.close()
        finally:
            self.store.set(f"cmd/{self.n}", json.dumps("stop"))
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


@pytest.fixture(scope="module", params=sorted(BACKEND_MODULES))
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    pytest.importorskip(BACKEND_MODULES[request.param])
    p = Pair(request.param)
    try:
        yield p
    finally:
        p.close()


def mirror_row(rank: int, row: int) -> torch.Tensor:
    return make_mirror(rank)[row * EB : (row + 1) * EB]


def test_one_exchange_reads_peer_mirror_rows_a_peer_slot_and_an_own_mirror_row(pair: Pair) -> None:
    layer = 2  # a mirror row is the same bytes whatever the layer of the read
    receives = [
        Receive(3 * EB, (PeerSource(1, SLOTS + 2),)),  # (a) participant 1's mirror row 2
        Receive(0, (PeerSource(1, 1),)),  # (b) participant 1's GPU slot 1
        Receive(6 * EB, (PeerSource(0, SLOTS + 1),)),  # (c) this process's mirror row 1
        Receive(EB, (PeerSource(1, SLOTS),)),  # (a) again: row 0, beside the others
    ]
    out = pair.exchange(layer, receives, [(0, SLOTS + 2), (0, 1), (0, SLOTS)])
    assert [(o.delivered, o.failures) for o in out] == [(0, ())] * len(receives), out
    assert torch.equal(pair.staged(3 * EB), mirror_row(1, 2))
    assert torch.equal(pair.staged(0), LAYOUT.pack_slot(make_weights(1)[layer], 1))
    assert torch.equal(pair.staged(6 * EB), mirror_row(0, 1))
    assert torch.equal(pair.staged(EB), mirror_row(1, 0))
    untouched = [2, 4, 5, 7]
    assert all(bool((pair.staged(k * EB) == 0xA5).all()) for k in untouched), "a read wrote outside its offset"


def test_a_row_beyond_a_mirror_is_a_config_error_outcome(pair: Pair) -> None:
    receives = [
        Receive(0, (PeerSource(1, SLOTS + ROWS[1]),)),  # one past participant 1's mirror
        Receive(EB, (PeerSource(0, SLOTS + ROWS[0]),)),  # one past its own
        Receive(2 * EB, (PeerSource(1, 0),)),  # a good read in the same exchange
    ]
    # A two-sided source is asked for the bad row too (a wrong plan would): it must skip it.
    out = pair.exchange(0, receives, [(0, SLOTS + ROWS[1]), (0, 0)])
    for o in out[:2]:
        assert o.delivered is None and len(o.failures) == 1 and isinstance(o.failures[0][1], ConfigError), o
        assert "mirror rows" in str(o.failures[0][1])
    assert out[2].delivered == 0, out[2]
    assert torch.equal(pair.staged(2 * EB), LAYOUT.pack_slot(make_weights(1)[0], 0))
    # The bad row is no fault of participant 1: it is still read from afterwards.
    out = pair.exchange(1, [Receive(0, (PeerSource(1, SLOTS + 1),))], [(0, SLOTS + 1)])
    assert out[0].delivered == 0, out[0]
    assert torch.equal(pair.staged(0), mirror_row(1, 1))


# -- in this process ----------------------------------------------------------------------
def test_weight_table_round_trip_with_and_without_a_mirror() -> None:
    plain = WeightTable.of(LAYOUT, make_weights(0))
    assert (plain.mirror_base, plain.mirror_rows, plain.mirror_device, plain.mirror_device_id) == (0, 0, "cpu", 0)
    mirrored = WeightTable(plain.bases, plain.row_bytes, SLOTS, "cuda", 1, mirror_base=1 << 40, mirror_rows=3)
    for t in (plain, mirrored):
        assert WeightTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert mirrored.segments(0, SLOTS + 2) == mirrored.segments(LAYERS - 1, SLOTS + 2) == [Segment((1 << 40) + 2 * EB, 0, EB)]
    assert len(mirrored.segments(1, SLOTS - 1)) == len(LAYOUT.tensors)
    for table, slot in [(plain, SLOTS), (mirrored, SLOTS + 3), (mirrored, -1)]:
        with pytest.raises(ConfigError, match="mirror rows"):
            table.segments(0, slot)


def test_an_endpoint_from_before_mirrors_parses_with_no_mirror() -> None:
    old = {"bases": [[4096, 8192]], "row_bytes": [1024, 512], "slots_per_rank": 4, "device": "cpu", "device_id": 0}
    t = WeightTable.from_dict(old)
    assert (t.mirror_rows, t.mirror_base) == (0, 0) and not t.holds(4) and t.holds(3)


@pytest.mark.parametrize("bad", [
    {"mirror_rows": -1}, {"mirror_rows": 1 << 40}, {"mirror_rows": 2.0}, {"mirror_rows": True},
    {"mirror_base": -5}, {"mirror_base": "0x10"}, {"mirror_base": (1 << 64) - 16, "mirror_rows": 1},
    {"mirror_device": "tpu"}, {"mirror_device_id": -1},
])
def test_a_malformed_mirror_in_a_peer_table_is_a_transport_error(bad: dict[str, Any]) -> None:
    d = {"bases": [[4096, 8192]], "row_bytes": [1024, 512], "slots_per_rank": 4, "device": "cpu", "device_id": 0, **bad}
    with pytest.raises(TransportError):
        WeightTable.from_dict(d)


def test_register_mirror_refuses_a_bad_buffer_and_keeps_the_table() -> None:
    tp = get_transport("torch", LAYOUT)
    with pytest.raises(ConfigError, match="register_weights before register_mirror"):
        tp.register_mirror(torch.zeros(EB, dtype=torch.uint8))
    tp.register_weights(make_weights(0))
    before = tp.table
    for bad in [
        torch.zeros(EB + 1, dtype=torch.uint8),  # not whole rows
        torch.zeros(EB // 2, dtype=torch.int16),  # not bytes
        torch.zeros(2, EB, dtype=torch.uint8),  # not flat
        torch.zeros(2 * EB, dtype=torch.uint8)[::2],  # not contiguous
        torch.zeros(EB, dtype=torch.uint8, device="meta"),  # not host memory
    ]:
        with pytest.raises(ConfigError, match=f"whole {EB}-byte rows"):
            tp.register_mirror(bad)
    assert tp.table == before and tp.mirror is None


def test_own_slots_and_mirror_rows_pack_and_survive_registering_weights_again() -> None:
    tp = get_transport("torch", LAYOUT)
    weights, mirror = make_weights(0), make_mirror(0)
    tp.register_weights(weights)
    tp.register_mirror(mirror)
    assert tp.table is not None and (tp.table.mirror_base, tp.table.mirror_rows) == (mirror.data_ptr(), ROWS[0])
    tp.register_weights(weights)  # the mirror stays registered
    assert tp.table.mirror_rows == ROWS[0]
    out = torch.empty(EB, dtype=torch.uint8)
    assert torch.equal(tp.pack_own(1, SLOTS + 1, out), mirror_row(0, 1))
    assert torch.equal(tp.pack_own(1, 2, out), LAYOUT.pack_slot(weights[1], 2))
    with pytest.raises(ConfigError):
        tp.pack_own(0, SLOTS + ROWS[0], out)
