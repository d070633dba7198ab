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

Mirror rows (:meth:`~loaders.transport.PeerTransport.register_mirror`) are sent like
slots, cut at the layout's offsets into the same per-tensor messages, so receives do not
change. NCCL sends only device memory while the mirror is host memory: a mirror row is
copied to the group's device first (held until the next round or epoch). A read from
this process itself is copied locally, never posted (a process group has no channel to
itself), and each read is checked against its source's published table; the source
skips the same sends, so both sides of every pair still match.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout
from loaders.transport import PeerRead, PeerSend, TwoSidedTransport, WeightTable, register_backend

log = logging.getLogger(__name__)


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
        self._tables: dict[int, WeightTable] = {}  # peers' published tables, this epoch
        self._send_copies: list[torch.Tensor] = []  # device copies of mirror rows NCCL sends

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
        self._tables.clear()
        self._send_copies = []
        super().close_epoch()

    def transfer(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        if self.table is None or self.store is None or self.staging is None:
            raise ConfigError("torch transport: register_weights, connect and register_staging before transfer")
        out, posted = self._settle_unposted(layer, reads, time.monotonic() + timeout)
        if not posted and not sends:
            return out
        if self.broken is not None or self.group is None:
            err = TransportError(f"layer {layer}: the epoch {self.epoch} process group is broken ({self.broken})")
            res: list[BaseException | None] = [err] * len(posted)
        else:
            try:
                works = self._post(layer, [reads[i] for i in posted], sends)
                res = self._wait(layer, works, len(posted), timeout)
            except RuntimeError as e:
                self.broken = str(e).splitlines()[0]
                res = [TransportError(f"layer {layer}: posting the batch failed ({self.broken})")] * len(posted)
        for i, r in zip(posted, res):
            out[i] = r
        return out

    def _settle_unposted(
        self, layer: int, reads: Sequence[PeerRead], deadline: float
    ) -> tuple[list[BaseException | None], list[int]]:
        """Settle the reads that post nothing: from this process (copied here) and of
        slots their source does not hold (ConfigError; the source skips that send too).
        Returns every read's outcome so far and the indices of those to post."""
        assert self.staging is not None
        out: list[BaseException | None] = [None] * len(reads)
        posted, eb = [], self.layout.expert_bytes
        for i, r in enumerate(reads):
            if r.src == self.me:
                out[i] = self._pack_own_read(layer, r, self.staging[r.dst_offset : r.dst_offset + eb])
            elif not 0 <= r.src < self.world:
                out[i] = ConfigError(f"layer {layer}: read {r} from outside participants 0..{self.world - 1}")
            elif self.group is not None and self.broken is None:  # else every peer read fails at once
                try:
                    out[i] = self._peer_table(r.src, deadline).refuse(layer, r, r.src)
                except TransportError as e:  # a malformed endpoint: nothing to read it by
                    out[i] = e
            if out[i] is None and r.src != self.me:
                posted.append(i)
        return out, posted

    def _peer_table(self, peer: int, deadline: float) -> WeightTable:
        """The table ``peer`` published this epoch (it did before the group formed)."""
        if peer not in self._tables:
            self._tables[peer] = self.peer_endpoint(peer, deadline)["table"]
        return self._tables[peer]

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
        """``(peer, row bytes)`` of every message to send, in the receivers' order: one
        per tensor of a slot or mirror row (:meth:`own_pieces`)."""
        assert self.table is not None and self.staging is not None
        out = []
        for s in sorted(sends, key=lambda s: (s.dst, s.src_slot)):
            if s.dst == self.me:
                continue  # the matching read is copied locally, never received
            err = self.table.refuse(layer, PeerRead(self.me, s.src_slot, 0), self.me)
            if err is not None:
                # The reader checks the same (published) table and posts no receive.
                log.warning("epoch %d: nothing to send to participant %d: %s; skipped", self.epoch, s.dst, err)
                continue
            pieces = self.own_pieces(layer, s.src_slot)
            if self.table.is_mirror(s.src_slot) and self.staging.device.type != "cpu":
                # NCCL sends device memory only; the copy runs on the current stream,
                # which NCCL's stream waits for before the send.
                pieces = [p.to(self.staging.device, non_blocking=p.is_pinned()) for p in pieces]
                self._send_copies += pieces
            out += [(s.dst, p) for p in pieces]
        return out

    def _post(self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend]) -> list[tuple[Any, int | None, int]]:
        """Post every message; ``(work, read index, peer)`` to wait for: index None for
        a send, -1 for NCCL's one fused batch (peer -1: all of them; gloo's works are
        per message)."""
        assert self.staging is not None
        coalesce = self.backend == "nccl"
        works: list[tuple[Any, int | None, int]] = []
        self._send_copies = []  # the last round's were sent: its works were all waited for
        # Built (mirror rows copied to the device) before the batch opens, so that the
        # stream NCCL waits for has every copy queued before the first send.
        send_bufs = self._send_buffers(layer, sends)
        if coalesce:
            self.group._start_coalescing(self.staging.device)
        for peer, buf in send_bufs:
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
