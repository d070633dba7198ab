"""Peer transports: one interface to read expert slots out of another rank's weights.

Every process taking part in a plan's execution (the *participants*: surviving and
leaving ranks, then joining ranks) has an index ``0 .. world-1`` for the epoch. Each
registers its serving weights once (the per-layer ``[slots_per_rank, ...]`` tensors) and,
per epoch, a staging buffer: flat ``uint8`` that receives packed slots (tensor after
tensor in :class:`~loaders.layout.ExpertLayout` order, ``expert_bytes`` each).

Executing one layer is one :meth:`PeerTransport.exchange` call on every participant,
with the reads this process makes and the sends the plan asks of it. One-sided
transports (NIXL, Mooncake) read straight from the peer's registered weights and ignore
``sends``; two-sided ones (torch.distributed) post a send for each. The outcome of each
read is reported, never raised: the executor falls through to the next source.

Peers find each other through a key-value store with the ``torch.distributed.Store``
API (``set``/``get``/``check``/``add``; a ``TCPStore``, or the etcd store of the
controller): :meth:`connect` publishes :meth:`endpoint` under
``<prefix>/<epoch>/endpoint/<index>`` and peers read it when they first need it.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout, LayerWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerRead:
    """Read slot ``src_slot`` of the current layer from participant ``src`` into staging
    bytes ``[dst_offset, dst_offset + expert_bytes)``: ``PeerRead(src=2, src_slot=5, dst_offset=0)``."""

    src: int
    src_slot: int
    dst_offset: int


@dataclass(frozen=True)
class PeerSend:
    """Send slot ``src_slot`` of the current layer to participant ``dst`` (two-sided
    transports only): ``PeerSend(dst=0, src_slot=5)``."""

    dst: int
    src_slot: int


@dataclass(frozen=True)
class Segment:
    """One contiguous piece of a packed slot: ``nbytes`` at byte ``offset`` of the packed
    form, found in the owner's memory at ``addr``."""

    addr: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightTable:
    """Where a process keeps each layer's serving tensors, enough for a peer to compute
    the address of any slot row: ``bases[layer][tensor]`` and ``row_bytes[tensor]``.

    Example: 2 layers, tensors w13 (row 1024 B) and w2 (row 512 B):
    ``WeightTable(bases=((0x7f00.., 0x7f01..), (0x7f02.., 0x7f03..)), row_bytes=(1024, 512),
    slots_per_rank=4, device="cpu", device_id=0)``.
    """

    bases: tuple[tuple[int, ...], ...]
    row_bytes: tuple[int, ...]
    slots_per_rank: int
    device: str  # "cpu" or "cuda"
    device_id: int

    @classmethod
    def of(cls, layout: ExpertLayout, weights: Sequence[LayerWeights]) -> "WeightTable":
        bases, slots, dev = [], None, None
        for i, lw in enumerate(weights):
            named, n = layout.check_weights(lw, f"layer {i}")
            if slots is not None and n != slots:
                raise ConfigError(f"layer {i} has {n} slots per rank, layer 0 has {slots}")
            slots = n
            for t in named.values():
                d = (t.device.type, t.device.index or 0)
                if dev is not None and d != dev:
                    raise ConfigError(f"layer {i}: weights on {t.device}, others on {dev[0]}:{dev[1]}")
                dev = d
            bases.append(tuple(named[name].data_ptr() for name in layout.names))
        if not bases:
            raise ConfigError("no MoE layers to register")
        assert slots is not None and dev is not None
        return cls(tuple(bases), tuple(t.row_bytes for t in layout.tensors), slots, dev[0], dev[1])

    def segments(self, layer: int, slot: int) -> list[Segment]:
        """The pieces of one packed slot, in packed order."""
        if not (0 <= layer < len(self.bases) and 0 <= slot < self.slots_per_rank):
            raise ConfigError(
                f"layer {layer} slot {slot} outside {len(self.bases)} layers x {self.slots_per_rank} slots"
            )
        out, at = [], 0
        for base, rb in zip(self.bases[layer], self.row_bytes):
            out.append(Segment(base + slot * rb, at, rb))
            at += rb
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bases": [list(b) for b in self.bases],
            "row_bytes": list(self.row_bytes),
            "slots_per_rank": self.slots_per_rank,
            "device": self.device,
            "device_id": self.device_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightTable":
        try:
            return cls(
                tuple(tuple(int(x) for x in b) for b in d["bases"]),
                tuple(int(x) for x in d["row_bytes"]),
                int(d["slots_per_rank"]),
                str(d["device"]),
                int(d["device_id"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"malformed peer weight table {d!r:.200}: {e}") from e


def wait_for_key(store: Any, key: str, deadline: float, poll_s: float = 0.005) -> bytes:
    """``store.get(key)`` once the key exists, or :class:`TransportError` at ``deadline``
    (a ``time.monotonic()`` value). Polls ``check`` so that a peer that never publishes
    costs the caller's deadline, not the store's own (often 5 min) timeout."""
    while True:
        if store.check([key]):
            return store.get(key)
        if time.monotonic() >= deadline:
            raise TransportError(f"store key {key!r} did not appear in time; is that peer alive?")
        time.sleep(poll_s)
        poll_s = min(poll_s * 2, 0.05)


class PeerTransport(ABC):
    """Moves packed expert slots between participants. Lifecycle::

        t.register_weights(weights)            # once per process
        t.connect(epoch, me, world, store)     # per epoch; publishes the endpoint
        t.register_staging(staging)            # per epoch, before the first exchange
        outcomes = t.exchange(layer, reads, sends, timeout)   # per layer
        t.close()
    """

    name: ClassVar[str]
    one_sided: ClassVar[bool]
    """True: a read needs nothing from the source process, so a failed read can be
    retried from another peer. False: the source must post a matching send."""

    def __init__(self, layout: ExpertLayout, prefix: str = "elastic-ep/transport") -> None:
        self.layout = layout
        self.prefix = prefix
        self.table: WeightTable | None = None
        self.staging: torch.Tensor | None = None
        self.store: Any = None
        self.epoch = -1
        self.me = -1
        self.world = 0
        self.staging_poisoned = False
        """Set by a backend when an abandoned operation may still write into the
        staging buffer (a peer timed out mid-read); the executor then moves to a new one."""

    # -- registration ------------------------------------------------------------------
    def register_weights(self, weights: Sequence[LayerWeights]) -> None:
        """Register every layer's serving tensors; they must not be reallocated after."""
        self.table = WeightTable.of(self.layout, weights)
        self.weights = [self.layout.check_weights(w, f"layer {i}")[0] for i, w in enumerate(weights)]
        self._register_weights()

    def register_staging(self, staging: torch.Tensor) -> None:
        """Register the receive buffer (flat ``uint8``, on the weights' device)."""
        if staging.dtype != torch.uint8 or staging.dim() != 1 or not staging.is_contiguous():
            raise ConfigError(f"staging must be a contiguous 1-D uint8 tensor, got {staging.dtype} {tuple(staging.shape)}")
        if self.staging is not None and self.staging.data_ptr() == staging.data_ptr() and self.staging.numel() >= staging.numel():
            return
        if self.staging is not None:
            self._deregister_staging()
        self.staging = staging
        self.staging_poisoned = False
        self._register_staging()

    def connect(self, epoch: int, me: int, world: int, store: Any, timeout: float = 30.0) -> None:
        """Join epoch ``epoch`` as participant ``me`` of ``world``: publish this process's
        endpoint; peers are contacted lazily (a dead peer costs only its readers)."""
        if self.table is None:
            raise ConfigError(f"{self.name}: register_weights before connect")
        if not 0 <= me < world:
            raise ConfigError(f"participant {me} outside 0..{world - 1}")
        self.close_epoch()
        self.epoch, self.me, self.world, self.store = epoch, me, world, store
        endpoint = {"table": self.table.to_dict(), **self.endpoint()}
        store.set(self.endpoint_key(me), json.dumps(endpoint))
        self._connect(timeout)

    def endpoint_key(self, index: int) -> str:
        return f"{self.prefix}/{self.epoch}/endpoint/{index}"

    def peer_endpoint(self, index: int, deadline: float) -> dict[str, Any]:
        """A peer's published endpoint (with its ``table``), waiting until ``deadline``."""
        raw = wait_for_key(self.store, self.endpoint_key(index), deadline)
        try:
            d = json.loads(raw)
            d["table"] = WeightTable.from_dict(d["table"])
        except (ValueError, KeyError, TypeError) as e:
            raise TransportError(f"participant {index}: malformed endpoint {raw[:200]!r}: {e}") from e
        return d

    # -- what each backend provides ------------------------------------------------------
    @abstractmethod
    def _register_weights(self) -> None:
        """Register ``self.weights`` (``self.table`` holds their addresses)."""

    @abstractmethod
    def _register_staging(self) -> None:
        """Register ``self.staging``."""

    def _deregister_staging(self) -> None:
        """Undo :meth:`_register_staging` for the current ``self.staging``."""

    def endpoint(self) -> dict[str, Any]:
        """JSON-able metadata peers need besides the weight table (agent metadata,
        session address)."""
        return {}

    def _connect(self, timeout: float) -> None:
        """Per-epoch setup after the endpoint is published."""

    @abstractmethod
    def exchange(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        """Carry out this participant's part of one layer: fill the staging bytes of each
        read, post each send. Returns one entry per read, ``None`` when its bytes
        arrived whole, else the error; returns within about ``timeout`` seconds even if a
        peer is dead or frozen."""

    def close_epoch(self) -> None:
        """Drop per-epoch state (peer connections, process groups)."""

    def close(self) -> None:
        """Release everything; the transport cannot be used after."""
        self.close_epoch()
        if self.staging is not None:
            self._deregister_staging()
            self.staging = None



class OneSidedTransport(PeerTransport):
    """A transport whose reads need nothing from the source process (NIXL, Mooncake).

    :meth:`exchange` checks the reads, copies this process's own slots, fails reads
    from peers that already failed this epoch, and hands the rest, grouped by peer, to
    :meth:`_read`, which calls :meth:`_fail_peer` for a peer that fails."""

    one_sided = True

    def __init__(self, layout: ExpertLayout, prefix: str = "elastic-ep/transport") -> None:
        super().__init__(layout, prefix)
        self._failed: dict[int, str] = {}  # participant -> why, for this epoch

    def exchange(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        if self.staging is None or self.table is None or self.store is None:
            raise ConfigError(f"{self.name} transport: register_weights, connect and register_staging before exchange")
        deadline = time.monotonic() + timeout
        eb = self.layout.expert_bytes
        if not 0 <= layer < len(self.table.bases):
            raise ConfigError(f"layer {layer} outside the {len(self.table.bases)} registered layers")
        for r in reads:
            if not 0 <= r.dst_offset <= self.staging.numel() - eb:
                raise ConfigError(
                    f"layer {layer}: read {r} writes bytes {r.dst_offset}..{r.dst_offset + eb}, "
                    f"outside the {self.staging.numel()}-byte staging buffer"
                )
        out: list[BaseException | None] = [None] * len(reads)
        by_peer: dict[int, list[int]] = {}
        for i, r in enumerate(reads):
            if r.src == self.me:  # no transfer needed: copy the own slot
                self.layout.pack_slot(self.weights[layer], r.src_slot, out=self.staging[r.dst_offset : r.dst_offset + eb])
            elif not 0 <= r.src < self.world:
                out[i] = ConfigError(f"layer {layer}: read {r} from outside participants 0..{self.world - 1}")
            elif r.src in self._failed:
                out[i] = self._error(r.src, layer, f"failed earlier in epoch {self.epoch} ({self._failed[r.src]})")
            else:
                by_peer.setdefault(r.src, []).append(i)
        if by_peer:
            self._read(layer, reads, by_peer, out, deadline)
        return out

    @abstractmethod
    def _read(
        self,
        layer: int,
        reads: Sequence[PeerRead],
        by_peer: dict[int, list[int]],
        out: list[BaseException | None],
        deadline: float,
    ) -> None:
        """Read ``reads[i]`` for every ``i`` in ``by_peer[peer]``, setting ``out[i]`` to an
        error for each that fails; return by ``deadline`` (``time.monotonic()``)."""

    def _error(self, peer: int, layer: int, reason: str) -> TransportError:
        return TransportError(f"epoch {self.epoch} layer {layer}: read from participant {peer} failed: {reason}")

    def _fail_peer(self, peer: int, reason: str) -> None:
        if peer not in self._failed:
            log.warning("epoch %d participant %d: %s peer %d failed: %s", self.epoch, self.me, self.name, peer, reason)
            self._failed[peer] = reason

    def close_epoch(self) -> None:
        self._failed.clear()


_BACKENDS: dict[str, Callable[..., PeerTransport]] = {}


def register_backend(name: str) -> Callable[[type[PeerTransport]], type[PeerTransport]]:
    def deco(cls: type[PeerTransport]) -> type[PeerTransport]:
        _BACKENDS[name] = cls
        return cls

    return deco


def get_transport(name: str, layout: ExpertLayout, **options: Any) -> PeerTransport:
    """A transport by name: ``torch`` (gloo on CPU, NCCL on CUDA), ``nixl``, ``mooncake``."""
    import importlib

    modules = {"torch": "loaders.transport.torch_backend", "nixl": "loaders.transport.nixl_backend", "mooncake": "loaders.transport.mooncake_backend"}
    if name not in modules:
        raise ConfigError(f"unknown transport {name!r}; choose one of {sorted(modules)}")
    try:
        importlib.import_module(modules[name])
    except ImportError as e:
        extra = {"nixl": "nixl", "mooncake": "mooncake"}.get(name)
        hint = f'; install it with pip install "elastic-ep[{extra}]"' if extra else ""
        raise ConfigError(f"transport {name!r} is not available here ({e}){hint}") from e
    return _BACKENDS[name](layout, **options)
