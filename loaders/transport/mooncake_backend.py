"""Mooncake transport: receiver-initiated one-sided reads through Mooncake's transfer engine.

Every process starts one ``TransferEngine`` in P2P-handshake mode (no metadata server:
a peer's segment is fetched from the peer itself the first time it is read), registers
its serving tensors once and, per epoch, its staging buffer, and publishes its session
``"<host>:<rpc port>"``. A reader computes the remote address of every slot row from
the peer's :class:`~loaders.transport.WeightTable` and posts one batch read per source
peer; the source process does nothing. Batches to different peers run at once, each
in its own thread (the engine's blocking calls release the GIL).

A mirror row (host memory, registered like the weights: see
:meth:`~loaders.transport.PeerTransport.register_mirror`) is one segment of the batch
like any slot row: the engine finds the registered buffer of each address itself, so a
peer's GPU rows and mirror rows share one batch. A reader learns the peer's buffers at
first contact (the handshake), so the mirror is registered before the first connect.

Failure contract: :meth:`MooncakeTransport.transfer` never raises for a peer's fault
and returns within about ``timeout`` seconds. A peer that dies, never publishes its
endpoint, or does not answer in time fails its reads and is remembered as failed for
the epoch, so later reads from it fail at once. The engine reports errors as return
codes (``-1``); its own bounds are long, so a call still running at our deadline is
abandoned to finish in the background and the staging buffer is marked poisoned.

Measured with the TCP protocol between processes of one host (0.3.13.post1): a
SIGKILLed peer fails a read within milliseconds, before or after first contact. A
SIGSTOPped peer that was already read from fails after ``MC_TCP_PROGRESS_TIMEOUT_SEC``
/ ``MC_TCP_STATUS_TIMEOUT_SEC`` (30 s each by default, 5 s here). A stopped peer never
read from before blocks in the handshake, whose 60 s socket timeout is fixed in the
library, and the engine makes that handshake while holding a lock that every other
read of the process waits for; hence the probe before first contact (see ``_worker``):
a probe to a stopped peer is abandoned at our deadline and ends when the peer dies or
after those 60 s, holding nothing the other reads need.

Mooncake listens on all interfaces: in P2P-handshake mode the handshake port is bound
to ``INADDR_ANY`` and the TCP data port to ``[::]`` whatever ``host`` is
(``MC_TCP_BIND_ADDRESS`` only changes the address advertised with a metadata server).
``MC_MIN_RPC_PORT`` / ``MC_MAX_RPC_PORT`` confine both ports to a range a firewall can
admit.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout
from loaders.transport import OneSidedTransport, register_backend
from loaders.transport.base import OpenPeer, PeerReadOp, ReadRound

# Before mooncake is imported: its logging reads the level then; the TCP timeouts are
# read per transfer. A stuck TCP transfer fails inside the transport after
# MC_TCP_PROGRESS_TIMEOUT_SEC without progress, or MC_TCP_STATUS_TIMEOUT_SEC waiting
# for the peer's status frame (sent before any READ payload), so no healthy slow
# transfer trips them. MC_TRANSFER_TIMEOUT (30 s plus 1 ns per byte, the Python
# wrapper's bound) stays longer on purpose: when it fires first the wrapper gives up
# while slices may still land, whereas the transport's own failure settles them first.
ENV_DEFAULTS = {
    "MC_LOG_LEVEL": "ERROR",
    "MC_TCP_PROGRESS_TIMEOUT_SEC": "5",
    "MC_TCP_STATUS_TIMEOUT_SEC": "5",
}
for _k, _v in ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

from mooncake.engine import TransferEngine  # noqa: E402

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma", "nvlink")


@dataclass
class _Batch(PeerReadOp):
    """One batch read: every segment this round wants from participant ``peer``.
    The worker thread sets ``step`` before each engine call and ``rc``/``finished``
    after the last; ``lock`` orders its start of the read against the caller giving
    up at the deadline (``abandoned``), so a read is either posted and known or never."""

    session: str
    local: list[int]
    remote: list[int]
    lengths: list[int]
    staging: torch.Tensor  # held so the memory outlives a read that is abandoned
    step: str = ""  # "probe", then "read"
    rc: int | None = None
    finished: bool = False
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)


@register_backend("mooncake")
class MooncakeTransport(OneSidedTransport):
    """Options: ``host`` (the address peers reach this process at; put in the session),
    ``protocol`` ("tcp"; "rdma" or "nvlink" where the wheel and the hardware have it),
    ``device_name`` (comma-separated RDMA devices; empty: all)."""

    name = "mooncake"

    def __init__(
        self,
        layout: ExpertLayout,
        prefix: str = "transport",
        *,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        device_name: str = "",
    ) -> None:
        super().__init__(layout, prefix)
        if protocol not in PROTOCOLS:
            raise ConfigError(f"mooncake protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
        if not host or ":" in host:
            raise ConfigError(f"mooncake host {host!r}: give an address or name without a port")
        self.host, self.protocol, self.device_name = host, protocol, device_name
        self.engine = TransferEngine()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransportError(
                f"mooncake engine did not start on {host} with protocol {protocol!r} "
                f"(devices {device_name or 'all'}): rc {rc}"
            )
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self._weight_addrs: list[int] = []
        self._staging_addr: int | None = None
        self._mirror_addr: int | None = None
        self._contacted: set[str] = set()  # sessions the engine has read from (handshake done)
        self._inflight: list[_Batch] = []  # abandoned batches still running

    # -- registration ------------------------------------------------------------------
    def _register_weights(self) -> None:
        self._unregister(self._weight_addrs, "weights")
        self._weight_addrs = []
        for i, named in enumerate(self.weights):
            for name, t in named.items():
                nbytes = t.numel() * t.element_size()
                if nbytes == 0:
                    continue
                rc = self.engine.register_memory(t.data_ptr(), nbytes)
                if rc != 0:
                    raise TransportError(
                        f"mooncake could not register layer {i} {name} ({nbytes} bytes at {t.data_ptr():#x}): rc {rc}"
                    )
                self._weight_addrs.append(t.data_ptr())

    def _register_mirror(self) -> None:
        assert self.mirror is not None
        if self.mirror.numel():  # an empty mirror has no rows to read
            self._mirror_addr = self._register_buffer(self.mirror, "mirror")

    def _deregister_mirror(self) -> None:
        if self._mirror_addr is not None:
            self._unregister([self._mirror_addr], "mirror")
            self._mirror_addr = None

    def _register_staging(self) -> None:
        assert self.staging is not None
        self._staging_addr = self._register_buffer(self.staging, "staging buffer")

    def _register_buffer(self, buf: torch.Tensor, what: str) -> int:
        """Register one flat uint8 buffer with the engine; its address."""
        rc = self.engine.register_memory(buf.data_ptr(), buf.numel())
        if rc != 0:
            raise TransportError(f"mooncake could not register the {buf.numel()}-byte {what}: rc {rc}")
        return buf.data_ptr()

    def _deregister_staging(self) -> None:
        # A read abandoned into the old buffer keeps it alive (``_Batch.staging``); for
        # TCP the registration does not matter to it, for RDMA it then fails cleanly.
        if self._staging_addr is not None:
            self._unregister([self._staging_addr], "staging")
            self._staging_addr = None

    def _unregister(self, addrs: list[int], what: str) -> None:
        for a in addrs:
            rc = self.engine.unregister_memory(a)
            if rc != 0:
                log.warning("mooncake: unregistering %s at %#x failed: rc %d", what, a, rc)

    def endpoint(self) -> dict[str, Any]:
        return {"session": self.session, "protocol": self.protocol}

    # -- one round ---------------------------------------------------------------------
    def _open_peer(self, index: int, endpoint: dict[str, Any]) -> str:
        """The peer's session, once its protocol is known to be ours."""
        try:
            session, protocol = str(endpoint["session"]), str(endpoint["protocol"])
        except KeyError as e:
            raise TransportError(f"participant {index}: mooncake endpoint without {e}") from e
        if protocol != self.protocol:
            raise TransportError(f"participant {index} speaks mooncake {protocol!r}, this process {self.protocol!r}")
        return session

    def _begin(self, rnd: ReadRound) -> None:
        self._inflight = [b for b in self._inflight if not b.finished]

    def _start(self, rnd: ReadRound, peer: int, open_peer: OpenPeer, idx: list[int]) -> _Batch:
        """The batch of ``idx`` from ``peer``, read by a thread of its own."""
        assert self.staging is not None
        base = self.staging.data_ptr()
        b = _Batch(peer, list(idx), open_peer.handle, [], [], [], self.staging)
        for i in idx:
            r = rnd.reads[i]
            for s in open_peer.table.segments(rnd.layer, r.src_slot):
                b.local.append(base + r.dst_offset + s.offset)
                b.remote.append(s.addr)
                b.lengths.append(s.nbytes)
        b.thread = threading.Thread(target=self._worker, args=(b,), name=f"mooncake-read-{peer}", daemon=True)
        b.thread.start()
        return b

    def _poll(self, op: PeerReadOp) -> tuple[bool, str | None]:
        assert isinstance(op, _Batch)
        if not op.finished:
            return False, None
        if op.step == "probe":
            return True, f"no answer to the handshake probe of {op.session} (rc {op.rc}); is it alive?"
        if op.rc != 0:
            # One code for the whole batch: the engine reports failure as soon as one
            # request fails, while others may still be landing; none can be trusted.
            self.staging_poisoned = True
            return True, f"batch read of {len(op.lengths)} segments from {op.session} failed: rc {op.rc}"
        return True, None

    def _abandon(self, rnd: ReadRound, op: PeerReadOp) -> str:
        # The thread finishes in the background (the engine's own bounds end it) and
        # holds the staging tensor until then. A read already posted may still land, so
        # the executor must move to a new buffer; a thread not that far sees
        # ``abandoned`` and posts nothing.
        assert isinstance(op, _Batch)
        with op.lock:
            op.abandoned = True
        self._inflight.append(op)
        if op.step == "read":
            self.staging_poisoned = True
        what = "read" if op.step == "read" else "handshake probe"
        return f"{what} not answered within {rnd.timeout:.3g} s (peer frozen or too slow); abandoned"

    def _worker(self, b: _Batch) -> None:
        try:
            # First contact makes the engine fetch the peer's segment while holding a
            # lock every transfer of this process takes; a frozen peer would hold it
            # for the 60 s handshake timeout. The probe takes no lock, so it goes first
            # and only a peer that answers it is handshaken with.
            if b.session not in self._contacted:
                b.step = "probe"
                b.rc = self.engine.send_probe(b.session)
                if b.rc != 0:
                    return
            with b.lock:
                if b.abandoned:
                    return
                b.step = "read"
            b.rc = self.engine.batch_transfer_sync_read(b.session, b.local, b.remote, b.lengths)
            # Only a successful read proves the handshake done (the engine then keeps the
            # segment); after a failure, probe again before the next attempt.
            if b.rc == 0:
                self._contacted.add(b.session)
            else:
                self._contacted.discard(b.session)
        finally:
            with b.lock:
                b.finished = True

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Unregister everything. Abandoned reads still running keep the engine and
        their staging tensor alive (their threads hold both) until they end."""
        super().close()
        self._unregister(self._weight_addrs, "weights")
        self._weight_addrs = []
        self._inflight = [b for b in self._inflight if not b.finished]
        if self._inflight:
            log.warning("mooncake: closing with %d abandoned reads still running", len(self._inflight))
