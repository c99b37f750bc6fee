"""Trace context as W3C Trace Context defines it (what is accepted, what is ignored), what goes into a
server's `_meta`, the MCP conventions' names, and tracing off unless an endpoint is configured."""

from __future__ import annotations

from typing import Any

import pytest

from pier.core import tracing
from pier.core.errors import ConfigError

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, (TRACE, SPAN, 1)),
        (f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN, 0)),  # not sampled: still a context to hand on
        (f" {VALID}\t", (TRACE, SPAN, 1)),  # optional whitespace around a header value
        (f"cc-{TRACE}-{SPAN}-01-what-comes-later", (TRACE, SPAN, 1)),  # a later version may add fields
    ],
)
def test_valid_traceparents_are_read(header, expected):
    context = tracing.parse(header)
    assert context is not None
    assert (context.trace_id, context.span_id, context.flags) == expected


@pytest.mark.parametrize(
    "header",
    [
        None, 42, "", "garbage", f"00-{TRACE}-{SPAN}", f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has four fields
        f"ff-{TRACE}-{SPAN}-01", f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01", f"00-{TRACE}-{SPAN}0-01", f"00-{TRACE}-{SPAN}-1", f"0-{TRACE}-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01", f"00-{TRACE}-{SPAN}-0g",
    ],
)  # fmt: skip
def test_malformed_traceparents_are_ignored(header):
    assert tracing.parse(header) is None
    assert tracing.from_headers({"traceparent": header} if isinstance(header, str) else {}) is None


def _state(tracestate: str) -> str:
    context = tracing.parse(VALID, tracestate)
    assert context is not None
    return context.state


def test_tracestate_rides_along_only_when_well_formed():
    assert _state("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE") == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert _state("tenant@vendor=x") == "tenant@vendor=x"
    assert _state("bad key=x") == ""  # one bad member drops the header whole
    assert _state("a=" + "x" * 600) == ""  # over 512 characters
    assert _state(",".join(f"k{n}=v" for n in range(33))) == ""  # over 32 members
    assert tracing.parse("garbage", "rojo=1") is None  # no tracestate without a traceparent


def test_meta_carries_the_context_and_keeps_the_callers_other_keys():
    context = tracing.TraceContext(TRACE, SPAN, 1, "rojo=1")
    message: dict[str, Any] = {
        "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "echo", "_meta": {"progressToken": 3, "traceparent": "00-old-old-01", "com.example/x": 1}},
    }  # fmt: skip
    sent = tracing.into_meta(message, context)
    assert sent["params"]["_meta"] == {
        "progressToken": 3, "com.example/x": 1, "traceparent": VALID, "tracestate": "rojo=1"
    }  # fmt: skip
    assert message["params"]["_meta"]["traceparent"] == "00-old-old-01"  # a copy: the caller's is untouched
    assert tracing.into_meta(message, None) is message
    bare = tracing.into_meta({"jsonrpc": "2.0", "id": 1, "method": "ping"}, context)
    assert bare["params"] == {"_meta": {"traceparent": VALID, "tracestate": "rojo=1"}}
    assert tracing.from_meta(sent) == context
    assert tracing.from_meta({"params": {"_meta": {"traceparent": "nope"}}}) is None


def test_mcp_names_and_attributes_follow_the_conventions():
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo", "arguments": {"k": "v"}}}
    assert tracing.mcp_span_name(call) == "tools/call echo"
    attributes = tracing.mcp_attributes(call, "pipe")
    assert attributes == {
        "mcp.method.name": "tools/call", "network.transport": "pipe", "jsonrpc.request.id": "5",
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "echo",
    }  # fmt: skip
    # A caller's odd name never becomes a span name (span names stay few); arguments never become attributes.
    odd = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x y\nz" * 30}}
    assert tracing.mcp_span_name(odd) == "tools/call"
    assert "gen_ai.tool.name" not in tracing.mcp_attributes(odd)
    assert tracing.mcp_span_name({"method": "tools/list", "id": 2}) == "tools/list"


def test_client_attributes_leave_credentials_and_queries_out():
    attributes = tracing.http_client_attributes("POST", "https://user:pw@hooks.example:8443/T0/B0/SECRET?token=t")
    assert attributes == {
        "http.request.method": "POST", "url.scheme": "https", "server.address": "hooks.example", "server.port": 8443,
    }  # fmt: skip
    bridge = tracing.http_client_attributes("POST", "http://10.1.2.3:8080/v1/calls?x=1", "/v1/calls")
    assert bridge["url.full"] == "http://10.1.2.3:8080/v1/calls"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_without_an_endpoint(environ, monkeypatch):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert not tracing.endpoint_configured()
    assert tracing.start("pier-test") is False
    try:
        assert not tracing.enabled()
        with tracing.span("anything", parent=tracing.parse(VALID)) as span:
            assert span is tracing.NULL
            # The caller's context passes through untouched: to logs and to what Pier calls.
            assert tracing.current() == tracing.parse(VALID)
            assert tracing.headers() == {"traceparent": VALID}
        assert tracing.current() is None
    finally:
        tracing.stop()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json", "http/protobuf"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "many", "OTEL_BSP_MAX_QUEUE_SIZE"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-5", "OTEL_BSP_SCHEDULE_DELAY"),
    ],
)
def test_a_setting_pier_cannot_honour_is_refused_in_one_line(name, value, says, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=says):
        tracing.start("pier-test")
    assert not tracing.enabled()
    tracing.stop()


def test_log_lines_written_in_a_traced_request_carry_its_ids():
    import json
    import logging

    from pier.core.logs import JsonFormatter

    def line() -> dict[str, Any]:
        record = logging.LogRecord("pier.test", logging.INFO, __file__, 1, "handled", None, None)
        parsed: dict[str, Any] = json.loads(JsonFormatter().format(record))
        return parsed

    assert "trace_id" not in line()
    with tracing.span("request", parent=tracing.parse(VALID)):
        assert (line()["trace_id"], line()["span_id"]) == (TRACE, SPAN)  # tracing off: the caller's own
    assert "trace_id" not in line()
