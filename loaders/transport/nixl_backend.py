"""NIXL transport: receiver-initiated one-sided READs from the peers' registered weights.

As in vLLM's NIXL EPLB communicator, the reader does all the work: every process
registers its serving tensors once with its NIXL agent (UCX backend; DRAM for CPU
tensors, VRAM for CUDA) and publishes the agent's metadata; a reader loads a peer's
metadata the first time it reads from it, prepares one descriptor list over all of
that peer's slot rows (index ``(layer * slots_per_rank + slot) * n_tensors + tensor``)
and, per layer, posts one READ per source peer gathering every segment it wants from
that peer straight into its staging buffer. The source process does nothing.

Mirror rows (host memory, see :meth:`~loaders.transport.PeerTransport.register_mirror`)
are registered as DRAM beside the weights, and a reader prepares a second descriptor
list over them (index ``row * n_tensors + tensor``, each row cut at the layout's
offsets so that it lines up with the staging descriptors). A prepared list has one
memory type, and the weights are VRAM where they live on CUDA, so a round that reads
both a peer's GPU slots and its mirror rows posts two READs to that peer, one per list.

Failure contract: :meth:`NixlTransport.transfer` never raises for a peer's fault and
returns within about ``timeout`` seconds. A peer that dies, never publishes its
endpoint, or does not finish in time fails its reads and is remembered as failed for
the epoch, so later reads from it fail at once. A read still in flight at the deadline
is cancelled where NIXL can; the staging buffer is then marked poisoned because the
cancelled READ may have written part of it.

Measured on one host (UCX picks shared memory / cma there): a SIGKILLed peer makes
``transfer`` raise ``nixlRemoteDisconnectError`` within a millisecond; a SIGSTOPped
peer is still read (cma copies out of its memory without its help). Over UCX's tcp
transport a stopped peer's READ stays in progress for ever, so only our deadline ends it.

Known with nixl 1.5.1: its progress thread spins on a core unless given a poll timeout
(see :func:`_new_agent`); a process that created a UCX agent may die with SIGSEGV at
exit, in the exit-time destructor of the bundled libnl-route that UCX's InfiniBand
module loads (``UCX_MODULES=^ib`` avoids it where there is no InfiniBand).
"""

from __future__ import annotations

import base64
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import numpy as np
import torch

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout
from loaders.transport import OneSidedTransport, WeightTable, register_backend
from loaders.transport.base import OpenPeer, PeerReadOp, ReadRound

# Before nixl is imported: its Python logger and the C++ core read this once.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
# Loopback unless configured: UCX would otherwise probe and may pick any interface of
# the host. A deployment across hosts sets UCX_NET_DEVICES itself (shared memory and
# cma between processes of one host are not network devices and stay available).
if "UCX_NET_DEVICES" not in os.environ:
    os.environ["UCX_NET_DEVICES"] = "lo"
    # Confined to loopback, InfiniBand is unused; leaving UCX's ib module out also avoids
    # the exit-time crash described above.
    os.environ.setdefault("UCX_MODULES", "^ib")


def _import_nixl() -> tuple[Any, Any, Any]:
    """``(nixl_agent, nixl_agent_config, bindings)``. ``nixl`` (1.5.1) is a shim that loads
    ``nixl_cu13`` or ``nixl_cu12``; fall back to those if it fails."""
    err: ImportError | None = None
    for pkg in ("nixl", "nixl_cu13", "nixl_cu12"):
        try:
            api = importlib.import_module(f"{pkg}._api")
            bind = importlib.import_module(f"{pkg}._bindings")
        except ImportError as e:
            err = e
            continue
        return api.nixl_agent, api.nixl_agent_config, bind
    raise ImportError(f"nixl is not importable: {err}")


nixl_agent, nixl_agent_config, _bind = _import_nixl()
# nixlRemoteDisconnectError, nixlBackendError, ...: all plain Exception subclasses.
NIXL_ERRORS: tuple[type[BaseException], ...] = tuple(
    v for v in vars(_bind).values() if isinstance(v, type) and issubclass(v, Exception)
) + (RuntimeError,)

log = logging.getLogger(__name__)

_BACKEND = "UCX"
_MEM_TYPES = {"cpu": "DRAM", "cuda": "VRAM"}


def _mem_type(device: str) -> str:
    if device not in _MEM_TYPES:
        raise ConfigError(f"nixl transport moves cpu or cuda memory, not {device!r}")
    return _MEM_TYPES[device]


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _new_agent(name: str, progress_delay_us: int) -> Any:
    """A NIXL agent with the UCX backend and a progress thread. The thread is needed: a
    peer's READ from this process needs its UCX worker progressed (to set up the
    connection always, for every READ over tcp), and this process makes no NIXL call then.

    nixl 1.5.1's wrapper hard-codes the thread's poll() timeout to 0, so it spins on a
    core for the life of the process. With ``progress_delay_us > 0`` the wrapper's C++
    agent is replaced, before any backend exists, by one with the same settings (what
    the wrapper sets when there is no listener thread) but that timeout; UCX still wakes
    the thread on events, the timeout is only its fallback. ``0`` keeps nixl's default.
    """
    swap = progress_delay_us > 0 and hasattr(_bind, "nixlAgentConfig")
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=[] if swap else [_BACKEND]))
    if swap:
        cfg = _bind.nixlAgentConfig()
        cfg.useProgThread = True
        cfg.useListenThread = False
        cfg.syncMode = _bind.NIXL_THREAD_SYNC_NONE
        cfg.captureTelemetry = False
        cfg.pthrDelay = progress_delay_us
        agent.agent = _bind.nixlAgent(name, cfg)
        agent.create_backend(_BACKEND)
    return agent


@dataclass
class _Peer:
    """A peer loaded for this epoch: its agent and its slot rows, prepared once.
    ``dlist`` index of (layer, slot, tensor) is ``(layer * slots + slot) * tensors + tensor``;
    ``mirror`` (None: the peer has no mirror rows) index of (row, tensor) is
    ``row * tensors + tensor``."""

    agent: str
    dlist: Any
    mirror: Any = None

    def release(self) -> None:
        for d in (self.dlist, self.mirror):
            if d is not None:
                try:
                    d.release()
                except NIXL_ERRORS as e:
                    log.warning("nixl: releasing the rows of %s failed: %s", self.agent, _reason(e))


@dataclass
class _Xfer(PeerReadOp):
    """One READ: every segment this round reads from participant ``peer``. ``state`` is
    what posting it said ("PROC": in flight, "DONE", or why it failed)."""

    remote: _Peer
    local: Any  # the round's staging descriptors
    handle: Any = None
    state: str = ""


@dataclass
class _Abandoned:
    """An xfer whose handle NIXL refused to release. It is kept (with the buffers it
    may still touch) so neither the handle's finaliser nor a freed buffer can hurt."""

    handle: Any
    local: Any
    peer: _Peer
    staging: torch.Tensor
    reason: str


@register_backend("nixl")
class NixlTransport(OneSidedTransport):
    """Options: ``poll_s``, the longest sleep between polls of the transfers' state;
    ``progress_delay_us``, see :func:`_new_agent`."""

    name = "nixl"

    def __init__(
        self,
        layout: ExpertLayout,
        prefix: str = "transport",
        poll_s: float = 0.001,
        progress_delay_us: int = 1000,
    ) -> None:
        super().__init__(layout, prefix)
        self.poll_s = poll_s
        # Unique per process and instance: a restarted process must not be taken for
        # the old one by peers that still hold its metadata.
        self.agent_name = f"elastic-ep-{os.getpid()}-{uuid4().hex[:8]}"
        self.agent = _new_agent(self.agent_name, progress_delay_us)
        if _BACKEND not in self.agent.backends:
            raise ConfigError(
                f"nixl could not start its {_BACKEND} backend (plugins here: {self.agent.get_plugin_list()})"
            )
        self._weight_descs: Any = None
        self._mirror_descs: Any = None
        self._staging_descs: Any = None
        self._abandoned: list[_Abandoned] = []
        self._kept_agents: set[str] = set()  # remote agents not removed at close_epoch
        self._retired: list[tuple[Any, torch.Tensor]] = []  # registered staging an abandoned xfer targets

    # -- registration ------------------------------------------------------------------
    def _register_weights(self) -> None:
        assert self.table is not None
        if self._weight_descs is not None:
            self._deregister(self._weight_descs, "weights")
            self._weight_descs = None
        rows = [
            (t.data_ptr(), t.numel() * t.element_size(), self.table.device_id)
            for named in self.weights
            for t in named.values()
        ]
        self._weight_descs = self._register(rows, self.table.device)

    def _register_mirror(self) -> None:
        assert self.mirror is not None
        if self.mirror.numel():  # an empty mirror has no rows to read
            self._mirror_descs = self._register([(self.mirror.data_ptr(), self.mirror.numel(), 0)], "cpu")

    def _deregister_mirror(self) -> None:
        if self._mirror_descs is not None:
            self._deregister(self._mirror_descs, "mirror")
            self._mirror_descs = None

    def _register_staging(self) -> None:
        assert self.staging is not None
        s = self.staging
        self._staging_descs = self._register([(s.data_ptr(), s.numel(), s.device.index or 0)], s.device.type)

    def _register(self, rows: list[tuple[int, int, int]], device: str) -> Any:
        try:
            return self.agent.register_memory(np.array(rows, dtype=np.uint64), _mem_type(device), backends=[_BACKEND])
        except NIXL_ERRORS as e:
            raise TransportError(f"nixl could not register {len(rows)} {device} regions: {_reason(e)}") from e

    def _deregister_staging(self) -> None:
        if self._staging_descs is None:
            return
        if any(a.staging is self.staging for a in self._abandoned):
            # An abandoned READ may still write there: keep it registered and alive.
            assert self.staging is not None
            self._retired.append((self._staging_descs, self.staging))
        else:
            self._deregister(self._staging_descs, "staging")
        self._staging_descs = None

    def _deregister(self, descs: Any, what: str) -> None:
        try:
            self.agent.deregister_memory(descs, backends=[_BACKEND])
        except NIXL_ERRORS as e:
            log.warning("nixl: deregistering %s failed: %s", what, _reason(e))

    def endpoint(self) -> dict[str, Any]:
        # Taken after register_weights, so it carries the weights' registration.
        return {"agent": self.agent_name, "metadata": base64.b64encode(self.agent.get_agent_metadata()).decode()}

    # -- peers -------------------------------------------------------------------------
    def _open_peer(self, index: int, endpoint: dict[str, Any]) -> _Peer:
        """Load the peer's agent (unless still loaded) and prepare all its slot rows."""
        try:
            metadata = base64.b64decode(endpoint["metadata"])
            agent = str(endpoint["agent"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"participant {index}: malformed nixl endpoint: {e}") from e
        loaded = agent if agent in self._kept_agents else self._load_agent(index, agent, metadata)
        table: WeightTable = endpoint["table"]
        rows = [
            (s.addr, s.nbytes, table.device_id)
            for layer in range(len(table.bases))
            for slot in range(table.slots_per_rank)
            for s in table.segments(layer, slot)
        ]
        peer = _Peer(loaded, None)
        try:
            peer.dlist = self._prep_remote(index, loaded, rows, table.device, "slot rows")
            if table.mirror_rows:
                peer.mirror = self._prep_remote(index, loaded, self._mirror_rows(table), table.mirror_device, "mirror rows")
        except TransportError:
            peer.release()
            self._remove_agent(loaded)
            raise
        return peer

    def _mirror_rows(self, table: WeightTable) -> list[tuple[int, int, int]]:
        """The peer's mirror as (row, tensor) descriptors: a packed row holds the
        layout's tensors at its offsets, so each lines up with one staging descriptor."""
        eb, sizes = table.expert_bytes, [t.row_bytes for t in self.layout.tensors]
        return [
            (table.mirror_base + row * eb + off, size, table.mirror_device_id)
            for row in range(table.mirror_rows)
            for off, size in zip(self.layout.offsets, sizes)
        ]

    def _prep_remote(self, index: int, agent: str, rows: list[tuple[int, int, int]], device: str, what: str) -> Any:
        try:
            return self.agent.prep_xfer_dlist(agent, np.array(rows, dtype=np.uint64), _mem_type(device), backends=[_BACKEND])
        except NIXL_ERRORS as e:
            raise TransportError(f"participant {index}: preparing its {len(rows)} {what} failed: {_reason(e)}") from e

    def _load_agent(self, index: int, agent: str, metadata: bytes) -> str:
        try:
            loaded = self.agent.add_remote_agent(metadata)
        except NIXL_ERRORS as e:
            raise TransportError(f"participant {index}: loading agent {agent!r} failed: {_reason(e)}") from e
        return loaded.decode() if isinstance(loaded, bytes) else loaded

    def _remove_agent(self, agent: str) -> None:
        try:
            self.agent.remove_remote_agent(agent)
        except NIXL_ERRORS as e:
            log.warning("nixl: removing remote agent %s failed: %s", agent, _reason(e))

    # -- one round ---------------------------------------------------------------------
    def _begin(self, rnd: ReadRound) -> Any:
        """The local side: segment t of read i at index ``i * tensors + t``, prepared once
        per round (the destinations change with every call; the remote rows do not)."""
        assert self.staging is not None
        offsets, sizes = self.layout.offsets, [t.row_bytes for t in self.layout.tensors]
        base, dev = self.staging.data_ptr(), self.staging.device.index or 0
        rows = [(base + r.dst_offset + off, size, dev) for r in rnd.reads for off, size in zip(offsets, sizes)]
        try:
            return self.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", np.array(rows, dtype=np.uint64), _mem_type(self.staging.device.type), backends=[_BACKEND]
            )
        except NIXL_ERRORS as e:
            raise TransportError(f"epoch {self.epoch} layer {rnd.layer}: preparing staging descriptors failed: {_reason(e)}") from e

    def _op_groups(self, rnd: ReadRound, table: WeightTable, idx: list[int]) -> list[list[int]]:
        """GPU slots and mirror rows apart: they are in two prepared lists (see the module)."""
        mirror = [i for i in idx if table.is_mirror(rnd.reads[i].src_slot)]
        return [[i for i in idx if not table.is_mirror(rnd.reads[i].src_slot)], mirror]

    def _start(self, rnd: ReadRound, peer: int, open_peer: OpenPeer, idx: list[int]) -> _Xfer:
        """One READ of ``idx``: all GPU slots or all mirror rows (:meth:`_op_groups`)."""
        nt, slots = len(self.layout.tensors), open_peer.table.slots_per_rank
        remote: _Peer = open_peer.handle
        if open_peer.table.is_mirror(rnd.reads[idx[0]].src_slot):
            dlist, rows = remote.mirror, [rnd.reads[i].src_slot - slots for i in idx]
        else:
            dlist, rows = remote.dlist, [rnd.layer * slots + rnd.reads[i].src_slot for i in idx]
        remote_idx = [row * nt + t for row in rows for t in range(nt)]
        local_idx = [i * nt + t for i in idx for t in range(nt)]
        x = _Xfer(peer, idx, remote, rnd.state)
        try:
            x.handle = self.agent.make_prepped_xfer("READ", rnd.state, local_idx, dlist, remote_idx)
            x.state = self.agent.transfer(x.handle)
        except NIXL_ERRORS as e:  # a peer known dead fails here, before anything moved
            x.state = _reason(e)
        return x

    def _poll(self, op: PeerReadOp) -> tuple[bool, str | None]:
        assert isinstance(op, _Xfer)
        if op.state != "PROC":  # settled when posted: nothing was left in flight
            self._release(op, op.state)
            return True, None if op.state == "DONE" else f"posting the read failed ({op.state})"
        try:
            state = self.agent.check_xfer_state(op.handle)
        except NIXL_ERRORS as e:  # nixlRemoteDisconnectError from a peer that died
            state = _reason(e)
        if state == "PROC":
            return False, None
        self._release(op, state)
        if state == "DONE":
            return True, None
        # Posted and failed: parts of it may have landed or still be landing.
        self.staging_poisoned = True
        return True, f"transfer ended in {state}"

    def _abandon(self, rnd: ReadRound, op: PeerReadOp) -> str:
        assert isinstance(op, _Xfer)
        self.staging_poisoned = True
        self._release(op, "timed out")
        return "not complete before the deadline (peer frozen or too slow)"

    def _end(self, rnd: ReadRound) -> None:
        try:
            rnd.state.release()
        except NIXL_ERRORS as e:
            log.warning("nixl: releasing staging descriptors failed: %s", _reason(e))

    def _release(self, x: _Xfer, state: str) -> None:
        """Release a finished xfer, or cancel one still in flight. NIXL raises when it
        cannot cancel; the handle is then kept, never dropped, because its finaliser
        would retry at an arbitrary time and the READ may still write into staging.

        With nixl 1.5.1 releasing a READ stuck on a frozen peer returns at once (measured
        over tcp). Later nixl sources drain in-flight requests in release, for up to
        ``NIXL_UCX_REQUEST_DRAIN_TIMEOUT`` (10 s by default): that would block here."""
        if x.handle is None:
            return
        try:
            self.agent.release_xfer_handle(x.handle)
        except NIXL_ERRORS as e:
            assert self.staging is not None
            self._abandoned.append(_Abandoned(x.handle, x.local, x.remote, self.staging, f"{state}; release: {_reason(e)}"))
            self.staging_poisoned = True
            log.warning("epoch %d: abandoned a nixl read from participant %d (%s)", self.epoch, x.peer, _reason(e))

    # -- teardown ----------------------------------------------------------------------
    def close_epoch(self) -> None:
        self._retry_abandoned()
        busy = {a.peer.agent for a in self._abandoned}
        for opened in self._peers.values():
            peer: _Peer = opened.handle
            if peer.agent in busy:
                self._kept_agents.add(peer.agent)  # an xfer NIXL would not cancel still uses it
                continue
            peer.release()
            self._remove_agent(peer.agent)
        super().close_epoch()

    def _retry_abandoned(self) -> None:
        kept = []
        for a in self._abandoned:
            try:
                self.agent.release_xfer_handle(a.handle)
            except NIXL_ERRORS:
                kept.append(a)
        self._abandoned = kept

    def close(self) -> None:
        super().close()
        self._retry_abandoned()
        still = [(d, s) for d, s in self._retired if any(a.staging is s for a in self._abandoned)]
        for descs, _ in self._retired:
            if all(descs is not d for d, _ in still):
                self._deregister(descs, "retired staging")
        self._retired = still
        if self._weight_descs is not None:
            self._deregister(self._weight_descs, "weights")
            self._weight_descs = None
