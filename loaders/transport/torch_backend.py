"""torch.distributed transport: two-sided send/recv on a private process group per epoch.

gloo for CPU weights, NCCL for CUDA. The group is private (built straight from the
store, never the default group) because the default group belongs to the serving
engine; ``dist.batch_isend_irecv`` only accepts groups registered with the default
group, so the batch is posted on the group object itself, and for NCCL wrapped in
the same coalescing calls ``batch_isend_irecv`` makes (one fused launch, no pairwise
ordering deadlock).

Two-sided: a receive is read from its planned source only, which posts the matching send
(see :class:`~loaders.transport.TwoSidedTransport`). A peer failing breaks a gloo or NCCL
group for good (even a barrier fails after), so once one operation fails every later
read of the epoch fails at once and the executor goes to disk; the next epoch builds a
new group without the dead rank.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout
from loaders.transport import PeerRead, PeerSend, TwoSidedTransport, register_backend


ABORT_POLL_S = 0.1
"""How often a wait for the group asks :attr:`PeerTransport.abort` whether to give up."""


@register_backend("torch")
class TorchTransport(TwoSidedTransport):
    """Options: ``backend`` ("gloo" or "nccl"; default from the weights' device);
    ``interface``: the network interface gloo listens on, loopback unless configured
    (name the cluster interface, e.g. ``"eth0"``, across hosts; None: gloo's default,
    the address the host name resolves to)."""

    name = "torch"

    def __init__(
        self,
        layout: ExpertLayout,
        prefix: str = "transport",
        backend: str | None = None,
        interface: str | None = "lo",
    ) -> None:
        super().__init__(layout, prefix)
        self.backend = backend
        self.interface = interface
        self.group: Any = None
        self.broken: str | None = None

    def _register_weights(self) -> None:
        assert self.table is not None
        want = "nccl" if self.table.device == "cuda" else "gloo"
        if self.backend is None:
            self.backend = want
        elif self.backend != want:
            raise ConfigError(f"torch transport backend {self.backend!r} cannot move {self.table.device} weights; use {want!r}")

    def _register_staging(self) -> None:
        pass  # plain tensors: nothing to register

    def _connect(self, timeout: float) -> None:
        # Every participant builds the group here; gloo's rendezvous waits for all of
        # them. A participant dead before it connected leaves the group unbuildable:
        # the epoch then runs without it (every read goes to disk), never crashes.
        self.group, self.broken = None, None
        built: dict[str, Any] = {}
        # gloo's full-mesh connect retries a peer that died after publishing its address
        # for far longer than the group timeout; our deadline bounds it (the abandoned
        # attempt ends on its own and its group is never used).
        th = threading.Thread(target=self._build_group, args=(built, timeout), name="elastic-ep-pg-connect", daemon=True)
        th.start()
        deadline = time.monotonic() + timeout
        why = ""
        while th.is_alive() and time.monotonic() < deadline and not why:
            th.join(min(ABORT_POLL_S, max(deadline - time.monotonic(), 0.0)))
            why = self.abort() if self.abort is not None and th.is_alive() else ""
        if why:
            self.broken = f"the epoch {self.epoch} group was abandoned: {why}"
        elif th.is_alive():
            self.broken = f"the epoch {self.epoch} group did not form within {timeout:.0f} s (a participant is gone)"
        elif "error" in built:
            self.broken = f"the epoch {self.epoch} group could not be built: {built['error']}"
        else:
            self.group = built["group"]

    def _build_group(self, built: dict[str, Any], timeout: float) -> None:
        """Build this epoch's group into ``built["group"]``, or its error into ``built["error"]``."""
        store = dist.PrefixStore(f"{self.prefix}/pg", self.store)  # joined with "/"
        t = timedelta(seconds=timeout)
        try:
            if self.backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = t
                opts._devices = [
                    dist.ProcessGroupGloo.create_device(interface=self.interface) if self.interface
                    else dist.ProcessGroupGloo.create_default_device()
                ]
                built["group"] = dist.ProcessGroupGloo(store, self.me, self.world, opts)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = t
                built["group"] = dist.ProcessGroupNCCL(store, self.me, self.world, opts)
        except (RuntimeError, TimeoutError, ValueError) as e:
            built["error"] = str(e).splitlines()[0]

    def close_epoch(self) -> None:
        self.group = None  # a broken group's shutdown can block; let it be collected
        super().close_epoch()

    def transfer(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        if self.table is None or self.store is None or self.staging is None:
            raise ConfigError("torch transport: register_weights, connect and register_staging before transfer")
        if self.broken is not None or self.group is None:
            err = TransportError(f"layer {layer}: the epoch {self.epoch} process group is broken ({self.broken})")
            return [err] * len(reads)
        try:
            works = self._post(layer, reads, sends)
        except RuntimeError as e:
            self.broken = str(e).splitlines()[0]
            return [TransportError(f"layer {layer}: posting the batch failed ({self.broken})")] * len(reads)
        return self._wait(layer, works, len(reads), timeout)

    def _recv_buffers(self, reads: Sequence[PeerRead]) -> list[tuple[int, torch.Tensor, int]]:
        """``(peer, staging bytes, read index)`` of every message to receive."""
        assert self.staging is not None
        out = []
        # Both sides order a pair's messages by (slot, tensor): sends by the source
        # slot, receives by the same source slot, so messages match one to one.
        for i, r in sorted(enumerate(reads), key=lambda x: (x[1].src, x[1].src_slot, x[1].dst_offset)):
            for t, off in zip(self.layout.tensors, self.layout.offsets):
                at = r.dst_offset + off
                out.append((r.src, self.staging[at : at + t.row_bytes], i))
        return out

    def _send_buffers(self, layer: int, sends: Sequence[PeerSend]) -> list[tuple[int, torch.Tensor]]:
        """``(peer, weight row bytes)`` of every message to send, in the receivers' order."""
        named = self.weights[layer]
        return [
            (s.dst, self.layout.row_bytes_view(named[t.name], s.src_slot))
            for s in sorted(sends, key=lambda s: (s.dst, s.src_slot))
            for t in self.layout.tensors
        ]

    def _post(self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend]) -> list[tuple[Any, int | None, int]]:
        """Post every message; ``(work, read index, peer)`` to wait for: index None for
        a send, -1 for NCCL's one fused batch (peer -1: all of them; gloo's works are
        per message)."""
        assert self.staging is not None
        coalesce = self.backend == "nccl"
        works: list[tuple[Any, int | None, int]] = []
        if coalesce:
            self.group._start_coalescing(self.staging.device)
        for peer, buf in self._send_buffers(layer, sends):
            works.append((self.group.send([buf], peer, layer), None, peer))
        for peer, buf, i in self._recv_buffers(reads):
            works.append((self.group.recv([buf], peer, layer), i, peer))
        if coalesce:
            works = [(self.group._end_coalescing(self.staging.device), -1, -1)]
        return works

    def _wait(self, layer: int, works: list[tuple[Any, int | None, int]], n: int, timeout: float) -> list[BaseException | None]:
        """Wait for every work until ``timeout``, or until a peer is confirmed gone
        (:attr:`gone`); one entry per read (``n`` of them). gloo's works complete only
        inside ``wait``, so the waits run on a thread that is left behind (its group is
        broken and never used again) when a peer they depend on is gone: a frozen peer
        neither sends nor resets its connection."""
        deadline = time.monotonic() + timeout
        if self.gone is None:
            return self._wait_all(layer, works, n, deadline)
        done: list[list[BaseException | None]] = []
        th = threading.Thread(target=lambda: done.append(self._wait_all(layer, works, n, deadline)),
                              name="elastic-ep-pg-wait", daemon=True)
        th.start()
        # NCCL's fused batch names no peer: any participant may hold it up.
        peers = sorted({p for _, _, p in works if p >= 0}) or [i for i in range(self.world) if i != self.me]
        while th.is_alive():
            th.join(ABORT_POLL_S)
            dead = [p for p in peers if th.is_alive() and self.gone(p)]
            if dead:
                self.broken = self.broken or f"participants {dead} confirmed gone"
                self.staging_poisoned = True  # a posted receive may still land later
                return [TransportError(f"layer {layer}: epoch {self.epoch} group abandoned ({self.broken})")] * n
        return done[0]

    def _wait_all(self, layer: int, works: list[tuple[Any, int | None, int]], n: int, deadline: float) -> list[BaseException | None]:
        assert self.staging is not None
        out: list[BaseException | None] = [None] * n
        for w, i, _ in works:
            try:
                if w.wait(timedelta(seconds=max(0.001, deadline - time.monotonic()))) is False:
                    raise RuntimeError("timed out")
            except RuntimeError as e:
                # gloo: "Connection reset by peer" from a dead peer, or the timeout.
                # Completed receives stay good; everything after this fails fast.
                self.broken = self.broken or str(e).splitlines()[0]
                self.staging_poisoned = True  # a posted receive may still land later
                err = TransportError(f"layer {layer}: epoch {self.epoch} group failed ({self.broken})")
                if i == -1:  # the fused NCCL batch: nothing in it can be trusted
                    return [err] * n
                if i is not None:
                    out[i] = out[i] or err
        if self.backend == "nccl":
            torch.cuda.current_stream(self.staging.device).synchronize()
        return out
