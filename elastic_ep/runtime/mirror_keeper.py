"""A rank's host-memory mirror: copies of experts other ranks serve, kept so that a
node's loss costs no disk read (:mod:`elastic_ep.core.mirrors` says which experts
each rank keeps).

The mirror is one flat ``uint8`` buffer of ``rows * expert_bytes`` in host memory
(pinned when the weights are on a GPU, so that a peer's read or this rank's own copy
runs at DMA speed), registered with the transport like the weights: a plan's source
``slots_per_rank + i`` is row ``i``. Each row holds one expert in its packed form.

After each commit the agent hands the keeper the rows the committed assignment gives
this rank (:meth:`MirrorKeeper.assign`); a background thread fills the rows whose
expert changed, from the checkpoint, at most ``fill_bytes_s`` bytes a second, and
never while a plan runs (:meth:`pause`). What is ready is published through
``publish(rows)`` (the agent writes ``mirrors/<id>`` under its lease): ``rows[i]`` is
the flat id ``layer * num_logical + logical`` row ``i`` holds, ``-1`` for a row empty
or being written. A row about to be overwritten is first published as ``-1``, and
only once that publication succeeded are its bytes touched: a controller never plans
a read of a row whose bytes are changing.

Example (2 layers of 8 experts; this rank keeps layer 1 expert 3 in row 0)::

    keeper = MirrorKeeper(4, layout, disk, num_logical=8, publish=agent.publish_mirror)
    keeper.assign(np.array([11, -1, -1, -1]))   # after a commit
    keeper.wait_ready(timeout=10.0)             # row 0 filled and published
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import torch

from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.layout import ExpertLayout

from elastic_ep.errors import ConfigError

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 0.25
"""Ready rows are published at most this often while filling (and once at the end)."""


class MirrorKeeper:
    """``rows`` experts of host memory, filled in the background (see the module).

    Attributes:
        buffer: flat uint8 ``[rows * expert_bytes]``, CPU (pinned when ``pin``).
        held: int64 ``[rows]``: the flat expert id each row holds ready, ``-1`` none.
        filled_bytes: bytes written into the buffer since it was made.
    """

    def __init__(self, rows: int, layout: ExpertLayout, disk: SafetensorsExpertSource, num_logical: int, *,
                 pin: bool = False, fill_bytes_s: float = 1 << 30,
                 publish: Callable[[np.ndarray], None] | None = None) -> None:
        if rows < 1 or num_logical < 1 or fill_bytes_s <= 0:
            raise ConfigError(f"a mirror needs rows >= 1, num_logical >= 1 and a positive fill rate, got rows={rows}, "
                              f"num_logical={num_logical}, fill_bytes_s={fill_bytes_s}")
        self.rows, self.layout, self.disk, self.num_logical = rows, layout, disk, num_logical
        self.fill_bytes_s = float(fill_bytes_s)
        self.publish = publish
        self.buffer = torch.empty(rows * layout.expert_bytes, dtype=torch.uint8, pin_memory=pin)
        self.held = np.full(rows, -1, dtype=np.int64)
        self.filled_bytes = 0
        self._wanted = np.full(rows, -1, dtype=np.int64)
        self._lock = threading.Lock()  # guards _wanted and held
        self._work = threading.Event()
        self._running = threading.Event()  # set: filling allowed (no plan runs)
        self._running.set()
        self._stop = threading.Event()
        self._dirty = True  # held changed since the last successful publication
        self._thread: threading.Thread | None = None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def row(self, i: int) -> torch.Tensor:
        eb = self.layout.expert_bytes
        return self.buffer[i * eb : (i + 1) * eb]

    # -- what the agent calls ------------------------------------------------------------
    def assign(self, wanted: np.ndarray) -> None:
        """Keep ``wanted[i]`` (flat expert id, ``-1`` none) in row ``i`` from now on;
        rows that already hold their expert stay as they are."""
        w = np.asarray(wanted, dtype=np.int64)
        if w.shape != (self.rows,):
            raise ConfigError(f"a mirror assignment of {list(w.shape)} rows for a mirror of {self.rows}")
        with self._lock:
            self._wanted = w.copy()
        self._start()
        self._work.set()

    def pause(self) -> None:
        """A plan starts: fill no further row until :meth:`resume` (a row being read
        finishes first; its disk reads are serialised with the plan's)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._work.set()

    def ready(self) -> np.ndarray:
        """A copy of :attr:`held`."""
        with self._lock:
            return self.held.copy()

    def pending(self) -> int:
        """Rows whose wanted expert is not ready yet."""
        with self._lock:
            return int(np.sum((self._wanted >= 0) & (self._wanted != self.held)))

    def republish(self) -> None:
        """Publish the ready rows again (a new registration: the report goes with the lease)."""
        self._dirty = True
        self._work.set()

    def wait_ready(self, timeout: float) -> bool:
        """True once every wanted row is ready and published (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pending() and not self._dirty:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._work.set()
        self._running.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # -- the fill thread -------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="elastic-ep-mirror", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._work.wait(1.0)
            self._work.clear()
            try:
                self._fill()
            except Exception:  # a serving process's mirror must not die of one bad pass
                log.exception("mirror fill failed; trying again")
                self._stop.wait(1.0)
                self._work.set()

    def _fill(self) -> None:
        """Publish the rows about to change as empty, then fill them one by one."""
        self._running.wait()
        with self._lock:
            todo = np.flatnonzero(self._wanted != self.held)
            stale = todo[self.held[todo] >= 0]
            if stale.size:
                self.held[stale] = -1
                self._dirty = True
        # Nothing is overwritten before the rows' emptiness is published.
        if not self._flush():
            self._stop.wait(0.5)
            self._work.set()
            return
        started, written, last = time.monotonic(), 0, time.monotonic()
        for i in todo.tolist():
            if self._stop.is_set() or not self._running.is_set():
                self._work.set()  # resume() wakes the rest
                break
            with self._lock:
                want = int(self._wanted[i])
            if want < 0 or want == self.held[i]:
                continue
            self.disk.read_packed([divmod(want, self.num_logical)], self.buffer,
                                  [i * self.layout.expert_bytes])
            with self._lock:
                if int(self._wanted[i]) == want:  # not reassigned while it was read
                    self.held[i] = want
                    self._dirty = True
            written += self.layout.expert_bytes
            self.filled_bytes += self.layout.expert_bytes
            if time.monotonic() - last >= PUBLISH_EVERY_S:
                self._flush()
                last = time.monotonic()
            # Bounded bandwidth: a background fill must not crowd serving's I/O.
            self._stop.wait(max(0.0, started + written / self.fill_bytes_s - time.monotonic()))
        self._flush()

    def _flush(self) -> bool:
        """Publish :attr:`held` if it changed; False when the publication failed."""
        if self.publish is None:  # nobody to tell: nothing can read a row here
            self._dirty = False
            return True
        if not self._dirty:
            return True
        rows = self.ready()
        self._dirty = False
        try:
            self.publish(rows)
            return True
        except Exception as e:  # etcd away: try again on the next pass
            self._dirty = True
            log.warning("mirror: ready rows not published: %s", e)
            return False
