"""Spans through the OpenTelemetry SDK to a real OTLP/HTTP collector (tests/hooks.py); a collector that
hangs, refuses or is not there loses spans — counted — and never holds the code that records them."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest

from pier.cli.redis_server import free_port
from pier.core import tracing
from pier.core.errors import PierError
from pier.core.logs import JsonFormatter
from tests.hooks import Collector
from tests.servers import wait_until

CALLER = tracing.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1, "rojo=1")


@pytest.fixture
def traced(monkeypatch):
    """Tracing on, towards the endpoint the test sets; off again afterwards (whatever the test did)."""

    def start(endpoint: str, **settings: str) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        assert tracing.start("pier-test")

    yield start
    while tracing.enabled():
        tracing.stop(timeout_s=1)


def _imported_after(program: str) -> list[str]:
    """The tracing machinery `program` (run in a fresh interpreter, no OTEL_* variable) imported."""
    program += "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith(HEAVY))))"
    heavy = "HEAVY = ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'opentelemetry.proto', 'google', 'requests')"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", f"{heavy}\n{program}"], capture_output=True, text=True, check=True, env=env
    )
    imported: list[str] = json.loads(out.stdout)
    return imported


USE = f"tracing.start('x')\nwith tracing.span('s', parent=tracing.parse('{CALLER.traceparent}')): tracing.headers()"


def test_off_means_the_tracing_sdk_and_exporter_are_not_even_imported():
    assert _imported_after(f"from pier.core import tracing\nimport pier.router.app, pier.jobs.worker\n{USE}") == []
    # The bridge does without OpenTelemetry altogether (the router and workers import redis-py, which loads
    # OpenTelemetry's metrics API by itself when the SDK is installed).
    program = f"import sys\nfrom pier.core import tracing\nimport pier.sidecar.app\n{USE}\n"
    program += (
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'the bridge imported OpenTelemetry'"
    )
    assert _imported_after(program) == []


async def test_spans_reach_the_collector_under_the_callers_context_with_pier_error_codes(traced):
    async with Collector() as collector:
        traced(collector.endpoint, OTEL_SERVICE_NAME="pier-named", OTEL_RESOURCE_ATTRIBUTES="deployment.environment=t")
        with tracing.span("outer", "server", {"pier.user": "alice"}, parent=CALLER) as outer:
            mine = outer.context()
            assert mine is not None
            assert tracing.current() == tracing.TraceContext(CALLER.trace_id, mine.span_id, 1, "rojo=1")
            assert tracing.headers()["tracestate"] == "rojo=1"  # the caller's vendors' state goes on
            with pytest.raises(PierError), tracing.span("inner"):
                raise PierError("SESSION_LOST", "the bridge went away")
            later = tracing.begin("outlives", links=[CALLER])
            record = logging.LogRecord("pier.test", logging.INFO, __file__, 1, "handled", None, None)
            logged = json.loads(JsonFormatter().format(record))
            assert (logged["trace_id"], logged["span_id"]) == (CALLER.trace_id, mine.span_id)  # the span's own
        later.end()
        assert outer.context() is not None
        assert await asyncio.to_thread(tracing.flush)
    spans = {s.name: s for s in collector.spans}
    assert spans.keys() == {"outer", "inner", "outlives"}
    assert {s.trace_id for s in spans.values()} == {CALLER.trace_id}
    assert spans["outer"].parent_id == CALLER.span_id
    assert spans["outer"].kind == "server"
    assert spans["outer"].service == "pier-named"  # OTEL_SERVICE_NAME wins over the component's name
    assert spans["inner"].parent_id == spans["outer"].span_id
    assert (spans["inner"].status, spans["inner"].error_type) == ("error", "SESSION_LOST")
    assert spans["outlives"].links == [(CALLER.trace_id, CALLER.span_id)]
    assert tracing.span_counts()["exported"] >= 3


async def test_a_hanging_collector_loses_spans_counted_and_never_holds_the_caller(traced):
    before = tracing.span_counts()
    async with Collector(mode="hang") as collector:
        traced(
            collector.endpoint, OTEL_BSP_MAX_QUEUE_SIZE="4", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2",
            OTEL_BSP_SCHEDULE_DELAY="10", OTEL_EXPORTER_OTLP_TIMEOUT="1",
        )  # fmt: skip
        # Recording goes on while the exporter thread waits on the collector: nothing here waits for it.
        for n in range(60):
            with tracing.span(f"call {n}"):
                pass
        await wait_until(lambda: collector.bodies)  # the exporter is stuck in the collector now
        for n in range(60):
            with tracing.span(f"more {n}"):
                pass
        counts = tracing.span_counts()
        assert counts["dropped"] - before["dropped"] >= 100  # the queue holds 4
        # The stuck export times out (OTEL_EXPORTER_OTLP_TIMEOUT): its spans count as failed.
        await wait_until(lambda: tracing.span_counts()["failed"] > before["failed"], timeout=30)
        await asyncio.to_thread(tracing.stop, 2)
    assert not tracing.enabled()


@pytest.mark.parametrize("where", ["refusing", "absent"])
async def test_a_refusing_or_absent_collector_fails_exports_counted(traced, where):
    before = tracing.span_counts()
    async with Collector(mode="refuse") as collector:
        endpoint = collector.endpoint if where == "refusing" else f"http://127.0.0.1:{free_port()}"
        traced(endpoint, OTEL_BSP_SCHEDULE_DELAY="10", OTEL_EXPORTER_OTLP_TIMEOUT="1")
        for n in range(5):
            with tracing.span(f"call {n}"):
                pass
        await asyncio.to_thread(tracing.flush, 10)
        await wait_until(lambda: tracing.span_counts()["failed"] >= before["failed"] + 5, timeout=30)
        assert tracing.span_counts()["exported"] == before["exported"]
