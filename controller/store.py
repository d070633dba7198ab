"""A ``torch.distributed.Store`` over etcd keys: the plan executor's barrier, heartbeats
and transport endpoints (and gloo's rendezvous) share the control plane's etcd instead
of a separate TCPStore.

Kept apart from :mod:`controller.etcd_client` because it needs torch, and the etcd
client, the controller and its tools do not.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from elastic_ep.errors import EtcdUnavailableError

from controller.etcd_client import call

MAX_TXN_OPS = 128
"""etcd's ``--max-txn-ops`` default: the most operations one transaction may hold."""


def _as_bytes(value: Any) -> bytes:
    """Store values as torch passes them: bytes-like as is, anything else as its text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


class EtcdStore(dist.Store):
    """The ``torch.distributed.Store`` API over etcd keys under ``root``: lets the plan
    executor's barrier, heartbeats and transport endpoints (and gloo's rendezvous) use
    the control plane's etcd instead of a separate TCPStore.

    Keys live under ``<root>/store/<key>``, or ``<root>/store/<scope>/<key>`` with a
    ``scope`` (a plan's epoch: each plan's execution gets keys of its own); the
    controller deletes the store's keys once an epoch is committed. Values are bytes;
    ``add`` is a compare-and-swap loop. Example: ``EtcdStore(client, "/elastic-ep/prod",
    scope="7").set("exec/hb/0", b"1")`` writes ``/elastic-ep/prod/store/7/exec/hb/0``.
    """

    def __init__(self, client: Any, root: str, timeout_s: float = 300.0, lease: Any = None, scope: str = "") -> None:
        super().__init__()
        self.client, self.timeout_s, self.lease = client, timeout_s, lease
        self.root = root.rstrip("/") + "/store/" + (scope.strip("/") + "/" if scope else "")

    def _k(self, key: str) -> str:
        return self.root + key

    def set(self, key: str, value: Any) -> None:
        call(self.client.put, f"store set {key}", self._k(key), _as_bytes(value), lease=self.lease)

    def get(self, key: str) -> bytes:
        self.wait([key])
        v, _ = call(self.client.get, f"store get {key}", self._k(key))
        return bytes(v)

    def check(self, keys: list[str]) -> bool:
        """True when every key is set: one transaction per :data:`MAX_TXN_OPS` keys (the
        barrier checks many keys at once while it looks for missing participants)."""
        tx = self.client.transactions
        for at in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[at:at + MAX_TXN_OPS]
            _, responses = call(self.client.transaction, f"store check {chunk[0]} (+{len(chunk) - 1})",
                                compare=[], success=[tx.get(self._k(k)) for k in chunk], failure=[])
            if any(not list(r) for r in responses):
                return False
        return True

    def add(self, key: str, amount: int) -> int:
        k = self._k(key)
        for _ in range(1000):
            v, meta = call(self.client.get, f"store add {key}", k)
            new = (int(v) if v is not None else 0) + int(amount)
            if amount == 0 and v is not None:
                return new
            cmp = (self.client.transactions.version(k) == 0) if v is None else (self.client.transactions.mod(k) == meta.mod_revision)
            ok, _ = call(self.client.transaction, f"store add {key}", compare=[cmp],
                         success=[self.client.transactions.put(k, str(new), lease=self.lease)], failure=[])
            if ok:
                return new
        raise EtcdUnavailableError(f"store add {key}: too much contention")

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit = timeout.total_seconds() if timeout is not None else self.timeout_s
        deadline = time.monotonic() + limit
        poll = 0.002
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd store: keys {keys} not set within {limit:.0f} s")
            time.sleep(poll)
            poll = min(poll * 2, 0.05)

    def delete_key(self, key: str) -> bool:
        return bool(call(self.client.delete, f"store delete {key}", self._k(key)))

    def num_keys(self) -> int:
        return sum(1 for _ in call(self.client.get_prefix, "store keys", self.root, keys_only=True))

    def set_timeout(self, timeout: timedelta) -> None:
        self.timeout_s = timeout.total_seconds()

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        k = self._k(key)
        exp, des = _as_bytes(expected), _as_bytes(desired)
        cmp = (self.client.transactions.version(k) == 0) if exp == b"" else (self.client.transactions.value(k) == exp)
        call(self.client.transaction, f"store compare_set {key}", compare=[cmp],
             success=[self.client.transactions.put(k, des)], failure=[])
        v, _ = call(self.client.get, f"store get {key}", k)
        return bytes(v) if v is not None else exp
