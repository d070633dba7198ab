"""Store-backed liveness and the per-layer barrier of plan execution.

The store has the ``torch.distributed.Store`` API (``set``/``get``/``check``/``add``):
a ``TCPStore`` or the controller's etcd store. Both primitives tolerate dead
participants, because a rank that dies mid-plan must not stall the survivors.

Cost. A layer's barrier is on every rank's hot path (58 layers for DeepSeek-V3, up to
hundreds of ranks), so a poll round costs one store operation per rank: each rank
announces its arrival with one ``add`` on the layer's counter and polls the counter
with ``add(key, 0)``. Only when the counter stalls below the number expected (no change
for ``stall_s``) does a rank look at who is missing (one ``check`` of many keys, halved
until the missing ones are found) and read the heartbeats of the missing ones only.
Keys, for a barrier named ``layer/3`` under prefix ``exec``::

    exec/layer/3/arrived          counter: how many participants arrived
    exec/layer/3/done/<i>         participant i arrived (read only while stalled)
    exec/layer/3/excluded/<i>     the others passed without participant i

Safety of the barrier when it gives up on a participant: a rank ``x`` that the others
stopped waiting for may still be reading their old slots. So before passing without
``x`` a rank marks ``x`` *excluded* for that layer, and every rank checks its own mark
*after* announcing its arrival (``done`` first, then the counter). A rank passes
without ``x`` only after it saw ``done/x`` absent and then wrote the mark. Either ``x``
announced before the mark (its reads were complete before anyone wrote) or it sees
the mark and re-reads its peer-fetched slots of that layer from disk. The store is
linearizable, so one of the two always holds. Passing by the counter needs no mark:
a full count means every participant announced after its reads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, Protocol

from elastic_ep.errors import TransportError


class Liveness(Protocol):
    def alive(self, participant: int) -> bool: ...


class CountingStore:
    """A store that counts the calls made through it, by method: how a test (or a
    benchmark) sees what the barrier costs. Example::

        s = CountingStore(tcp_store); s.add("k", 1); s.calls["add"] == 1; s.total == 1
    """

    COUNTED = ("set", "get", "check", "add", "compare_set", "delete_key", "wait", "multi_get", "multi_set")

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


class StoreHeartbeat:
    """Each participant bumps a counter in the store every ``period_s``; a peer whose
    counter has not moved for ``dead_after_s`` (by this process's clock, so clocks need
    not agree) is dead. ``alive`` reads one counter: the barrier asks only about the
    participants it is missing. Example::

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
    ``stall_s``: how long the arrival counter must stay still before this process looks
    at who is missing (and again between looks while it stays still). Example::

        b = StoreBarrier(store, "exec", me=0, world=4, liveness=hb)
        gone = b.wait("layer/0")   # [] when all four arrived
    """

    def __init__(
        self,
        store: Any,
        prefix: str,
        me: int,
        world: int,
        liveness: Liveness | Callable[[int], bool],
        timeout_s: float = 120.0,
        stall_s: float = 0.1,
    ) -> None:
        self.store, self.prefix, self.me, self.world = store, prefix, me, world
        self._alive = liveness.alive if hasattr(liveness, "alive") else liveness  # type: ignore[union-attr]
        self.timeout_s, self.stall_s = timeout_s, stall_s
        self.fenced = False

    def _key(self, name: str, what: str, i: int | None = None) -> str:
        return f"{self.prefix}/{name}/{what}" + ("" if i is None else f"/{i}")

    def wait(self, name: str) -> list[int]:
        # Every participant counts on one arrival counter, so the barrier is over all of
        # them: a subset would need a counter of its own.
        who = list(range(self.world))
        # done before the counter: a full count then implies every done key is set.
        self.store.set(self._key(name, "done", self.me), b"1")
        arrived = int(self.store.add(self._key(name, "arrived"), 1))
        self.fenced = bool(self.store.check([self._key(name, "excluded", self.me)]))
        return self._poll(name, who, arrived)

    def _poll(self, name: str, who: list[int], arrived: int) -> list[int]:
        deadline = time.monotonic() + self.timeout_s
        waiting = [i for i in who if i != self.me]
        poll, still_since, last = 0.001, time.monotonic(), arrived
        while arrived < len(who):
            now = time.monotonic()
            if arrived != last:
                still_since, last = now, arrived
            elif now - still_since >= self.stall_s:
                waiting = self._missing(name, waiting)
                gone = [i for i in waiting if not self._alive(i)]
                if len(gone) == len(waiting):
                    for i in gone:
                        self.store.set(self._key(name, "excluded", i), b"1")
                    return gone
                still_since = now
            if now >= deadline:
                raise TransportError(
                    f"barrier {self.prefix}/{name}: {len(who) - arrived} of {len(who)} participants "
                    f"(among {waiting[:16]}) neither arrived nor were seen dead within {self.timeout_s:.0f} s"
                )
            time.sleep(poll)
            poll = min(poll * 2, 0.02)
            arrived = int(self.store.add(self._key(name, "arrived"), 0))
        return []

    def _missing(self, name: str, candidates: list[int]) -> list[int]:
        """Those of ``candidates`` whose done key is absent: one ``check`` when all are
        there, else halves searched, so ``m`` missing of ``n`` cost about ``2 m log2 n``
        checks rather than ``n``."""
        if not candidates or self.store.check([self._key(name, "done", i) for i in candidates]):
            return []
        if len(candidates) == 1:
            return candidates
        half = len(candidates) // 2
        return self._missing(name, candidates[:half]) + self._missing(name, candidates[half:])
