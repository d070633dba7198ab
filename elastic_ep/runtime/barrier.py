"""Store-backed liveness and the per-layer barrier of plan execution.

The store has the ``torch.distributed.Store`` API (``set``/``get``/``check``/``add``):
a ``TCPStore`` or the controller's etcd store. Both primitives tolerate dead
participants, because a rank that dies mid-plan must not stall the survivors.

Safety of the barrier when it gives up on a participant: a rank ``x`` that the others
stopped waiting for may still be reading their old slots. So before passing without
``x`` a rank marks ``x`` *excluded* for that layer, and every rank checks its own mark
*after* announcing its arrival. Either ``x`` arrived before the mark (its reads were
complete before anyone wrote) or it sees the mark and re-reads its peer-fetched slots
of that layer from disk. The store is linearizable, so one of the two always holds.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Protocol, Sequence

from elastic_ep.errors import TransportError


class Liveness(Protocol):
    def alive(self, participant: int) -> bool: ...


class StoreHeartbeat:
    """Each participant bumps a counter in the store every ``period_s``; a peer whose
    counter has not moved for ``dead_after_s`` (by this process's clock, so clocks need
    not agree) is dead. Example::

        hb = StoreHeartbeat(plan_store, "exec", me=0, period_s=0.2, dead_after_s=2.0)
        hb.start(); ...; hb.alive(3); hb.stop()
    """

    def __init__(self, store: Any, prefix: str, me: int, period_s: float = 0.2, dead_after_s: float = 2.0) -> None:
        if not 0 < period_s < dead_after_s:
            raise ValueError(f"need 0 < period_s ({period_s}) < dead_after_s ({dead_after_s})")
        self.store, self.prefix, self.me = store, prefix, me
        self.period_s, self.dead_after_s = period_s, dead_after_s
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, i: int) -> str:
        return f"{self.prefix}/hb/{i}"

    def start(self) -> "StoreHeartbeat":
        self.store.add(self._key(self.me), 1)
        self._thread = threading.Thread(target=self._run, name="elastic-ep-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.store.add(self._key(self.me), 1)
            except Exception:  # the store being briefly away must not kill the thread
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.period_s + 1)

    def alive(self, participant: int) -> bool:
        if participant == self.me:
            return True
        now = time.monotonic()
        count = int(self.store.add(self._key(participant), 0))
        last = self._seen.get(participant)
        if last is None or last[0] != count:
            self._seen[participant] = (count, now)
            return True
        return now - last[1] < self.dead_after_s


class StoreBarrier:
    """``wait(name)`` returns once every participant has arrived or is dead, with the
    list of those it stopped waiting for; :class:`TransportError` at ``timeout_s``.

    ``fenced`` is True after ``wait`` when the others passed without this process.
    """

    def __init__(
        self,
        store: Any,
        prefix: str,
        me: int,
        world: int,
        liveness: Liveness | Callable[[int], bool],
        timeout_s: float = 120.0,
    ) -> None:
        self.store, self.prefix, self.me, self.world = store, prefix, me, world
        self._alive = liveness.alive if hasattr(liveness, "alive") else liveness  # type: ignore[union-attr]
        self.timeout_s = timeout_s
        self.fenced = False

    def _done(self, name: str, i: int) -> str:
        return f"{self.prefix}/{name}/done/{i}"

    def _excluded(self, name: str, i: int) -> str:
        return f"{self.prefix}/{name}/excluded/{i}"

    def wait(self, name: str, participants: Sequence[int] | None = None) -> list[int]:
        who = list(range(self.world)) if participants is None else list(participants)
        self.store.set(self._done(name, self.me), b"1")
        self.fenced = bool(self.store.check([self._excluded(name, self.me)]))
        deadline = time.monotonic() + self.timeout_s
        waiting = [i for i in who if i != self.me]
        poll = 0.001
        while True:
            waiting = [i for i in waiting if not self.store.check([self._done(name, i)])]
            gone = [i for i in waiting if not self._alive(i)]
            if len(gone) == len(waiting):
                for i in gone:
                    self.store.set(self._excluded(name, i), b"1")
                return gone
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"barrier {self.prefix}/{name}: participants {waiting} neither arrived nor "
                    f"were seen dead within {self.timeout_s:.0f} s"
                )
            time.sleep(poll)
            poll = min(poll * 2, 0.02)
