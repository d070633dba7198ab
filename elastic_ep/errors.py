"""The one exception hierarchy of elastic-ep.

Callers catch by type, never by message text. Every message names the offending
thing (layer, rank, file, tensor, key) and, where there is one, the fix.

    ElasticEPError
    ├── ConfigError            bad arguments or configuration
    ├── PlacementError         a placement breaks an invariant
    ├── RankMappingError       an invalid old_rank -> new_rank mapping
    ├── PlanError              a transfer plan that is malformed or cannot be built
    │   └── StaleEpochError    a plan or ack from an epoch older than the one seen
    ├── CheckpointError        safetensors files: missing, corrupt, wrong shape or dtype
    │   ├── MissingFileError       a checkpoint directory, index or shard not there
    │   ├── MissingTensorError     a tensor name the index or shard header lacks
    │   ├── TensorMismatchError    a tensor whose shape or dtype differs from the layout
    │   └── CorruptCheckpointError a header or data region that cannot be right
    ├── TransportError         a peer transfer failed or timed out
    ├── AgentStateError        a rank agent transition its table does not allow
    └── EtcdError              the control plane's store
        ├── EtcdUnavailableError   etcd cannot be reached (or lost quorum)
        ├── RecordTooLargeError    a request or reply over etcd's or gRPC's size limit
        ├── MalformedValueError    a value under the prefix that cannot be parsed
        ├── DuplicateRankError     a rank id held by another live process
        └── FencedWriteError       a controller's fenced write refused
            ├── NotLeaderError         leadership was lost: step down
            └── EpochMovedError        still the leader, the epoch moved: read again
"""

from __future__ import annotations


class ElasticEPError(Exception):
    """Base of every error raised by elastic-ep."""


class ConfigError(ElasticEPError, ValueError):
    """Arguments or configuration that cannot work (sizes, names, ranges)."""


class PlacementError(ElasticEPError, ValueError):
    """A placement that breaks an invariant; the message names the layer."""


class RankMappingError(ElasticEPError, ValueError):
    """A rank mapping that is not dense, not ordered or out of range."""


class PlanError(ElasticEPError, ValueError):
    """A transfer plan that is malformed, inconsistent or of an unknown schema."""


class StaleEpochError(PlanError):
    """A plan or message from an epoch older than the newest one seen."""

    def __init__(self, what: str, epoch: int, newest: int) -> None:
        super().__init__(
            f"{what} carries epoch {epoch}, not newer than the newest seen epoch {newest}; "
            "it is refused (epochs only increase)"
        )
        self.epoch = epoch
        self.newest = newest


class CheckpointError(ElasticEPError):
    """A safetensors checkpoint that is missing, corrupt or does not match."""


class TransportError(ElasticEPError):
    """A peer transfer that failed, or a peer that did not answer in time."""


class MissingFileError(CheckpointError):
    """A checkpoint directory, index file or shard that is not there."""


class MissingTensorError(CheckpointError):
    """A tensor name that the checkpoint's index or a shard's header does not hold."""


class TensorMismatchError(CheckpointError):
    """A checkpoint tensor whose shape or dtype differs from what the serving layout
    expects; nothing is converted, so the two must agree exactly."""


class UnsupportedModelError(CheckpointError):
    """A model directory whose architecture elastic-ep does not know, given without a
    naming template that would say where its experts are."""


class CorruptCheckpointError(CheckpointError):
    """A file whose header or data region cannot be right: a header length beyond the
    file, invalid JSON, data offsets outside the file or not matching dtype x shape, a
    short read."""


class EtcdError(ElasticEPError):
    """The control plane's etcd: unreachable, refusing, or holding bad data."""


class EtcdUnavailableError(EtcdError):
    """etcd cannot be reached, timed out, or has no quorum; callers wait it out."""


class RecordTooLargeError(EtcdError):
    """A write or read refused for its size: etcd's ``--max-request-bytes`` (1.5 MiB by
    default), gRPC's message limit on the server (2 MiB beyond that) or this client's
    receive limit. Retrying cannot help; the record must shrink or the limit rise.

    ``what``: the operation's description; ``key``: the first key involved ("" if
    unknown); ``operation``: the client call (``put``, ``transaction``, ``get``...);
    ``direction``: ``"request"`` or ``"response"``; ``size`` / ``limit``: bytes, 0 when
    unknown. Example: ``RecordTooLargeError("publish plan", "/ep/plan", "transaction",
    "request", 1_700_000, 1_572_864)``.
    """

    def __init__(self, what: str, key: str, operation: str, direction: str, size: int, limit: int) -> None:
        fix = ("raise the client's receive limit (EtcdConfig.max_receive_bytes) or read fewer keys at once"
               if direction == "response" else
               "raise etcd's --max-request-bytes (and the clients' send limit) or write smaller records")
        over = (f"{limit} bytes" if limit else "etcd's --max-request-bytes (1.5 MiB by default)"
                if direction == "request" else "this client's receive limit")
        super().__init__(
            f"{what}: {direction} of {operation}" + (f" on {key!r}" if key else "")
            + f" is {size or 'an unknown number of'} bytes, over {over}; retrying cannot help: {fix}"
        )
        self.what, self.key, self.operation, self.direction = what, key, operation, direction
        self.size, self.limit = size, limit


class MalformedValueError(EtcdError, ValueError):
    """A value under the deployment's prefix that is not what its key says it holds.

    ``key``: the etcd key; ``revision``: the value's mod revision (0 when unknown), so
    that a reader reports each bad value once and a new bad value again."""

    def __init__(self, message: str, key: str = "", revision: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.revision = revision


class FencedWriteError(EtcdError):
    """A controller's fenced write refused: the leader key or the epoch key is not what
    the controller read."""


class NotLeaderError(FencedWriteError):
    """A fenced write refused because this controller no longer holds the leader key:
    it steps down."""


class EpochMovedError(FencedWriteError):
    """A fenced write refused while this controller still leads: the epoch key changed
    since it was read (another write landed first); read the deployment again."""


class AgentStateError(ElasticEPError, RuntimeError):
    """A transition the agent's table does not allow (``drain()`` before registering,
    a second ``drain()``, anything after leaving)."""


class DuplicateRankError(EtcdError):
    """A registration refused: the rank's key is held by another live process (the same
    id started twice); the message names its pid, host and incarnation."""
