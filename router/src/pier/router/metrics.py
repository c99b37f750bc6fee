"""Prometheus metrics of the router (one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core.defaults import LATENCY_BUCKETS
from pier.core.poolmetrics import PoolMetrics


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pier_router_requests_total",
            "HTTP requests, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.call_duration = Histogram(
            "pier_router_call_duration_seconds",
            "tool call latency through the router (until answer or hand-off)",
            ["profile", "tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.calls = Counter(
            "pier_router_calls_total",
            "tool calls, by profile and outcome",
            ["profile", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "pier_router_call_retries_total",
            "calls retried after a transport failure",
            ["profile"],
            registry=r,
        )
        self.handoffs = Counter("pier_router_handoffs_total", "calls handed to the job pool", ["profile"], registry=r)
        # Gauges say how to add up several router processes (PIER_PROCESSES: Prometheus' multiprocess mode).
        self.sessions_active = Gauge(
            "pier_router_sessions_active", "live sessions", ["profile"], registry=r, multiprocess_mode="livesum"
        )
        self.sessions_started = Counter(
            "pier_router_sessions_started_total", "sessions started", ["profile"], registry=r
        )
        self.sessions_failed = Counter(
            "pier_router_sessions_failed_total", "sessions that failed to start", ["profile"], registry=r
        )
        self.sessions_reaped = Counter(
            "pier_router_sessions_reaped_total",
            "sessions ended, by reason",
            ["profile", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "pier_router_rate_limited_total", "requests refused by the rate limit", ["key_class"], registry=r
        )
        self.queue_depth = Gauge(
            "pier_jobs_queue_depth", "entries on the job stream", registry=r, multiprocess_mode="livemax"
        )
        self.redis_errors = Counter(
            "pier_router_redis_errors_total", "Redis operations that failed", ["op"], registry=r
        )
        self.pool = PoolMetrics(r, "router", "session")
        self.handovers = Counter(
            "pier_router_handovers_total",
            "connections handed to the router process of their user (PIER_PROCESSES), by outcome",
            ["outcome"],
            registry=r,
        )
