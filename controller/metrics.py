"""Prometheus metrics of the controller and its health endpoint.

Served on ``127.0.0.1`` unless configured otherwise: ``/metrics`` (Prometheus text) and
``/healthz`` (200 while the controller loop has run within the last few seconds).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PHASES = ("detect", "plan", "transfer", "commit")


class ControllerMetrics:
    """One registry per controller (several can live in one process, as in tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.members_by_state = Gauge("elastic_ep_members", "Registered ranks by state", ["state"], registry=r)
        self.epoch = Gauge("elastic_ep_epoch", "Newest published epoch", registry=r)
        self.leader = Gauge("elastic_ep_is_leader", "1 while this controller leads", registry=r)
        self.phase = Histogram("elastic_ep_rebalance_phase_seconds", "Rebalance duration by phase", ["phase"],
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.bytes = Counter("elastic_ep_transfer_bytes", "Bytes moved by route", ["route"], registry=r)
        self.failures = Counter("elastic_ep_rank_failures", "Ranks found dead", registry=r)
        self.fenced = Counter("elastic_ep_fenced_writes", "Writes refused because leadership or epoch moved", registry=r)
        self.malformed = Counter("elastic_ep_malformed_values",
                                 "Malformed values found under the prefix (each key and mod revision once)", registry=r)
        self.malformed_now = Gauge("elastic_ep_malformed_values_now", "Values left out of the last read", registry=r)
        self.revoked = Counter("elastic_ep_revoked_leases",
                               "Rank leases revoked because their acks were overdue (the controller's fence)", registry=r)
        self.confirmed = Counter("elastic_ep_confirmed_deaths", "Suspected ranks confirmed dead and fenced",
                                 ["how"], registry=r)
        self.pass_errors = Counter("elastic_ep_reconcile_errors", "Reconcile passes that failed and were retried",
                                   registry=r)
        self.etcd_errors = Counter("elastic_ep_etcd_unavailable", "Times etcd could not be reached", registry=r)
        self.too_large = Counter("elastic_ep_record_too_large",
                                 "Requests or replies refused for their size, by etcd client call", ["operation"],
                                 registry=r)
        self._too_large_seen: set[tuple[str, int]] = set()
        self.mirror_bytes = Gauge("elastic_ep_mirror_bytes", "Host memory of each rank's expert mirror", ["rank"],
                                  registry=r)
        self.mirror_rows = Gauge("elastic_ep_mirror_rows", "Mirror rows the committed assignment gives, by state",
                                 ["state"], registry=r)
        self.worst_loss = Gauge("elastic_ep_worst_domain_loss_experts",
                                "Experts the worst single node (or rank) loss would read from disk", registry=r)
        self.worst_loss_bytes = Gauge("elastic_ep_worst_domain_loss_bytes",
                                      "Bytes the worst single node (or rank) loss would read from disk", registry=r)
        self.heartbeat = time.monotonic()

    def beat(self) -> None:
        """The control loop made progress against etcd (``/healthz`` reads this)."""
        self.heartbeat = time.monotonic()

    def record_too_large(self, operation: str, what: str, size: int) -> bool:
        """Count one size refusal; True the first time this ``(what, size)`` is seen, so
        that a loop retrying on its resync logs each oversized record once. Example:
        ``m.record_too_large("transaction", "publish plan", 1700000)`` -> True, then False."""
        self.too_large.labels(operation=operation).inc()
        first = (what, size) not in self._too_large_seen
        self._too_large_seen.add((what, size))
        return first

    def members(self, ranks: Iterable[Any]) -> None:
        counts = {"joining": 0, "active": 0, "draining": 0}
        for rank in ranks:
            counts[rank.state] = counts.get(rank.state, 0) + 1
        for state, n in counts.items():
            self.members_by_state.labels(state=state).set(n)
        self.beat()

    def coverage(self, cov: Any, expert_bytes: int) -> None:
        """Mirror memory per rank and the worst single-domain loss
        (:class:`controller.coverage.Coverage`)."""
        self.mirror_bytes.clear()
        for r in cov.ranks:
            self.mirror_bytes.labels(rank=r.id).set(r.rows * expert_bytes)
        self.mirror_rows.labels(state="ready").set(cov.ready)
        self.mirror_rows.labels(state="pending").set(cov.pending)
        self.worst_loss.set(cov.worst_experts)
        self.worst_loss_bytes.set(cov.worst_experts * expert_bytes)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def serve(metrics: ControllerMetrics, host: str = "127.0.0.1", port: int = 0, stale_s: float = 10.0) -> ThreadingHTTPServer:
    """Start the HTTP endpoint in a daemon thread; ``server.server_port`` is the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/metrics":
                body, ctype, code = metrics.text(), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                ok = time.monotonic() - metrics.heartbeat < stale_s
                body, ctype, code = (b"ok\n" if ok else b"stale\n"), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="elastic-ep-metrics", daemon=True).start()
    return server
