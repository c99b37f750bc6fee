"""Prometheus metrics of one bridge (a registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pier_bridge_requests_total",
            "MCP requests received, by method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.call_duration = Histogram(
            "pier_bridge_call_duration_seconds",
            "tools/call latency through the bridge",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("pier_bridge_requests_in_flight", "requests waiting for the server", registry=r)
        self.clients = Gauge("pier_bridge_clients", "MCP client sessions", registry=r)
        self.server_up = Gauge("pier_bridge_server_up", "1 when the server is initialized and ready", registry=r)
        self.restarts = Counter("pier_bridge_server_restarts_total", "server exits followed by a restart", registry=r)
        self.invalid_lines = Counter(
            "pier_bridge_invalid_lines_total",
            "lines on the server's stdout that were not JSON-RPC",
            registry=r,
        )
        self.oversized = Counter(
            "pier_bridge_oversized_messages_total", "server messages refused for their size", registry=r
        )
        self.rejected = Counter(
            "pier_bridge_rejected_total",
            "requests refused before reaching the server, by code",
            ["code"],
            registry=r,
        )
