"""Latency samples and their summaries (percentiles by nearest rank: no interpolation surprises)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (p in 0..100); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Run:
    """One load run: a target, a client kind, a concurrency, and every call's latency."""

    target: str
    client: str  # "lean" | "sdk"
    concurrency: int = 1
    users: str = "one"  # "one": callers share a session; "many": one session each
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str | None = None
    cpu_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # per call, by process role

    @property
    def calls(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        values = sorted(self.latencies_ms)
        return {
            "target": self.target,
            "client": self.client,
            "concurrency": self.concurrency,
            "users": self.users,
            "seconds": round(self.seconds, 3),
            "calls": self.calls,
            "errors": self.errors,
            "last_error": self.last_error,
            "calls_per_s": round(self.throughput, 1),
            "mean_ms": round(sum(values) / len(values), 4) if values else math.nan,
            "p50_ms": round(percentile(values, 50), 4),
            "p90_ms": round(percentile(values, 90), 4),
            "p99_ms": round(percentile(values, 99), 4),
            "max_ms": round(values[-1], 4) if values else math.nan,
            "cpu_ms_per_call": self.cpu_ms,
        }


def describe(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of a small sample (cold starts, hand-offs)."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": round(percentile(ordered, 50), 2),
        "min": round(ordered[0], 2) if ordered else math.nan,
        "max": round(ordered[-1], 2) if ordered else math.nan,
    }
