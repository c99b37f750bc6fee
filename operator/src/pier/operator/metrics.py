"""Prometheus metrics of the operator: its reconciles, the sessions and pods it keeps, its warm pools."""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core import tracing
from pier.core.poolmetrics import PoolMetrics

SESSION_PHASES = ("Pending", "Starting", "Ready", "Failed", "Terminating")
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
# A reconcile talks to the API server a few times: most take tens of milliseconds, a slow API seconds.
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.reconciles = Counter(
            "pier_operator_reconciles_total", "reconciles of MCPSessions, by outcome (ok, error)", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.reconcile_duration = Histogram(
            "pier_operator_reconcile_duration_seconds", "how long a reconcile of one MCPSession took",
            buckets=RECONCILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.sessions = Gauge(
            "pier_operator_sessions", "MCPSessions by phase (at the last resync)", ["phase"], registry=r
        )
        self.pods = Gauge(
            "pier_operator_pods", "the operator's pods (sessions' and pooled) by phase", ["phase"], registry=r
        )
        self.pool = PoolMetrics(r, "operator", "pod")
        for outcome in ("ok", "error"):
            self.reconciles.labels(outcome)
        r.register(tracing.span_metrics())

    def count_sessions(self, phases: Iterable[str | None]) -> None:
        """The sessions of the last listing, by phase (one without a status yet is Pending)."""
        self._count(self.sessions, SESSION_PHASES, (phase or "Pending" for phase in phases))

    def count_pods(self, phases: Iterable[str | None]) -> None:
        self._count(self.pods, POD_PHASES, (phase or "Unknown" for phase in phases))

    @staticmethod
    def _count(gauge: Gauge, known: tuple[str, ...], phases: Iterable[str]) -> None:
        counts = collections.Counter(phases)
        for phase in {*known, *counts}:
            gauge.labels(phase).set(counts.get(phase, 0))
