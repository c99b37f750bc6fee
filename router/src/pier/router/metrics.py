"""Prometheus metrics of the router (one registry per app)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core.defaults import LATENCY_BUCKETS
from pier.core.poolmetrics import PoolMetrics

# What the router does with Redis, as `pier_router_redis_errors_total` labels them.
REDIS_OPS = ("request", "ratelimit", "handoff", "settle", "metrics")


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
        self.mcp_sessions_resumed = Counter(
            "pier_router_mcp_sessions_resumed_total",
            "MCP client sessions recreated on a bridge that did not know them (their server session had ended)",
            ["profile"],
            registry=r,
        )
        self.rate_limited = Counter(
            "pier_router_rate_limited_total", "requests refused by the rate limit", ["key_class"], registry=r
        )
        self.queue_depth = Gauge(
            "pier_jobs_queue_depth", "entries on the job stream", registry=r, multiprocess_mode="livemostrecent"
        )
        # Read from Redis when scraped, as is the depth above.
        self.queue_lag = Gauge(
            "pier_jobs_queue_lag",
            "jobs handed off that no worker has taken yet (the consumer group's lag)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.oldest_queued = Gauge(
            "pier_jobs_oldest_queued_age_seconds",
            "age of the oldest job no worker has taken yet (0: none)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.dead_letters = Gauge(
            "pier_webhooks_dead_letters",
            "webhook deliveries given up on (kept in Redis)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_up = Gauge(
            "pier_router_redis_up",
            "1 when Redis answered the router's last look (at a scrape)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.ready = Gauge(
            "pier_router_ready",
            "1 when the router is ready (what /readyz answers)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_errors = Counter(
            "pier_router_redis_errors_total", "Redis operations that failed", ["op"], registry=r
        )
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        self.pool = PoolMetrics(r, "router", "session")
        self.handovers = Counter(
            "pier_router_handovers_total",
            "connections handed to the router process of their user (PIER_PROCESSES), by outcome",
            ["outcome"],
            registry=r,
        )
        # Connected accounts (outcomes are a fixed set; profiles come from the catalog).
        self.oauth_connections = Counter(
            "pier_router_oauth_connections_total",
            "account connections completed or refused (connected, denied, refused, failed, bad_state)",
            ["profile", "outcome"],
            registry=r,
        )
        self.oauth_refreshes = Counter(
            "pier_router_oauth_refreshes_total",
            "upstream token refreshes (refreshed, refused, failed)",
            ["profile", "outcome"],
            registry=r,
        )
        self.oauth_revocations = Counter(
            "pier_router_oauth_revocations_total",
            "disconnections, by whether the provider revoked the tokens",
            ["profile", "outcome"],
            registry=r,
        )
        self.token_exchanges = Counter(
            "pier_router_token_exchanges_total",
            "token exchanges at the identity provider (exchanged, refused, failed)",
            ["profile", "outcome"],
            registry=r,
        )

    def known_profiles(self, names: Iterable[str]) -> None:
        """Series of every profile from the start, at 0: a ratio of starts that failed has a denominator
        before the first start, and a profile that never started at all still shows."""
        for name in names:
            for counter in (self.sessions_started, self.sessions_failed, self.retries, self.handoffs):
                counter.labels(name)
