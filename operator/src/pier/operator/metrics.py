"""The operator's Prometheus metrics (`/metrics` on `PIER_METRICS_PORT`): its API requests, caches, passes and
reconciles, the sessions and pods it keeps, its warm pools, its spans."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core import tracing
from pier.core.poolmetrics import PoolMetrics

SESSION_PHASES = ("Pending", "Starting", "Ready", "Failed", "Terminating")
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
# A reconcile from the caches: most take milliseconds; one that writes to a slow API server, seconds.
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.pools = PoolMetrics(r, "operator", "pod")
        self.api_requests = Counter(
            "pier_operator_api_requests", "requests to the Kubernetes API, by verb and HTTP status (0: no answer)",
            ["verb", "code"], registry=r,
        )  # fmt: skip
        self.sessions = Gauge("pier_operator_sessions", "MCPSessions in the cache, by phase", ["phase"], registry=r)
        self.cached = Gauge(
            "pier_operator_cached_objects", "objects in the caches, by resource", ["resource"], registry=r
        )
        self.relists = Gauge("pier_operator_relists", "lists taken (watches started afresh), by resource",
                             ["resource"], registry=r)  # fmt: skip
        self.pass_seconds = Histogram(
            "pier_operator_pass_seconds", "one periodic pass over every cached session", buckets=_PASS_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.pass_queued = Counter(
            "pier_operator_pass_queued", "sessions the periodic pass found something to do for", registry=r
        )
        self.reconciles = Counter(
            "pier_operator_reconciles", "reconciles of one session, by outcome (ok, error)", ["outcome"], registry=r
        )
        self.reconcile_duration = Histogram(
            "pier_operator_reconcile_duration_seconds", "how long a reconcile of one MCPSession took",
            buckets=_RECONCILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.pods = Gauge(
            "pier_operator_pods", "the operator's pods (sessions' and pooled) in the cache, by phase", ["phase"],
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("pier_operator_queue_depth", "sessions waiting for a worker", registry=r)
        self.bridge_asks = Counter(
            "pier_operator_bridge_status_requests", "bridges asked for their status, by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.replaced = Counter(
            "pier_operator_pods_deleted", "session pods deleted, by reason (Replaced, PodFailed, NodeLost, Duplicate)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.reaped = Counter("pier_operator_sessions_reaped", "idle sessions deleted after their TTL", registry=r)
        self.leading = Gauge("pier_operator_leading", "1 while this replica holds the Lease and works", registry=r)
        for outcome in ("ok", "error"):
            self.reconciles.labels(outcome)
        r.register(tracing.span_metrics())
