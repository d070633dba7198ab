"""The per-layer barrier and heartbeats over a real TCPStore, with threads as
participants: dead participants are excluded, a late one sees its mark, and a poll
round costs each rank a constant number of store operations whatever the world size."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch.distributed as dist

from elastic_ep.runtime.barrier import CountingStore, StoreBarrier, StoreHeartbeat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def master() -> Any:
    store = dist.TCPStore("127.0.0.1", _free_port(), is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    yield store


def _client(master: Any) -> Any:
    return dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=30))


def _run(world: int, body: Callable[[int], Any]) -> list[Any]:
    """``body(i)`` in one thread per participant; the results in participant order."""
    out: list[Any] = [None] * world

    def target(i: int) -> None:
        try:
            out[i] = body(i)
        except BaseException as e:  # surfaced by the caller's assertions
            out[i] = e

    threads = [threading.Thread(target=target, args=(i,)) for i in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def _layers(master: Any, world: int, layers: int) -> list[tuple[list[list[int]], int, float]]:
    """Every participant passes ``layers`` barriers: per participant its excluded lists,
    its store operations and its seconds."""
    clients = [CountingStore(_client(master)) for _ in range(world)]

    def body(i: int) -> tuple[list[list[int]], int, float]:
        barrier = StoreBarrier(clients[i], "exec", i, world, lambda p: True, timeout_s=30)
        t0 = time.perf_counter()
        gone = [barrier.wait(f"layer/{layer}") for layer in range(layers)]
        return gone, clients[i].total, time.perf_counter() - t0

    return _run(world, body)


def test_all_arrive_nobody_excluded(master: Any) -> None:
    for gone, _, _ in _layers(master, 4, 3):
        assert gone == [[], [], []]


def test_a_dead_participant_is_excluded_and_the_others_pass(master: Any) -> None:
    world, dead = 4, 2
    hbs = [StoreHeartbeat(_client(master), "exec", i, period_s=0.05, dead_after_s=0.5).start() for i in range(world)]
    hbs[dead].stop()  # dies before it reaches the barrier

    def body(i: int) -> tuple[list[int], bool]:
        b = StoreBarrier(_client(master), "exec", i, world, hbs[i], timeout_s=20)
        return b.wait("layer/0"), b.fenced

    out = _run(world, lambda i: None if i == dead else body(i))
    for hb in hbs:
        hb.stop()
    assert [o for i, o in enumerate(out) if i != dead] == [([dead], False)] * (world - 1)

    late = StoreBarrier(_client(master), "exec", dead, world, lambda p: True, timeout_s=5)
    assert late.wait("layer/0") == [] and late.fenced  # it must re-read from disk


def test_a_silent_participant_that_lives_times_out(master: Any) -> None:
    from elastic_ep.errors import TransportError

    b = StoreBarrier(_client(master), "exec", 0, 2, lambda p: True, timeout_s=0.3, stall_s=0.05)
    with pytest.raises(TransportError, match="neither arrived nor were seen dead"):
        b.wait("layer/0")


def _ops_per_rank_per_layer(master: Any, world: int, layers: int = 5) -> tuple[float, float]:
    out = _layers(master, world, layers)
    assert all(not isinstance(o, BaseException) for o in out), out
    ops = max(o[1] for o in out) / layers
    ms = 1000 * max(o[2] for o in out) / layers
    return ops, ms


def test_store_ops_per_rank_do_not_grow_with_the_world(master: Any) -> None:
    small, _ = _ops_per_rank_per_layer(master, 4)
    large, _ = _ops_per_rank_per_layer(_fresh(), 32)
    print(f"store ops per rank per layer: world 4 {small:.1f}, world 32 {large:.1f}")
    # Arrival is 3 operations and each poll one; polls back off to 20 ms, so a rank
    # waits out slower threads in a bounded number of polls, not one read per peer.
    assert large <= 3 * max(small, 10)


def _fresh() -> Any:
    return dist.TCPStore("127.0.0.1", _free_port(), is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)


@pytest.mark.parametrize("world", [8, 64])
def test_barrier_time_per_layer(world: int) -> None:
    ops, ms = _ops_per_rank_per_layer(_fresh(), world, layers=5)
    print(f"world {world}: {ms:.1f} ms per layer, {ops:.1f} store ops per rank per layer")
