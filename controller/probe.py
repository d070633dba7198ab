"""The controller's own look at a suspected rank: one connection to the liveness
endpoint the rank published (:mod:`elastic_ep.runtime.liveness` serves it), and one
heartbeat byte within a deadline.

A crashed process refuses the connection (or resets it) at once; a stopped or hung one
is accepted by its kernel but sends nothing; a live one sends a byte as soon as it
accepts. Example: ``probe("127.0.0.1:1", 0.2) -> (False, "closed: ConnectionRefusedError
connecting to 127.0.0.1:1")``.
"""

from __future__ import annotations

import socket
import time

from elastic_ep.errors import ConfigError


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``: ``"127.0.0.1:80"`` -> ``("127.0.0.1", 80)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"liveness address {address!r} is not 'host:port' with a port in 1..65535")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = 0.2) -> tuple[bool, str]:
    """``(True, "")`` when a heartbeat byte arrives from ``address`` within ``timeout_s``;
    else ``(False, why)``, ``why`` starting with the kind: ``"closed: ..."`` (refused,
    reset, end of stream, or an address that is not one) or ``"silent: ..."`` (no byte
    in time: a stopped process's kernel still completes the handshake)."""
    try:
        host, port = parse_address(address)
    except ConfigError as e:
        return False, f"closed: {e}"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            if s.recv(1):
                return True, ""
            return False, f"closed: EOF from {address}"
    except socket.timeout:
        return False, f"silent: no heartbeat from {address} within {timeout_s} s"
    except OSError as e:
        return False, f"closed: {e.__class__.__name__} connecting to {address}"
