"""A rank's host-memory mirror (:mod:`elastic_ep.runtime.mirror_keeper`) on a real
safetensors checkpoint: rows filled bit-exactly in the background, a row published as
empty before its bytes change (and never touched while that publication fails), no
fill while a plan runs, and the fill's rate bounded."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from elastic_ep.errors import ConfigError
from elastic_ep.runtime.mirror_keeper import MirrorKeeper
from elastic_ep.runtime.slots import model_reference
from elastic_ep.tools.polling import wait_for
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", shards=2, seed=11)
LAYOUT = SPEC.layout()
EB = LAYOUT.expert_bytes
REF = model_reference(SPEC, LAYOUT)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: Any) -> SafetensorsExpertSource:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, SPEC)
    return SafetensorsExpertSource(d, SPEC.naming, LAYOUT, SPEC.moe_layer_ids)


def expected(flat: int) -> torch.Tensor:
    layer, e = divmod(flat, SPEC.experts)
    return REF(layer, [e])[0]


class Published:
    """Records each publication with the bytes of every row at that moment; fails
    while ``failing`` is set."""

    def __init__(self, keeper_ref: list[MirrorKeeper]) -> None:
        self.keeper_ref = keeper_ref
        self.calls: list[tuple[np.ndarray, list[torch.Tensor]]] = []
        self.failing = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> None:
        if self.failing.is_set():
            raise ConnectionError("etcd away")
        k = self.keeper_ref[0]
        with self.lock:
            self.calls.append((rows.copy(), [k.row(i).clone() for i in range(k.rows)]))

    def last(self) -> np.ndarray:
        with self.lock:
            return self.calls[-1][0] if self.calls else np.array([])


def make(disk: SafetensorsExpertSource, rows: int, **kw: Any) -> tuple[MirrorKeeper, Published]:
    ref: list[MirrorKeeper] = []
    pub = Published(ref)
    keeper = MirrorKeeper(rows, LAYOUT, disk, SPEC.experts, publish=pub, **kw)
    ref.append(keeper)
    return keeper, pub


def test_rows_are_filled_bit_exactly_and_published(disk: SafetensorsExpertSource) -> None:
    keeper, pub = make(disk, 4)
    try:
        wanted = np.array([3, -1, 8 + 5, 15])
        keeper.assign(wanted)
        assert keeper.wait_ready(10.0)
        assert np.array_equal(keeper.ready(), wanted) and np.array_equal(pub.last(), wanted)
        for i, flat in enumerate(wanted.tolist()):
            if flat >= 0:
                assert torch.equal(keeper.row(i), expected(flat)), f"row {i}"
        assert keeper.filled_bytes == 3 * EB
        # The same assignment again reads nothing.
        keeper.assign(wanted)
        assert keeper.wait_ready(5.0) and keeper.filled_bytes == 3 * EB
    finally:
        keeper.close()


def test_a_row_is_published_empty_before_its_bytes_change(disk: SafetensorsExpertSource) -> None:
    keeper, pub = make(disk, 2)
    try:
        keeper.assign(np.array([1, 2]))
        assert keeper.wait_ready(10.0)
        old_row0 = keeper.row(0).clone()
        pub.failing.set()
        keeper.assign(np.array([9, 2]))  # row 0: expert 1 -> layer 1 expert 1
        time.sleep(0.5)
        # The publication of row 0's emptiness failed: its bytes must still be expert 1's.
        assert torch.equal(keeper.row(0), old_row0)
        assert keeper.ready()[0] == -1  # not offered as ready either
        pub.failing.clear()
        assert wait_for(lambda: keeper.wait_ready(0.05), 15.0, 0.05)
        assert torch.equal(keeper.row(0), expected(9))
        # Every publication that named row 0 as holding expert 1 saw expert 1's bytes.
        firsts = [i for i, (rows, _) in enumerate(pub.calls) if rows[0] == -1]
        assert firsts, "row 0 was never published as empty"
        for rows, snapshot in pub.calls:
            if rows[0] >= 0:
                assert torch.equal(snapshot[0], expected(int(rows[0])))
    finally:
        keeper.close()


def test_nothing_is_filled_while_a_plan_runs(disk: SafetensorsExpertSource) -> None:
    keeper, pub = make(disk, 3)
    try:
        keeper.pause()
        keeper.assign(np.array([0, 1, 2]))
        time.sleep(0.4)
        assert keeper.filled_bytes == 0 and keeper.pending() == 3
        keeper.resume()
        assert keeper.wait_ready(10.0) and keeper.filled_bytes == 3 * EB
    finally:
        keeper.close()


def test_the_fill_rate_is_bounded(disk: SafetensorsExpertSource) -> None:
    rate = 4 * EB  # four experts a second
    keeper, _ = make(disk, 12, fill_bytes_s=rate)
    try:
        t0 = time.monotonic()
        keeper.assign(np.arange(12))
        time.sleep(1.0)
        elapsed = time.monotonic() - t0
        # At most the rate times the time, plus the one row read before the first wait.
        assert EB <= keeper.filled_bytes <= rate * elapsed + EB
    finally:
        keeper.close()


def test_bad_arguments_are_refused(disk: SafetensorsExpertSource) -> None:
    with pytest.raises(ConfigError, match="rows >= 1"):
        MirrorKeeper(0, LAYOUT, disk, SPEC.experts)
    keeper = MirrorKeeper(2, LAYOUT, disk, SPEC.experts)
    with pytest.raises(ConfigError, match=r"\[3\] rows for a mirror of 2"):
        keeper.assign(np.array([0, 1, 2]))
    keeper.close()
