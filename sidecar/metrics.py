"""Prometheus metrics (DESIGN "Operations"), one registry per app, no per-path or per-IP labels.

Label children for every known label value are created up front: the hot path then does a
dict lookup and an increment, and dashboards see every series at 0 from the start instead
of series that appear only after the first event.
"""

from __future__ import annotations

import logging
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar import __version__
from sidecar.decision import Decision
from sidecar.store.db import StoreObserver

log = logging.getLogger("sidecar.store")

# Request latency through the sidecar: from sub-millisecond (blocked, cached) to long
# downloads.
_REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: connect: refused or unreachable (502); timeout: upstream.connect_timeout or read_timeout
#: (504); protocol: a broken answer (502); pool: no free upstream connection within
#: upstream.pool_timeout (503); websockets: upstream.max_websockets or
#: max_websockets_per_client reached (503); per_client: upstream.max_requests_per_client
#: reached (503).
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol", "pool", "websockets", "per_client")
CONNECTION_REFUSALS = ("total", "per_address", "header_timeout", "body_timeout", "send_timeout")
#: The store's parts, as ``sidecar_store_errors_total{operation}`` names them.
STORE_OPERATIONS = ("store", "users", "mfa", "lockout", "settings", "audit")


class Metrics:
    """Every metric the sidecar exports, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_total = Counter(
            "sidecar_requests_total",
            "Requests by the decision that answered them",
            ["decision"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request to the end of the response, including streaming",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds",
            "Time until the upstream's response headers arrived",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_errors_total = Counter(
            "sidecar_upstream_errors_total",
            "Upstream failures by kind (connect, timeout, protocol), and requests refused for "
            "want of upstream capacity (pool, websockets, per_client)",
            ["kind"],
            registry=r,
        )
        self.ip_rules = Gauge(
            "sidecar_ip_rules",
            "Rules in the live IP lists",
            ["list"],
            registry=r,
            multiprocess_mode="max",
        )
        self.config_reloads_total = Counter(
            "sidecar_config_reloads_total",
            "Configuration reloads by result",
            ["result"],
            registry=r,
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "Build information (always 1)",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.connections_refused_total = Counter(
            "sidecar_connections_refused_total",
            "Connections the public listener refused or closed: over listen.max_connections "
            "(total), over listen.max_connections_per_address (per_address), no complete "
            "request head within listen.header_timeout (header_timeout), no request body "
            "bytes within listen.body_timeout (body_timeout), nothing sent taken by the "
            "client within listen.send_timeout (send_timeout)",
            ["reason"],
            registry=r,
        )
        self.open_connections = Gauge(
            "sidecar_open_connections",
            "Connections open on the public listener",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_up = Gauge(
            "sidecar_store_up",
            "1 while the store (storage.url) answers; 0 while it cannot be reached (requests "
            "that need it are refused with 503 and retried at most once per backoff)",
            registry=r,
            multiprocess_mode="min",
        )
        self.store_errors_total = Counter(
            "sidecar_store_errors_total",
            "Store transactions that failed, by the part of the store (operation) and kind: "
            "unreachable, error (the database answered with one), circuit_open (failed fast)",
            ["operation", "kind"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "sidecar_upstream_up",
            "1 while the console (upstream.url) accepts connections; 0 while it cannot be reached",
            registry=r,
            multiprocess_mode="min",
        )
        self.store_up.set(1)
        self.upstream_up.set(1)
        for operation in STORE_OPERATIONS:
            for kind in ("unreachable", "error", "circuit_open"):
                self.store_errors_total.labels(operation, kind)
        self._by_refusal = {
            reason: self.connections_refused_total.labels(reason) for reason in CONNECTION_REFUSALS
        }
        self._by_decision = {d: self.requests_total.labels(d.value) for d in Decision}
        self._by_error = {k: self.upstream_errors_total.labels(k) for k in UPSTREAM_ERROR_KINDS}
        for name in ("allowlist", "denylist"):
            self.ip_rules.labels(name).set(0)
        for result in ("success", "failure"):
            self.config_reloads_total.labels(result)

    def request_done(self, decision: Decision, seconds: float) -> None:
        self._by_decision[decision].inc()
        self.request_duration.observe(seconds)

    def upstream_errors(self, kind: str) -> None:
        self._by_error[kind].inc()

    def connection_opened(self) -> None:
        self.open_connections.inc()

    def connection_closed(self) -> None:
        self.open_connections.dec()

    def connection_refused(self, reason: str) -> None:
        self._by_refusal[reason].inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for the admin listener."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StoreMetrics(StoreObserver):
    """The store's reports (``sidecar.store.db.StoreObserver``) as metrics and log lines."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def store_up(self, up: bool) -> None:
        self._metrics.store_up.set(1 if up else 0)
        if up:
            log.warning("store reachable again")
        else:
            log.error("store unreachable: requests that need it are refused until it answers")

    def store_error(self, operation: str, kind: str) -> None:
        part = operation.partition(".")[0]
        self._metrics.store_errors_total.labels(
            part if part in STORE_OPERATIONS else "store", kind
        ).inc()
