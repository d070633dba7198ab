"""Peer transports: one interface to read expert slots out of another rank's weights.

Every process taking part in a plan's execution (the *participants*: surviving and
leaving ranks, then joining ranks) has an index ``0 .. world-1`` for the epoch. Each
registers its serving weights once (the per-layer ``[slots_per_rank, ...]`` tensors) and,
per epoch, a staging buffer: flat ``uint8`` that receives packed slots (tensor after
tensor in :class:`~loaders.layout.ExpertLayout` order, ``expert_bytes`` each). A process
may also register a *mirror* (:meth:`PeerTransport.register_mirror`): host memory whose
rows hold packed experts, read as slots ``slots_per_rank + row`` of any layer, by peers
and by the process itself, through every backend.

Executing one layer is one :meth:`PeerTransport.exchange` call on every participant: the
receives this process makes, each with its candidate peer sources in the plan's order,
and the sends the plan asks of it. The transport decides which candidates a receive may
try, and reports per receive which one delivered or that none did (the executor then
reads the disk). What a backend's kind allows:

- one-sided (:class:`OneSidedTransport`: NIXL, Mooncake): a read needs nothing from the
  source process, so a failed read is retried from the next candidate, skipping peers
  that failed earlier in the epoch; sends need no call (the readers fetch).
- two-sided (:class:`TwoSidedTransport`: torch.distributed): the source must post a
  matching send, and only a receive's first (planned) source posts one, so a receive
  tries that candidate only, and this process posts every send asked of it.

Each round of reads (one per candidate tried, at most) returns within about ``timeout``
seconds even if a peer is dead or frozen; errors are reported, never raised.

Store keys. :meth:`PeerTransport.connect` takes the epoch's own store (the executor hands
every plan its own scope: see :mod:`elastic_ep.runtime.executor`) and writes, under the
transport's ``prefix`` (default ``transport``)::

    <prefix>/endpoint/<participant>   JSON: the weight table and the backend's metadata
    <prefix>/pg/...                   the torch backend's process-group rendezvous

Peers read an endpoint the first time they need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from elastic_ep.errors import ConfigError, TransportError

from loaders.layout import ExpertLayout, LayerWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSource:
    """A candidate source of a receive: slot ``slot`` of the current layer at participant
    ``participant``: ``PeerSource(participant=2, slot=5)``."""

    participant: int
    slot: int


@dataclass(frozen=True)
class Receive:
    """One slot to stage: bytes ``[offset, offset + expert_bytes)`` of the staging buffer,
    from the first of ``candidates`` (the plan's order) that delivers.

    Example: slot 5 of participant 2, else slot 1 of participant 0, into the third
    staged slot: ``Receive(offset=2 * eb, candidates=(PeerSource(2, 5), PeerSource(0, 1)))``.
    """

    offset: int
    candidates: tuple[PeerSource, ...]


@dataclass(frozen=True)
class ReceiveOutcome:
    """What became of one :class:`Receive`: ``delivered`` is the index into its
    candidates of the one whose bytes arrived whole (None: none did, read the disk);
    ``failures`` holds ``(candidate index, error)`` of each tried that failed, in order.

    Example: candidate 0's peer died mid-read, candidate 1 delivered:
    ``ReceiveOutcome(delivered=1, failures=((0, TransportError("..."),),))``, ``attempts == 2``.
    """

    delivered: int | None
    failures: tuple[tuple[int, BaseException], ...] = ()

    @property
    def attempts(self) -> int:
        return len(self.failures) + (self.delivered is not None)


@dataclass(frozen=True)
class PeerRead:
    """One read of a round (:meth:`PeerTransport.transfer`): slot ``src_slot`` of the
    current layer from participant ``src`` into staging bytes
    ``[dst_offset, dst_offset + expert_bytes)``: ``PeerRead(src=2, src_slot=5, dst_offset=0)``."""

    src: int
    src_slot: int
    dst_offset: int


@dataclass(frozen=True)
class PeerSend:
    """Send slot ``src_slot`` of the current layer to participant ``dst`` (what a
    two-sided transport posts for a peer's read): ``PeerSend(dst=0, src_slot=5)``."""

    dst: int
    src_slot: int


@dataclass
class _Tries:
    """One receive's progress inside :meth:`PeerTransport.exchange`: ``start`` is the first
    candidate index not tried yet; ``done`` once it delivered or has nothing left to try."""

    start: int = 0
    delivered: int | None = None
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    done: bool = False

    def outcome(self) -> ReceiveOutcome:
        return ReceiveOutcome(self.delivered, tuple(self.failures))


@dataclass(frozen=True)
class Segment:
    """One contiguous piece of a packed slot: ``nbytes`` at byte ``offset`` of the packed
    form, found in the owner's memory at ``addr``."""

    addr: int
    offset: int
    nbytes: int


MAX_MIRROR_ROWS = 1 << 20
"""Most mirror rows a peer's table may claim (DeepSeek-V3 has 14,848 routed experts in
all): a larger count in an endpoint is a forged or broken value, not a mirror."""

_MIRROR_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class WeightTable:
    """Where a process keeps each layer's serving tensors, enough for a peer to compute
    the address of any slot row: ``bases[layer][tensor]`` and ``row_bytes[tensor]``; and
    its host-memory *mirror*, if any: ``mirror_rows`` packed experts (``expert_bytes``
    each, the staging form) from ``mirror_base``, read as slots ``slots_per_rank ..
    slots_per_rank + mirror_rows - 1`` of any layer.

    Example: 2 layers, tensors w13 (row 1024 B) and w2 (row 512 B), 3 mirror rows:
    ``WeightTable(bases=((0x7f00.., 0x7f01..), (0x7f02.., 0x7f03..)), row_bytes=(1024, 512),
    slots_per_rank=4, device="cuda", device_id=0, mirror_base=0x7e00.., mirror_rows=3)``;
    slot 5 of any layer is then the 1536 bytes at ``mirror_base + 1536``.
    """

    bases: tuple[tuple[int, ...], ...]
    row_bytes: tuple[int, ...]
    slots_per_rank: int
    device: str  # "cpu" or "cuda"
    device_id: int
    mirror_base: int = 0
    mirror_rows: int = 0
    mirror_device: str = "cpu"
    mirror_device_id: int = 0

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

    @property
    def expert_bytes(self) -> int:
        return sum(self.row_bytes)

    def holds(self, slot: int) -> bool:
        """True for a GPU slot or a mirror row of this table."""
        return 0 <= slot < self.slots_per_rank + self.mirror_rows

    def is_mirror(self, slot: int) -> bool:
        return self.slots_per_rank <= slot < self.slots_per_rank + self.mirror_rows

    def refuse(self, layer: int, read: PeerRead, owner: int) -> ConfigError | None:
        """The error of ``read`` in ``layer`` if ``owner`` (whose table this is) does not
        hold its slot, else None."""
        if 0 <= layer < len(self.bases) and self.holds(read.src_slot):
            return None
        return ConfigError(
            f"layer {layer}: {read} outside participant {owner}'s {len(self.bases)} layers x "
            f"{self.slots_per_rank} slots + {self.mirror_rows} mirror rows"
        )

    def segments(self, layer: int, slot: int) -> list[Segment]:
        """The pieces of one packed slot, in packed order: one per tensor for a GPU
        slot, one whole ``expert_bytes`` piece for a mirror row (stored packed)."""
        if not (0 <= layer < len(self.bases) and self.holds(slot)):
            raise ConfigError(
                f"layer {layer} slot {slot} outside {len(self.bases)} layers x {self.slots_per_rank} slots"
                f" + {self.mirror_rows} mirror rows"
            )
        if slot >= self.slots_per_rank:
            eb = self.expert_bytes
            return [Segment(self.mirror_base + (slot - self.slots_per_rank) * eb, 0, eb)]
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
            "mirror_base": self.mirror_base,
            "mirror_rows": self.mirror_rows,
            "mirror_device": self.mirror_device,
            "mirror_device_id": self.mirror_device_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightTable":
        """Parse a peer's published table. The mirror fields are optional (an endpoint
        from before mirrors has none) and bounded: the reader computes addresses from them."""
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a table is a JSON object, not {type(d).__name__}")
            t = cls(
                tuple(tuple(int(x) for x in b) for b in d["bases"]),
                tuple(int(x) for x in d["row_bytes"]),
                int(d["slots_per_rank"]),
                str(d["device"]),
                int(d["device_id"]),
                _bounded(d, "mirror_base", (1 << 64) - 1),
                _bounded(d, "mirror_rows", MAX_MIRROR_ROWS),
                str(d.get("mirror_device", "cpu")),
                _bounded(d, "mirror_device_id", 1 << 16),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"malformed peer weight table {d!r:.200}: {e}") from e
        if t.mirror_device not in _MIRROR_DEVICES or t.mirror_base + t.mirror_rows * t.expert_bytes >= 1 << 64:
            raise TransportError(
                f"peer weight table: mirror of {t.mirror_rows} rows at {t.mirror_base:#x} on "
                f"{t.mirror_device!r} is not an address range of cpu or cuda memory"
            )
        return t


def _mirror_fields(t: WeightTable) -> dict[str, Any]:
    return {"mirror_base": t.mirror_base, "mirror_rows": t.mirror_rows,
            "mirror_device": t.mirror_device, "mirror_device_id": t.mirror_device_id}


def _bounded(d: dict[str, Any], key: str, most: int) -> int:
    """``d[key]`` (0 when absent) if a JSON integer in ``0..most``; else ValueError."""
    v = d.get(key, 0)
    if type(v) is not int or not 0 <= v <= most:
        raise ValueError(f"{key} {v!r} is not an integer in 0..{most}")
    return v


GONE_POLL_S = 0.1
"""How often a wait on peers asks :attr:`PeerTransport.gone` about the ones it waits for."""


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

        t.register_weights(weights)                  # once per process
        t.register_mirror(mirror)                    # optional, before connect
        t.connect(epoch, me, world, store)           # per epoch; publishes the endpoint
        t.register_staging(staging)                  # per epoch, before the first exchange
        outcomes = t.exchange(layer, receives, sends, timeout)   # per layer
        t.close_epoch()                              # (connect closes the previous one)
        t.close()

    :meth:`exchange` runs rounds of :meth:`transfer` (the backend's one verb: post a
    round's reads and sends, wait for them) over the candidates that
    :meth:`_next_candidate` allows, until every receive delivered or has none left.
    """

    name: ClassVar[str]

    def __init__(self, layout: ExpertLayout, prefix: str = "transport") -> None:
        self.layout = layout
        self.prefix = prefix
        self.table: WeightTable | None = None
        self.staging: torch.Tensor | None = None
        self.mirror: torch.Tensor | None = None
        """This process's host-memory mirror (:meth:`register_mirror`), or None."""
        self.store: Any = None
        self.epoch = -1
        self.me = -1
        self.world = 0
        self.staging_poisoned = False
        """Set by a backend when an abandoned operation may still write into the
        staging buffer (a peer timed out mid-read); :meth:`exchange` then moves on to a
        fresh buffer (see :meth:`_retire_poisoned_staging`)."""
        self.retired_staging: list[torch.Tensor] = []
        """Staging buffers left because an abandoned operation may still write there;
        kept alive (their memory must not be reused) until the next epoch's connect."""
        self._failed: dict[int, str] = {}  # participant -> why a read from it failed, this epoch
        self.abort: Callable[[], str] | None = None
        """Set by the rank's agent for each plan: why this epoch's waits should end now
        (a participant confirmed dead, a newer plan published), or "" to keep waiting."""
        self.gone: Callable[[int], bool] | None = None
        """Set by the rank's agent for each plan: True for a participant the controller
        confirmed dead (its registration revoked). A read from it still in flight is
        abandoned at once instead of at its deadline (a frozen peer never answers)."""

    # -- registration ------------------------------------------------------------------
    def register_weights(self, weights: Sequence[LayerWeights]) -> None:
        """Register every layer's serving tensors; they must not be reallocated after."""
        table = WeightTable.of(self.layout, weights)
        if self.table is not None:  # weights registered again: the mirror stays registered
            table = dataclasses.replace(table, **_mirror_fields(self.table))
        self.table = table
        self.weights = [self.layout.check_weights(w, f"layer {i}")[0] for i, w in enumerate(weights)]
        self._register_weights()

    def register_mirror(self, buffer: torch.Tensor) -> None:
        """Register this process's host-memory mirror: flat contiguous ``uint8`` on the
        CPU (pinned where the weights are on CUDA, for fast copies), ``rows *
        expert_bytes`` long, each row one packed expert (:meth:`ExpertLayout.pack_slot`
        order). Row ``r`` is then slot ``slots_per_rank + r`` of any layer, to peers
        and to this process's own reads. Call after :meth:`register_weights` and before
        :meth:`connect`: peers learn of it from the endpoint ``connect`` publishes. It
        must not be reallocated while registered."""
        if self.table is None:
            raise ConfigError(f"{self.name}: register_weights before register_mirror")
        rows = self.layout.check_mirror(buffer)
        if self.mirror is not None:
            self._deregister_mirror()
        self.mirror = buffer
        self.table = dataclasses.replace(
            self.table, mirror_base=buffer.data_ptr(), mirror_rows=rows, mirror_device="cpu", mirror_device_id=0
        )
        self._register_mirror()

    def own_pieces(self, layer: int, slot: int) -> list[torch.Tensor]:
        """This process's slot ``slot`` of ``layer`` as flat uint8 views, one per layout
        tensor in packed order (a GPU slot's rows; a mirror row cut at the layout's
        offsets): what a send posts, and what :meth:`pack_own` copies."""
        if self.table is None:
            raise ConfigError(f"{self.name}: register_weights before reading its own slots")
        err = self.table.refuse(layer, PeerRead(self.me, slot, 0), self.me)
        if err is not None:
            raise err
        if slot < self.table.slots_per_rank:
            named = self.weights[layer]
            return [self.layout.row_bytes_view(named[t.name], slot) for t in self.layout.tensors]
        assert self.mirror is not None
        at = (slot - self.table.slots_per_rank) * self.layout.expert_bytes
        return [self.mirror[at + off : at + off + t.row_bytes] for t, off in zip(self.layout.tensors, self.layout.offsets)]

    def pack_own(self, layer: int, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Copy this process's own slot or mirror row (see :meth:`own_pieces`) into
        ``out`` (uint8 ``[expert_bytes]``, any device) and return it."""
        for piece, off in zip(self.own_pieces(layer, slot), self.layout.offsets):
            out[off : off + piece.numel()].copy_(piece)
        return out

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
        endpoint in ``store``, the epoch's own (its keys are not shared with another
        epoch); peers are contacted lazily (a dead peer costs only its readers)."""
        if self.table is None:
            raise ConfigError(f"{self.name}: register_weights before connect")
        if not 0 <= me < world:
            raise ConfigError(f"participant {me} outside 0..{world - 1}")
        self.close_epoch()
        self.retired_staging.clear()  # the previous epoch's abandoned operations are closed
        self.epoch, self.me, self.world, self.store = epoch, me, world, store
        endpoint = {"table": self.table.to_dict(), **self.endpoint()}
        store.set(self.endpoint_key(me), json.dumps(endpoint))
        self._connect(timeout)

    def endpoint_key(self, index: int) -> str:
        return f"{self.prefix}/endpoint/{index}"

    def peer_endpoint(self, index: int, deadline: float) -> dict[str, Any]:
        """A peer's published endpoint (with its ``table``), waiting until ``deadline``."""
        raw = wait_for_key(self.store, self.endpoint_key(index), deadline)
        try:
            d = json.loads(raw)
            d["table"] = WeightTable.from_dict(d["table"])
        except (ValueError, KeyError, TypeError) as e:
            raise TransportError(f"participant {index}: malformed endpoint {raw[:200]!r}: {e}") from e
        return d

    # -- the per-layer verb ------------------------------------------------------------
    def exchange(
        self, layer: int, receives: Sequence[Receive], sends: Sequence[PeerSend], timeout: float
    ) -> list[ReceiveOutcome]:
        """Carry out this participant's part of one layer: fill each receive's staging
        bytes from a candidate this kind of transport may try, post the sends it needs.
        Returns one :class:`ReceiveOutcome` per receive; each round of reads (at most one
        per candidate) returns within about ``timeout`` seconds.

        Example (one-sided; participant 2 died)::

            t.exchange(3, [Receive(0, (PeerSource(2, 5), PeerSource(0, 1)))], [], 10.0)
            -> [ReceiveOutcome(delivered=1, failures=((0, TransportError(...)),))]

        A two-sided transport tries candidate 0 only: ``[ReceiveOutcome(None, ((0, ...),))]``.
        """
        tries = [_Tries() for _ in receives]
        sends_left = self._sends_to_post(sends)  # posted with the first round only
        while True:
            batch = self._next_round(receives, tries)
            if not batch and not sends_left:
                break
            reads = [
                PeerRead(receives[i].candidates[k].participant, receives[i].candidates[k].slot, receives[i].offset)
                for i, k in batch
            ]
            errors = self.transfer(layer, reads, sends_left, timeout)
            sends_left = []
            self._retire_poisoned_staging()
            self._note_round(receives, tries, batch, errors)
        return [t.outcome() for t in tries]

    def _next_round(self, receives: Sequence[Receive], tries: list[_Tries]) -> list[tuple[int, int]]:
        """``(receive index, candidate index)`` of every read of the next round."""
        batch = []
        for i, (r, t) in enumerate(zip(receives, tries)):
            if t.done:
                continue
            k = self._next_candidate(r, t.start)
            if k is None:
                t.done = True
            else:
                batch.append((i, k))
        return batch

    def _note_round(
        self,
        receives: Sequence[Receive],
        tries: list[_Tries],
        batch: list[tuple[int, int]],
        errors: Sequence[BaseException | None],
    ) -> None:
        for (i, k), err in zip(batch, errors):
            t = tries[i]
            if err is None:
                t.delivered, t.done = k, True
                continue
            t.failures.append((k, err))
            t.start = k + 1
            if not isinstance(err, ConfigError):  # a slot the peer lacks is no fault of the peer
                self._fail_peer(receives[i].candidates[k].participant, str(err))

    def _retire_poisoned_staging(self) -> None:
        """An abandoned operation may still land in the staging buffer: keep that buffer
        alive (so its memory is not reused) and go on in a registered copy of it. Reads
        that landed whole are in the copy; the abandoned ones' slots are read again."""
        if not self.staging_poisoned or self.staging is None:
            return
        old = self.staging
        self.retired_staging.append(old)
        self.register_staging(old.clone())

    def held_staging_bytes(self) -> int:
        """Staging memory held now: the current buffer and the retired ones."""
        current = self.staging.numel() if self.staging is not None else 0
        return current + sum(t.numel() for t in self.retired_staging)

    def _fail_peer(self, peer: int, reason: str) -> None:
        if peer not in self._failed:
            log.warning("epoch %d participant %d: %s peer %d failed: %s", self.epoch, self.me, self.name, peer, reason)
            self._failed[peer] = reason

    # -- what each kind of transport decides -------------------------------------------
    @abstractmethod
    def _next_candidate(self, receive: Receive, start: int) -> int | None:
        """The index of the candidate of ``receive`` to try next, at or after ``start``
        (the candidates before it were tried); None: no peer is left, read the disk."""

    @abstractmethod
    def _sends_to_post(self, sends: Sequence[PeerSend]) -> list[PeerSend]:
        """Of the sends the plan asks of this process, those it must post itself."""

    # -- what each backend provides ------------------------------------------------------
    @abstractmethod
    def _register_weights(self) -> None:
        """Register ``self.weights`` (``self.table`` holds their addresses)."""

    @abstractmethod
    def _register_staging(self) -> None:
        """Register ``self.staging``."""

    def _deregister_staging(self) -> None:
        """Undo :meth:`_register_staging` for the current ``self.staging``."""

    def _register_mirror(self) -> None:
        """Register ``self.mirror`` (``self.table`` holds its address) so that peers can
        read it; nothing for a backend whose sources send their own bytes."""

    def _deregister_mirror(self) -> None:
        """Undo :meth:`_register_mirror` for the current ``self.mirror``."""

    def endpoint(self) -> dict[str, Any]:
        """JSON-able metadata peers need besides the weight table (agent metadata,
        session address)."""
        return {}

    def _connect(self, timeout: float) -> None:
        """Per-epoch setup after the endpoint is published."""

    @abstractmethod
    def transfer(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        """One round: fill the staging bytes of each read, post each send. Returns one
        entry per read, ``None`` when its bytes arrived whole, else the error; returns
        within about ``timeout`` seconds even if a peer is dead or frozen."""

    def close_epoch(self) -> None:
        """Drop per-epoch state (peer connections, process groups, failed peers)."""
        self._failed.clear()

    def close(self) -> None:
        """Release everything; the transport cannot be used after."""
        self.close_epoch()
        if self.staging is not None:
            self._deregister_staging()
            self.staging = None
        if self.mirror is not None:
            self._deregister_mirror()
            self.mirror = None

    def _pack_own_read(self, layer: int, r: PeerRead, out: torch.Tensor) -> ConfigError | None:
        """A read from this process itself: copied, or the ConfigError of a slot it lacks
        (:meth:`own_pieces` checks it)."""
        try:
            self.pack_own(layer, r.src_slot, out)
        except ConfigError as e:
            return e
        return None


class TwoSidedTransport(PeerTransport):
    """A transport whose reads need the source to post a matching send (torch.distributed).

    Only a receive's planned (first) source posts a send for it, so a receive tries its
    first candidate only, and a failed read goes straight to disk; this process posts,
    in the layer's first round, every send the plan asks of it."""

    def _next_candidate(self, receive: Receive, start: int) -> int | None:
        return 0 if start == 0 and receive.candidates else None

    def _sends_to_post(self, sends: Sequence[PeerSend]) -> list[PeerSend]:
        return list(sends)


@dataclass(frozen=True)
class OpenPeer:
    """A peer a one-sided transport has opened this epoch: its weight ``table`` and the
    backend's ``handle`` for it (NIXL: its loaded agent and rows; Mooncake: its session)."""

    table: WeightTable
    handle: Any


@dataclass
class PeerReadOp:
    """A backend's operation in flight for one peer in one round: ``reads``, the indices
    (into the round's reads) of everything it fetches from participant ``peer``."""

    peer: int
    reads: list[int]


@dataclass
class ReadRound:
    """One :meth:`OneSidedTransport.transfer` call: ``reads`` [n] and ``out`` [n], their
    outcomes so far (None: arrived, or not settled yet); ``deadline`` is a
    ``time.monotonic()`` value, ``timeout`` the round's length; ``state`` is what the
    backend's :meth:`~OneSidedTransport._begin` returned (NIXL: the staging descriptors)."""

    layer: int
    reads: Sequence[PeerRead]
    out: list[BaseException | None]
    deadline: float
    timeout: float
    state: Any = None


class OneSidedTransport(PeerTransport):
    """A transport whose reads need nothing from the source process (NIXL, Mooncake).

    :meth:`transfer` checks the reads, copies this process's own slots and fails reads
    from peers that already failed this epoch. The rest it reads per peer: once the
    peer's endpoint is published (looked at, never waited on, so a silent peer holds up
    no other) the peer is opened once per epoch (:meth:`_open_peer`), its reads are checked
    against its table and started as one backend operation (:meth:`_start`; or a few,
    where the backend splits them by memory: :meth:`_op_groups`), which is
    polled (:meth:`_poll`) until it settles or the deadline, where it is abandoned
    (:meth:`_abandon`) and peers that never published are failed. A peer that fails is
    remembered as failed for the epoch.
    """

    poll_s: float = 0.001  # the longest sleep between polls of the operations

    def __init__(self, layout: ExpertLayout, prefix: str = "transport") -> None:
        super().__init__(layout, prefix)
        self._peers: dict[int, OpenPeer] = {}  # this epoch's opened peers

    def _next_candidate(self, receive: Receive, start: int) -> int | None:
        for k in range(start, len(receive.candidates)):
            if receive.candidates[k].participant not in self._failed:
                return k
        return None

    def _sends_to_post(self, sends: Sequence[PeerSend]) -> list[PeerSend]:
        return []  # the readers fetch what they need; the source posts nothing

    def transfer(
        self, layer: int, reads: Sequence[PeerRead], sends: Sequence[PeerSend], timeout: float
    ) -> list[BaseException | None]:
        if sends:
            raise NotImplementedError(f"{self.name} is one-sided: a source posts no sends; the readers fetch")
        self._check_reads(layer, reads)
        rnd = ReadRound(layer, reads, [None] * len(reads), time.monotonic() + timeout, timeout)
        by_peer = self._sort_reads(rnd)
        if by_peer:
            self._read_peers(rnd, by_peer)
        return rnd.out

    def _check_reads(self, layer: int, reads: Sequence[PeerRead]) -> None:
        if self.staging is None or self.table is None or self.store is None:
            raise ConfigError(f"{self.name} transport: register_weights, connect and register_staging before transfer")
        if not 0 <= layer < len(self.table.bases):
            raise ConfigError(f"layer {layer} outside the {len(self.table.bases)} registered layers")
        eb = self.layout.expert_bytes
        for r in reads:
            if not 0 <= r.dst_offset <= self.staging.numel() - eb:
                raise ConfigError(
                    f"layer {layer}: read {r} writes bytes {r.dst_offset}..{r.dst_offset + eb}, "
                    f"outside the {self.staging.numel()}-byte staging buffer"
                )

    def _sort_reads(self, rnd: ReadRound) -> dict[int, list[int]]:
        """Settle the reads that need no peer; the others' indices by peer."""
        assert self.staging is not None
        eb, by_peer = self.layout.expert_bytes, {}
        for i, r in enumerate(rnd.reads):
            if r.src == self.me:  # no transfer needed: copy the own slot or mirror row
                rnd.out[i] = self._pack_own_read(rnd.layer, r, self.staging[r.dst_offset : r.dst_offset + eb])
            elif not 0 <= r.src < self.world:
                rnd.out[i] = ConfigError(f"layer {rnd.layer}: read {r} from outside participants 0..{self.world - 1}")
            elif r.src in self._failed:
                rnd.out[i] = self._error(r.src, rnd.layer, f"failed earlier in epoch {self.epoch} ({self._failed[r.src]})")
            else:
                by_peer.setdefault(r.src, []).append(i)
        return by_peer

    def _read_peers(self, rnd: ReadRound, by_peer: dict[int, list[int]]) -> None:
        try:
            rnd.state = self._begin(rnd)
        except TransportError as e:  # nothing was posted: not any peer's fault
            for idx in by_peer.values():
                for i in idx:
                    rnd.out[i] = e
            return
        waiting = dict(by_peer)  # peers whose endpoint has not been seen yet
        running: list[PeerReadOp] = []
        poll = 0.0001
        ask_gone = time.monotonic() + GONE_POLL_S  # most reads end long before the first ask
        try:
            while True:
                running += self._start_published(rnd, waiting)
                running = [op for op in running if not self._settle(rnd, op)]
                if not waiting and not running:
                    return
                now = time.monotonic()
                if now >= rnd.deadline:
                    self._give_up(rnd, waiting, running)
                    return
                if now >= ask_gone:
                    ask_gone = now + GONE_POLL_S
                    running = self._drop_gone(rnd, waiting, running)
                time.sleep(poll)
                poll = min(poll * 2, self.poll_s)
        finally:
            self._end(rnd)

    def _drop_gone(self, rnd: ReadRound, waiting: dict[int, list[int]], running: list[PeerReadOp]) -> list[PeerReadOp]:
        """Abandon the reads of peers confirmed gone (:attr:`gone`); the ops still running."""
        if self.gone is None:
            return running
        keep = []
        for op in running:
            if self.gone(op.peer):
                self._fail_reads(rnd, op.peer, op.reads, f"confirmed gone; {self._abandon(rnd, op)}")
            else:
                keep.append(op)
        for p in [p for p in waiting if self.gone(p)]:
            self._fail_reads(rnd, p, waiting.pop(p), "confirmed gone before it published its endpoint")
        return keep

    def _start_published(self, rnd: ReadRound, waiting: dict[int, list[int]]) -> list[PeerReadOp]:
        """Start the reads of every waiting peer whose endpoint is known by now."""
        started = []
        for p, idx in list(waiting.items()):
            # Look, never wait: a peer that has not published must not hold up the others.
            if p not in self._peers and not self.store.check([self.endpoint_key(p)]):
                continue
            del waiting[p]
            try:
                peer = self._open(p, rnd.deadline)
            except TransportError as e:  # e.g. a dead peer: the backend cannot reach it
                self._fail_reads(rnd, p, idx, str(e))
                continue
            idx = self._in_table(rnd, p, peer.table, idx)
            started += [self._start(rnd, p, peer, group) for group in self._op_groups(rnd, peer.table, idx) if group]
        return started

    def _open(self, index: int, deadline: float) -> OpenPeer:
        """The peer opened this epoch, opening it on first use (raises TransportError)."""
        peer = self._peers.get(index)
        if peer is not None:
            return peer
        ep = self.peer_endpoint(index, deadline)
        table: WeightTable = ep["table"]
        mine = tuple(t.row_bytes for t in self.layout.tensors)
        if table.row_bytes != mine:
            raise TransportError(
                f"participant {index} serves rows of {list(table.row_bytes)} bytes, this layout {list(mine)}"
            )
        peer = self._peers[index] = OpenPeer(table, self._open_peer(index, ep))
        return peer

    def _in_table(self, rnd: ReadRound, peer: int, table: WeightTable, idx: list[int]) -> list[int]:
        """Those of ``idx`` whose slot (or mirror row) the peer has; the others get a ConfigError."""
        ok = []
        for i in idx:
            err = table.refuse(rnd.layer, rnd.reads[i], peer)
            if err is None:
                ok.append(i)
            else:
                rnd.out[i] = err
        return ok

    def _settle(self, rnd: ReadRound, op: PeerReadOp) -> bool:
        """True once ``op`` ended (its reads failed if it failed)."""
        settled, why = self._poll(op)
        if settled and why is not None:
            self._fail_reads(rnd, op.peer, op.reads, why)
        return settled

    def _give_up(self, rnd: ReadRound, waiting: dict[int, list[int]], running: list[PeerReadOp]) -> None:
        for op in running:
            self._fail_reads(rnd, op.peer, op.reads, self._abandon(rnd, op))
        for p, idx in waiting.items():
            self._fail_reads(rnd, p, idx, f"no endpoint under {self.endpoint_key(p)!r} in time; is it alive?")

    def _fail_reads(self, rnd: ReadRound, peer: int, idx: Sequence[int], reason: str) -> None:
        self._fail_peer(peer, reason)
        for i in idx:
            rnd.out[i] = self._error(peer, rnd.layer, reason)

    def _error(self, peer: int, layer: int, reason: str) -> TransportError:
        return TransportError(f"epoch {self.epoch} layer {layer}: read from participant {peer} failed: {reason}")

    # -- what each one-sided backend provides --------------------------------------------
    @abstractmethod
    def _open_peer(self, index: int, endpoint: dict[str, Any]) -> Any:
        """The backend's handle for a peer from its published ``endpoint`` (whose
        ``table`` is checked already); raises TransportError."""

    def _op_groups(self, rnd: ReadRound, table: WeightTable, idx: list[int]) -> list[list[int]]:
        """How one peer's reads of a round split into operations (one :meth:`_start`
        each); one operation for all of them unless the backend needs more."""
        return [idx]

    def _begin(self, rnd: ReadRound) -> Any:
        """Per-round setup before any read starts (stored in ``rnd.state``); raises
        TransportError to fail every read of the round."""
        return None

    @abstractmethod
    def _start(self, rnd: ReadRound, peer: int, open_peer: OpenPeer, idx: list[int]) -> PeerReadOp:
        """Start one operation reading ``rnd.reads[i]`` for every ``i`` in ``idx`` from
        ``peer``; a failure to start is reported by :meth:`_poll`."""

    @abstractmethod
    def _poll(self, op: PeerReadOp) -> tuple[bool, str | None]:
        """``(settled, why it failed or None)``; releases what a settled ``op`` held and
        sets ``staging_poisoned`` if a failed one may have written part of staging."""

    @abstractmethod
    def _abandon(self, rnd: ReadRound, op: PeerReadOp) -> str:
        """Stop waiting for ``op`` at the deadline (cancel it where the backend can, set
        ``staging_poisoned`` if it may still write); returns why its reads failed."""

    def _end(self, rnd: ReadRound) -> None:
        """Per-round teardown, after every operation settled or was abandoned."""

    def close_epoch(self) -> None:
        self._peers.clear()
        super().close_epoch()


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
