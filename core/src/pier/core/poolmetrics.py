"""The warm-pool metrics, one set for both backends: `pier_<component>_pool_*` by profile."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core.defaults import LATENCY_BUCKETS


class PoolMetrics:
    """Size, ready, claims, misses and refill time of the warm pools of one component.

    `component`: `router` (local sessions) or `operator` (pods); `what`: what the pool holds, for the help texts.
    """

    def __init__(self, registry: CollectorRegistry, component: str, what: str) -> None:
        name = f"pier_{component}_pool"
        self.registry = r = registry
        # (several router processes: each keeps its share of the pool; they add up)
        self.size = Gauge(
            f"{name}_size", "warm pool size, by profile", ["profile"], registry=r, multiprocess_mode="livesum"
        )
        self.ready = Gauge(
            f"{name}_ready", f"pooled {what} ready to be claimed, by profile", ["profile"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.claims = Counter(
            f"{name}_claims", f"new users' sessions bound to a pooled {what}", ["profile"], registry=r
        )
        self.misses = Counter(
            f"{name}_misses", f"new users' sessions of a pooled profile that found no ready {what}", ["profile"],
            registry=r,
        )  # fmt: skip
        self.refill_seconds = Histogram(
            f"{name}_refill_seconds", f"time to start a pooled {what}", ["profile"], buckets=LATENCY_BUCKETS, registry=r
        )

    def pooled(self, profile: str, size: int) -> None:
        """A pooled profile's series from the start (claims and misses at 0), and its size."""
        self.size.labels(profile).set(size)
        self.claims.labels(profile)
        self.misses.labels(profile)
