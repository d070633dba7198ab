"""Peer transports: one interface (:class:`PeerTransport`) to fill staged expert slots
from other ranks' registered weights; backends ``torch`` (gloo/NCCL, two-sided),
``nixl`` and ``mooncake`` (one-sided READ), loaded by name with :func:`get_transport`."""

from loaders.transport.base import (
    OneSidedTransport,
    PeerRead,
    PeerSend,
    PeerSource,
    PeerTransport,
    Receive,
    ReceiveOutcome,
    Segment,
    TwoSidedTransport,
    WeightTable,
    get_transport,
    register_backend,
    wait_for_key,
)

__all__ = [
    "OneSidedTransport",
    "PeerRead",
    "PeerSend",
    "PeerSource",
    "PeerTransport",
    "Receive",
    "ReceiveOutcome",
    "Segment",
    "TwoSidedTransport",
    "WeightTable",
    "get_transport",
    "register_backend",
    "wait_for_key",
]
