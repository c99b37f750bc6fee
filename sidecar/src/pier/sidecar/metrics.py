"""Prometheus metrics of one bridge (one set per app, so tests and in-process bridges can run several).

Counted by hand and written in the Prometheus text format (0.0.4): a bridge runs once per session,
and prometheus_client would cost each one its import (~1.6 MiB) and a lock and a label lookup on
every request, for metrics that are scraped, if ever, every few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from pier.core.defaults import LATENCY_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Value:
    """One counter or gauge sample."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Observations:
    """One histogram's buckets, sum and count."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, labelnames
        self._children: dict[tuple[str, ...], _Value | _Observations] = {}

    def _header(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> None:
        # Written as `name_total`, as prometheus_client writes counters (names here are without it).
        super().__init__(name + "_total", help_text, labelnames)
        if not labelnames:
            self.labels()  # an unlabelled counter is shown from the start, at 0

    def labels(self, *values: str) -> _Value:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Value()
        assert isinstance(child, _Value)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def lines(self) -> Iterator[str]:
        yield from self._header()
        for values, child in self._children.items():
            assert isinstance(child, _Value)
            yield f"{self.name}{_labels(self.labelnames, values)} {_number(child.value)}"


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._value = _Value()
        self.inc, self.dec, self.set = self._value.inc, self._value.dec, self._value.set

    def lines(self) -> Iterator[str]:
        yield from self._header()
        yield f"{self.name} {_number(self._value.value)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = (*buckets, math.inf)

    def labels(self, *values: str) -> _Observations:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Observations(self.buckets)
        assert isinstance(child, _Observations)
        return child

    def lines(self) -> Iterator[str]:
        yield from self._header()
        for values, child in self._children.items():
            assert isinstance(child, _Observations)
            cumulative = 0
            for bound, count in zip(self.buckets, child.counts, strict=True):
                cumulative += count
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, values, le)} {_number(cumulative)}"
            yield f"{self.name}_count{_labels(self.labelnames, values)} {_number(child.count)}"
            yield f"{self.name}_sum{_labels(self.labelnames, values)} {_number(child.sum)}"


class BridgeMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pier_bridge_requests", "MCP requests received, by method and outcome", ("method", "outcome")
        )
        self.call_duration = Histogram(
            "pier_bridge_call_duration_seconds", "tools/call latency through the bridge", ("tool",), LATENCY_BUCKETS
        )
        self.in_flight = Gauge("pier_bridge_requests_in_flight", "requests waiting for the server")
        self.clients = Gauge("pier_bridge_clients", "MCP client sessions")
        self.server_up = Gauge("pier_bridge_server_up", "1 when the server is initialized and ready")
        self.restarts = Counter("pier_bridge_server_restarts", "server exits followed by a restart")
        self.invalid_lines = Counter("pier_bridge_invalid_lines", "lines on the server's stdout that were not JSON-RPC")
        self.oversized = Counter("pier_bridge_oversized_messages", "server messages refused for their size")
        self.rejected = Counter(
            "pier_bridge_rejected", "requests refused before reaching the server, by code", ("code",)
        )
        self._all: list[Counter | Gauge | Histogram] = [
            self.requests, self.call_duration, self.in_flight, self.clients, self.server_up, self.restarts,
            self.invalid_lines, self.oversized, self.rejected,
        ]  # fmt: skip

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return ("\n".join(line for metric in self._all for line in metric.lines()) + "\n").encode()
