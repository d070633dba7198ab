"""Leader election on one etcd key held under a lease: campaign, observe, resign.

The leader's lease is kept alive by a thread. Losing it (etcd unreachable for longer
than the TTL, or a long pause) loses leadership; every write of the leader is a
transaction that checks the key still names it, so a deposed leader cannot publish.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from elastic_ep.errors import EtcdUnavailableError

from controller.etcd_client import call

log = logging.getLogger(__name__)


class LeaderElection:
    """``LeaderElection(client, "/elastic-ep/default/leader", "ctl-a", ttl_s=3)``."""

    def __init__(self, client: Any, key: str, candidate: str, ttl_s: int = 3) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 (etcd leases are whole seconds)")
        self.client, self.key, self.candidate, self.ttl_s = client, key, candidate, ttl_s
        self.lease: Any = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self) -> str | None:
        """The current leader's id, or None."""
        v, _ = call(self.client.get, f"get {self.key}", self.key)
        return None if v is None else v.decode()

    def campaign(self) -> bool:
        """Become leader if nobody is; True when this candidate leads now."""
        if self.is_leader():
            return True
        lease = call(self.client.lease, "grant leader lease", self.ttl_s)
        tx = self.client.transactions
        ok, _ = call(self.client.transaction, f"campaign {self.key}",
                     compare=[tx.version(self.key) == 0],
                     success=[tx.put(self.key, self.candidate, lease=lease)], failure=[])
        if not ok:
            call(self.client.revoke_lease, "revoke unused lease", lease.id)
            return False
        self.lease = lease
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name="elastic-ep-leader-lease", daemon=True)
        self._thread.start()
        log.info("%s is the leader (%s, ttl %d s)", self.candidate, self.key, self.ttl_s)
        return True

    def is_leader(self) -> bool:
        return self.lease is not None and not self._lost.is_set()

    def _keepalive(self) -> None:
        lease = self.lease
        while not self._stop.wait(self.ttl_s / 3):
            try:
                replies = call(lambda: list(self.client.refresh_lease(lease.id)), "refresh leader lease")
                if not replies or replies[0].TTL <= 0:
                    log.warning("%s: leader lease expired; stepping down", self.candidate)
                    self._lost.set()
                    return
            except EtcdUnavailableError as e:
                # Keep trying: etcd restarting within the TTL keeps the lease.
                log.warning("%s: cannot refresh the leader lease: %s", self.candidate, e)
            except Exception:  # a lease nobody refreshes is lost: say so, do not lead on it
                log.exception("%s: leader lease keep-alive failed; stepping down", self.candidate)
                self._lost.set()
                return

    def step_down(self) -> None:
        """Forget leadership locally (the lease is left to expire or be revoked)."""
        self._stop.set()
        self._lost.set()
        self.lease = None

    def resign(self) -> None:
        """Give leadership up now, if held."""
        lease = self.lease
        self.step_down()
        if lease is not None:
            tx = self.client.transactions
            try:
                call(self.client.transaction, f"resign {self.key}",
                     compare=[tx.value(self.key) == self.candidate], success=[tx.delete(self.key)], failure=[])
                call(self.client.revoke_lease, "revoke leader lease", lease.id)
            except EtcdUnavailableError as e:
                log.warning("%s: resign could not reach etcd (%s); the lease will expire", self.candidate, e)
