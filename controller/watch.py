"""Waking a reader when the keys it acts on change, through etcd watches that outlive
reconnects, etcd restarts and compaction.

Readers here are level-triggered: each pass reads every key it acts on, so a watch
only has to say *when* to read, and a missed event costs latency, never correctness
(a periodic resync stays as the backstop). What a watch must not do is go quiet: the
client drops every watch when its stream breaks (etcd restarted, connection lost)
and a watch resumed from a compacted revision is refused. :class:`KeyWatch` re-arms
from the last revision it saw, and where that was compacted, from now, waking its
reader for the resync read that covers the gap.

Example::

    wake = threading.Event()
    w = KeyWatch(client, wake, keys=[f"{root}/plan", f"{root}/committed"], prefixes=[f"{root}/acks/"])
    while running:
        w.ensure()                 # (re)arms; cheap when armed
        read_and_act()
        wake.wait(resync_s); wake.clear()
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class KeyWatch:
    """Watches ``keys`` and ``prefixes`` and sets ``wake`` on every change, on a broken
    stream and on a resume past compaction. ``revision``: the newest revision seen in
    an event (0 before any); ``compacted``: how often the resume revision had been
    compacted."""

    def __init__(self, client: Any, wake: threading.Event, keys: list[str] = (), prefixes: list[str] = ()) -> None:  # type: ignore[assignment]
        self.client, self.wake = client, wake
        self.keys, self.prefixes = list(keys), list(prefixes)
        self.revision = 0
        self.compacted = 0
        self._arms = 0
        self._ids: list[Any] = []
        self._armed = False
        self._generation = 0  # callbacks of an older arming are ignored
        self._lock = threading.Lock()

    @property
    def armed(self) -> bool:
        return self._armed

    def ensure(self) -> bool:
        """Arm the watches unless they are armed; True when they are. Never raises:
        while etcd is away it stays unarmed (the reader's resync goes on) and tries
        again on the next call. Every arming after the first wakes the reader, whose
        next pass reads what changed while no watch was armed."""
        if self._armed:
            return True
        with self._lock:
            self._generation += 1
            generation, start = self._generation, self.revision + 1 if self.revision else None
        try:
            try:
                self._arm(generation, start)
            except Exception as e:
                if not _compacted(e):
                    raise
                # The history since self.revision is gone: watch from now; the wake
                # below makes the reader read everything.
                self.compacted += 1
                log.info("watch resume at revision %s was compacted; watching from now after a resync read", start)
                self._arm(generation, None)
        except Exception as e:
            self._drop(generation, e)
            return False
        with self._lock:
            if generation == self._generation:
                self._armed = True
            self._arms += 1
        if self._arms > 1:
            self.wake.set()
        return self._armed

    @property
    def rearmed(self) -> int:
        """Armings after the first: one per broken stream or failed try that recovered."""
        return max(0, self._arms - 1)

    def _arm(self, generation: int, start: int | None) -> None:
        from etcd3.utils import prefix_range_end, to_bytes

        self._cancel()
        cb = self._callback(generation)
        ids = [self.client.add_watch_callback(k, cb, start_revision=start) for k in self.keys]
        ids += [self.client.add_watch_callback(p, cb, range_end=prefix_range_end(to_bytes(p)), start_revision=start)
                for p in self.prefixes]
        self._ids = ids

    def _callback(self, generation: int) -> Any:
        def on_event(response: Any) -> None:
            if generation != self._generation:
                return
            if isinstance(response, BaseException):
                # The client drops every watch of a broken stream, and etcd cancels one
                # whose start was compacted: arm again on the next pass (from now, if
                # compacted: the reader's resync read covers the gap).
                with self._lock:
                    if generation == self._generation:
                        if _compacted(response):
                            self.compacted += self._armed  # once per arming, whatever the watch count
                            self.revision = 0
                        self._armed = False
                self.wake.set()
                return
            revs = [e.mod_revision for e in getattr(response, "events", ())]
            header = getattr(response, "header", None)
            rev = max(revs, default=getattr(header, "revision", 0) if header is not None else 0)
            with self._lock:
                self.revision = max(self.revision, rev)
            self.wake.set()
        return on_event

    def _drop(self, generation: int, e: BaseException) -> None:
        log.debug("watch not armed (%s); the periodic resync goes on", e)
        self._cancel()
        with self._lock:
            if generation == self._generation:
                self._armed = False

    def _cancel(self) -> None:
        ids, self._ids = self._ids, []
        for watch_id in ids:
            try:
                self.client.cancel_watch(watch_id)
            except Exception:  # the stream may be gone with its watches
                pass

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            self._armed = False
        self._cancel()


def _compacted(e: BaseException) -> bool:
    import etcd3.exceptions as ex

    return isinstance(e, ex.RevisionCompactedError) or "compacted" in str(e).lower()
