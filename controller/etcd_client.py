"""Connecting to etcd, and the one place its client's errors become ours.

The client is the ``etcd3`` API from the ``etcd3-fc`` distribution: python-etcd3's
code with protobuf stubs regenerated so that it imports with current protobuf and
grpcio (the ``etcd3`` 0.12.0 release on PyPI fails with "Descriptors cannot be created
directly" unless protobuf runs in slow pure-Python mode). Everything here goes through
this module, so replacing the distribution touches one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import grpc

from elastic_ep.errors import ConfigError, EtcdUnavailableError, RecordTooLargeError

T = TypeVar("T")


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to authenticate.

    Example: ``EtcdConfig("127.0.0.1:2379", ca="ca.pem", cert="rank.pem", key="rank-key.pem",
    user="rank-3", password=os.environ["ELASTIC_EP_ETCD_PASSWORD"])``. Passwords come from the
    environment or a file, never from the command line or the repo.
    """

    endpoint: str = "127.0.0.1:2379"
    prefix: str = "/elastic-ep"
    deployment: str = "default"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 5.0
    max_send_bytes: int = 64 << 20
    max_receive_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"etcd endpoint {self.endpoint!r} must be host:port")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("etcd client TLS needs both cert and key (or neither)")
        if (self.cert is not None) and self.ca is None:
            raise ConfigError("etcd client TLS needs the CA certificate (ca=) to check the server")
        if (self.user is None) != (self.password is None):
            raise ConfigError("etcd auth needs both user and password (or neither)")
        if min(self.max_send_bytes, self.max_receive_bytes) < 1024:
            raise ConfigError(f"gRPC message limits must be at least 1 KiB, not {self.max_send_bytes}/{self.max_receive_bytes}")
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or "/" in self.deployment:
            raise ConfigError(f"prefix {self.prefix!r} must start and not end with '/', deployment {self.deployment!r} has no '/'")

    @property
    def root(self) -> str:
        """``/<prefix>/<deployment>``: every key of the deployment lives below."""
        return f"{self.prefix}/{self.deployment}"


def grpc_options(cfg: EtcdConfig) -> list[tuple[str, int]]:
    """The channel's message limits, both set on purpose rather than left to gRPC.

    Receive: gRPC refuses replies over 4 MiB by default; one read of a deployment holds
    every rank's key (each value bounded by :data:`controller.records.MAX_BYTES`), so a
    few large values must not make every read fail. Send: etcd itself refuses requests
    over its ``--max-request-bytes`` (1.5 MiB by default) with a clear error, so the
    client's limit only stops a runaway request before it crosses the network; it sits
    far above etcd's so that raising etcd's limit needs no client change.
    Example: ``grpc_options(EtcdConfig())`` ->
    ``[("grpc.max_send_message_length", 67108864), ("grpc.max_receive_message_length", 268435456)]``.
    """
    return [("grpc.max_send_message_length", cfg.max_send_bytes),
            ("grpc.max_receive_message_length", cfg.max_receive_bytes)]


def connect(cfg: EtcdConfig) -> Any:
    """An ``etcd3`` client; :class:`EtcdUnavailableError` if etcd does not answer,
    ``PermissionError`` if it refuses the credentials."""
    import etcd3

    host, _, port = cfg.endpoint.rpartition(":")
    what = f"etcd at {cfg.endpoint}" + (f" as {cfg.user!r}" if cfg.user else "")
    # With user/password the constructor authenticates, so it can fail like a call.
    client = call(
        etcd3.client, what, host=host, port=int(port), ca_cert=cfg.ca, cert_key=cfg.key,
        cert_cert=cfg.cert, timeout=cfg.timeout_s, user=cfg.user, password=cfg.password,
        grpc_options=grpc_options(cfg),
    )
    # The client marks its endpoint failed for 300 s after one UNAVAILABLE and refuses
    # every call meanwhile; gRPC reconnects by itself, so retry soon instead (an etcd
    # restart must cost seconds, not minutes).
    for ep in getattr(client, "endpoints", {}).values():
        ep.time_retry = 0.5
    call(client.status, what)
    return client


def _rpc_error(e: BaseException) -> Any:
    """The gRPC error behind ``e``: ``e`` itself, or the one the ``etcd3`` client was
    handling when it raised its own exception (which carries no message)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# How gRPC (BoringSSL) and etcd word TLS and auth failures; matched to name a likely cause.
_HINTS = (
    (("CERTIFICATE_VERIFY_FAILED",),
     "TLS: this client does not trust the server's certificate: wrong CA file (ca=)?"),
    (("Hostname Verification",),
     "TLS: the server's certificate does not name the endpoint's host (add it to the certificate's SAN)"),
    (("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA"),
     "TLS: the server refused this client: no client certificate (cert=, key=) "
     "or one not signed by the CA the server trusts (--trusted-ca-file)"),
    (("Handshake read failed", "WRONG_VERSION_NUMBER"),
     "TLS: the server did not answer the TLS handshake: it may serve plaintext (drop ca=) or be another service"),
    (("Socket closed",),
     "if etcd serves TLS, this client needs ca= (and cert=, key= when it requires client certificates)"),
    (("sufficient security level",),
     "user/password authentication needs TLS: set ca= (the client never sends a token in plaintext)"),
    (("invalid auth token",),
     "the auth token expired (idle longer than etcd's --auth-token-ttl) or was dropped "
     "(the user's password changed): connect again"),
)
# etcd's auth errors that arrive as INVALID_ARGUMENT rather than UNAUTHENTICATED.
_AUTH_DETAILS = ("authentication failed", "user name is empty", "invalid auth management")


def _hint(details: str) -> str:
    for needles, hint in _HINTS:
        if any(n in details for n in needles):
            return hint
    return ""


def _translate(e: BaseException, what: str) -> Exception:
    import etcd3.exceptions as ex

    if isinstance(e, ValueError) and "failed node" in str(e):
        return EtcdUnavailableError(f"{what}: unreachable (the endpoint failed moments ago; retrying shortly)")
    if not isinstance(e, (grpc.RpcError, ex.Etcd3Exception)):
        return e if isinstance(e, Exception) else RuntimeError(str(e))
    rpc = _rpc_error(e)
    code = rpc.code() if rpc is not None and hasattr(rpc, "code") else None
    details = (rpc.details() if rpc is not None and hasattr(rpc, "details") else None) or str(e) or type(e).__name__
    hint = _hint(details)
    if isinstance(e, (ex.ConnectionFailedError, ex.ConnectionTimeoutError)) or code in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return EtcdUnavailableError(f"{what}: unreachable ({details}); "
                                    + (hint or "is etcd running and the endpoint right?"))
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and any(d in details for d in _AUTH_DETAILS)
    ):
        return PermissionError(f"{what}: {code.name} ({details}); " + (hint or "check the user, password and role"))
    return EtcdUnavailableError(f"{what}: {code.name if code else type(e).__name__} ({details})")


# etcd's own refusal carries no sizes; gRPC's ("grpc: received message larger than max
# (2621497 vs. 2097152)" from the server, "Received message larger than max (N vs. M)"
# for a reply over this client's limit, "Sent message larger than max" over its send
# limit) carries both.
_ETCD_TOO_LARGE = "request is too large"
_GRPC_TOO_LARGE = re.compile(r"(Received|received|Sent|sent|send) message larger than max(?: \((\d+) vs\. (\d+)\))?")


def _request_bytes(args: Any) -> int:
    """Bytes of keys and values in a call's arguments (transaction operations included):
    the size of a refused request when the refusal does not say it."""
    if isinstance(args, (bytes, bytearray, str)):
        return len(args)
    if isinstance(args, (list, tuple)):
        return sum(_request_bytes(a) for a in args)
    if isinstance(args, dict):
        return sum(_request_bytes(a) for a in args.values())
    return sum(_request_bytes(getattr(args, f, None) or b"") for f in ("key", "value"))


def _first_key(args: Any) -> str:
    """The first key among a call's arguments (or its transaction's operations)."""
    for a in args:
        if isinstance(a, (bytes, str)):
            return a.decode(errors="replace") if isinstance(a, bytes) else a
        if isinstance(a, (list, tuple)) and (k := _first_key(a)):
            return k
        if isinstance(getattr(a, "key", None), (bytes, str)):
            return _first_key([a.key])
    return ""


def _too_large(e: BaseException, what: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> RecordTooLargeError | None:
    """:class:`RecordTooLargeError` when ``e`` is a size refusal by etcd or gRPC, else None."""
    rpc = _rpc_error(e)
    details = (rpc.details() if rpc is not None and hasattr(rpc, "details") else None) or ""
    match = _GRPC_TOO_LARGE.search(details)
    if _ETCD_TOO_LARGE not in details and match is None:
        return None
    direction = "response" if match is not None and match.group(1) == "Received" else "request"
    size, limit = (int(match.group(2)), int(match.group(3))) if match and match.group(2) else (0, 0)
    if direction == "request" and not size:
        size = _request_bytes([args, kwargs])
    key = _first_key(list(args) + [kwargs.get("success", [])])
    return RecordTooLargeError(what, key, getattr(fn, "__name__", "call"), direction, size, limit)


def call(fn: Callable[..., T], what: str, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with etcd and gRPC errors as :class:`EtcdUnavailableError`
    (or ``PermissionError`` for auth, :class:`RecordTooLargeError` for a request or reply
    over a size limit), naming ``what``. Example: ``call(client.put, "store set x", key,
    value)`` with a 1.6 MiB value raises ``RecordTooLargeError`` (size 1677722 bytes)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        t = _too_large(e, what, fn, args, kwargs) or _translate(e, what)
        if t is e:
            raise
        raise t from e


def read_ranges(client: Any, what: str, prefixes: list[str], keys: list[str]) -> list[list[tuple[bytes, Any]]]:
    """Every key under each of ``prefixes``, then each of ``keys``, read in one
    transaction (one revision): per range, its ``(value, metadata)`` pairs."""
    return read_ranges_since(client, what, prefixes, keys, {})


@dataclass(frozen=True)
class KeptMeta:
    """The metadata of a value a reader already holds, standing in for the value's own
    in a read that did not send it again (:func:`read_ranges_since`)."""

    key: bytes
    mod_revision: int
    create_revision: int = 0


Held = dict[str, "tuple[bytes, Any] | None"]
"""key -> the ``(value, metadata)`` a reader holds of it, None: it holds it as absent."""


def read_ranges_since(client: Any, what: str, prefixes: list[str], keys: list[str],
                      held: Held) -> list[list[tuple[bytes, Any]]]:
    """:func:`read_ranges`, except that the keys of ``held`` (some of ``keys``) come
    back only when one of their mod revisions moved: while none did (compared in the
    same transaction), they are returned as held. A reader that looks every pass at a
    few large values (a plan head, a commit) then moves them only when they change."""
    from etcd3.utils import prefix_range_end, to_bytes

    tx = client.transactions
    ranges = [tx.get(p, prefix_range_end(to_bytes(p))) for p in prefixes]
    same = [tx.mod(k) == (v[1].mod_revision if v is not None else 0) for k, v in held.items()]
    unchanged, responses = call(client.transaction, what, compare=same,
                                success=ranges + [tx.get(k) for k in keys if k not in held],
                                failure=ranges + [tx.get(k) for k in keys])
    got = [list(r) for r in responses]
    if not (held and unchanged):
        return got
    rest = iter(got[len(prefixes):])
    kept = {k: [v] if v is not None else [] for k, v in held.items()}
    return got[:len(prefixes)] + [kept[k] if k in kept else next(rest) for k in keys]


def delete_range(client: Any, what: str, start: str, end: str) -> None:
    """Delete every key in ``[start, end)`` in one request (the client has only
    ``delete_prefix``; a range lets the controller drop older epochs' keys and keep
    the newest)."""
    def delete() -> Any:
        request = client._build_delete_request(start, range_end=end.encode())
        return client.kvstub.DeleteRange(request, client.timeout, credentials=client.call_credentials,
                                         metadata=client.metadata)
    call(delete, what)
