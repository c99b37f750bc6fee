"""One call end to end in one trace: from the caller's `traceparent` through the router, the session's start,
the bridge and the job pool to the stdio server, whose received `params._meta.traceparent` names the span
that called it.

Real parts: the router (in this process, tracing to a real OTLP/HTTP collector: tests/hooks.py), `pier jobs`
workers as processes (tracing to the same collector), a real stdio server that answers with the `_meta`
it received (tests/mcp_servers/rogue_server.py, `meta`), the `mcp` SDK as the MCP client at 2025-11-25 and
2026-07-28 (it puts the caller's context in `_meta`, as the MCP conventions say), a real webhook receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
from mcp import Client
from mcp_types import RequestParamsMeta
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from pier.core import tracing
from pier.core.catalog import Catalog, Profile
from pier.core.protocol import MODERN
from tests.hooks import Collector, Receiver, Span, path_to_root, tree
from tests.servers import PIER, ROGUE, router_app, scrape, text_of, wait_job, wait_until, worker_processes

PROFILE = "rogue"
MARKER = {"com.example/marker": "kept"}  # a caller's own `_meta` key


def _caller() -> tracing.TraceContext:
    """A caller's own span: the root every tree below must hang from."""
    return tracing.TraceContext(secrets.token_hex(16), secrets.token_hex(8), 1, "vendor=caller")


@pytest.fixture
async def collector(monkeypatch) -> AsyncIterator[Collector]:
    """A collector, and the OTEL_* variables that send this process's spans (the router's) and the
    workers' there, exported within 50 ms of ending."""
    async with Collector() as running:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", running.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        yield running


@contextlib.asynccontextmanager
async def traced_router(redis_url: str, profile: dict | None = None, **settings) -> AsyncIterator:
    catalog = Catalog([Profile(name=PROFILE, command=ROGUE, **(profile or {}))])
    async with router_app(redis_url, catalog, **settings) as running:
        assert tracing.enabled()
        yield running


async def _exported(collector: Collector, trace_id: str, name: str, count: int = 1) -> list[Span]:
    """The trace's spans, once `count` spans called `name` have arrived (this process's flushed first)."""
    await asyncio.to_thread(tracing.flush)
    await wait_until(lambda: len(collector.named(name, trace_id)) >= count, timeout=30)
    return collector.trace(trace_id)


def _received_meta(result_text: str) -> dict:
    return json.loads(result_text)


def _the_server_was_called_by(spans: list[Span], meta: dict, caller: tracing.TraceContext) -> Span:
    """The server's `_meta.traceparent` names a stdio client span of this trace (returned)."""
    received = tracing.parse(meta["traceparent"], meta.get("tracestate"))
    assert received is not None
    assert received.trace_id == caller.trace_id
    assert received.state == caller.state  # the caller's vendors' state reached the server
    [calling] = [s for s in spans if s.span_id == received.span_id]
    assert (calling.name, calling.kind) == ("tools/call meta", "client")
    assert calling.attributes["network.transport"] == "pipe"
    assert calling.attributes["mcp.method.name"] == "tools/call"
    return calling


@contextlib.contextmanager
def ambient(caller: tracing.TraceContext) -> Iterator[None]:
    """`caller` as this task's current span, as an instrumented MCP client would have it: the `mcp` SDK
    then writes it into each request's `params._meta`."""
    remote = otel_trace.SpanContext(
        int(caller.trace_id, 16), int(caller.span_id, 16), is_remote=True,
        trace_flags=otel_trace.TraceFlags(caller.flags),
        trace_state=otel_trace.TraceState.from_header([caller.state]),
    )  # fmt: skip
    token = otel_context.attach(otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(remote)))
    try:
        yield
    finally:
        otel_context.detach(token)


async def test_a_rest_call_and_its_cold_start_form_one_tree_down_to_the_server(http, redis_server, collector):
    caller = _caller()
    async with traced_router(redis_server.url) as running:
        url = f"{running.user_url('alice', PROFILE)}/tools/meta/call"
        headers = {"traceparent": caller.traceparent, "tracestate": caller.state}
        async with http.post(url, json={"arguments": {}}, headers=headers) as response:
            body = await response.json()
            assert response.status == 200, body
        spans = await _exported(collector, caller.trace_id, "tools/call meta")
    children = tree(spans, caller.span_id)
    [http_span] = children[caller.span_id]
    assert (http_span.name, http_span.kind) == ("POST /v1/users/{user}/servers/{server}/tools/{tool}/call", "server")
    assert http_span.attributes["http.response.status_code"] == 200
    assert http_span.service == "pier-router"
    names = {s.name for s in spans}
    assert {"identify", "rate limit", "policy", "call meta", "session acquire", "bridge call meta"} <= names
    # The cold start, visible as such: the session acquired by starting it, its server's start beneath.
    [acquire] = [s for s in spans if s.name == "session acquire"]
    assert acquire.attributes["pier.session.acquired"] == "started"
    [start] = children[acquire.span_id]
    assert start.name == "session start"
    [server_start] = children[start.span_id]
    assert server_start.name == "server start"
    assert {s.name for s in children[server_start.span_id]} >= {"initialize", "tools/list"}
    calling = _the_server_was_called_by(spans, _received_meta(text_of_rest(body)), caller)
    assert path_to_root(spans, calling) == [
        "tools/call meta", "bridge call meta", "call meta", http_span.name,
    ]  # fmt: skip


def text_of_rest(body: dict) -> str:
    return str(body["result"]["content"][0]["text"])


async def test_a_warm_session_is_acquired_as_it_is_and_a_bad_traceparent_starts_a_new_trace(
    http, redis_server, collector
):
    async with traced_router(redis_server.url) as running:
        url = f"{running.user_url('alice', PROFILE)}/tools/meta/call"
        async with http.post(url, json={"arguments": {}}) as response:
            assert response.status == 200
        for bad in ("00-not-a-trace-01", f"00-{'0' * 32}-{'1' * 16}-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"):
            async with http.post(url, json={"arguments": {}}, headers={"traceparent": bad}) as response:
                body = await response.json()
                assert response.status == 200, body  # ignored, never an error
            meta = _received_meta(text_of_rest(body))
            fresh = tracing.parse(meta["traceparent"])
            assert fresh is not None
            assert fresh.trace_id not in bad
            spans = await _exported(collector, fresh.trace_id, "tools/call meta")
            [root] = [s for s in spans if s.parent_id == ""]
            assert root.name.startswith("POST ")
            [acquire] = [s for s in spans if s.name == "session acquire"]
            assert acquire.attributes["pier.session.acquired"] == "existing"


async def test_a_warm_pool_claim_is_visible_as_such(http, redis_server, collector):
    caller = _caller()
    async with traced_router(redis_server.url, {"warm_pool": 1}) as running:
        await wait_until(lambda: running.router.backend.pool_views()[0]["ready"] == 1)
        url = f"{running.user_url('bob', PROFILE)}/tools/meta/call"
        async with http.post(url, json={"arguments": {}}, headers={"traceparent": caller.traceparent}) as response:
            assert response.status == 200
        spans = await _exported(collector, caller.trace_id, "tools/call meta")
    [acquire] = [s for s in spans if s.name == "session acquire"]
    assert acquire.attributes["pier.session.acquired"] == "pooled"
    assert "session start" not in {s.name for s in spans}  # it started before anyone asked: in a trace of its own
    pooled_starts = [s for s in collector.named("session start") if s.attributes["pier.session.pooled"]]
    assert pooled_starts
    assert all(s.parent_id == "" for s in pooled_starts)


@pytest.mark.parametrize("revision", ["2025-11-25", MODERN])
async def test_an_mcp_call_from_the_sdk_is_one_tree_from_its_meta_to_the_server(redis_server, collector, revision):
    caller = _caller()
    async with traced_router(redis_server.url) as running:
        url = f"{running.user_url('alice', PROFILE)}/mcp"
        with ambient(caller):
            async with Client(url, mode=MODERN if revision == MODERN else "legacy") as client:
                assert client.protocol_version == revision
                result = await client.call_tool("meta", {}, meta=cast(RequestParamsMeta, MARKER))
        spans = await _exported(collector, caller.trace_id, "tools/call meta", count=2)
    meta = _received_meta(text_of(result))
    assert meta["com.example/marker"] == "kept"  # the caller's own _meta reaches the server
    calling = _the_server_was_called_by(spans, meta, caller)
    by_id = {s.span_id: s for s in spans}
    mcp_span = by_id[calling.parent_id]
    # The MCP server span: its parent the caller's `_meta` context, the HTTP request's span linked.
    assert (mcp_span.name, mcp_span.kind, mcp_span.parent_id) == ("tools/call meta", "server", caller.span_id)
    assert mcp_span.attributes["gen_ai.tool.name"] == "meta"
    assert mcp_span.attributes["mcp.protocol.version"] == revision
    [(link_trace, link_span)] = mcp_span.links
    http_span = next(s for s in collector.spans if s.span_id == link_span)
    assert http_span.name == "POST /v1/users/{user}/servers/{server}/mcp"
    assert link_trace == http_span.trace_id


async def test_a_handed_off_job_joins_the_callers_trace_through_the_worker_and_its_webhook(
    http, redis_server, collector
):
    caller = _caller()
    async with (
        Receiver() as receiver,
        traced_router(redis_server.url, {"webhook_url": receiver.url}) as running,
        worker_processes(redis_server.url),
    ):
        url = f"{running.user_url('alice', PROFILE)}/tools/meta/call"
        headers = {"traceparent": caller.traceparent, "tracestate": caller.state}
        # alice's session is new and the deadline short: it is still starting when the call is handed off, so
        # the worker starts the call itself, once the router reports the session up.
        async with http.post(url, json={"arguments": {"sleep_s": 0.5}, "timeout_s": 0.05}, headers=headers) as r:
            queued = await r.json()
            assert r.status == 202, queued
        job = await wait_job(http, running.url, queued["job_id"])
        assert job["status"] == "completed", job
        await wait_until(lambda: receiver.received)
        spans = await _exported(collector, caller.trace_id, "process pier:jobs")
    tree(spans, caller.span_id)
    # The call's cold start; then the router waits for that start to report the session to the job (joining it,
    # or finding it up already when the start was quick).
    first, then = sorted((s for s in spans if s.name == "session acquire"), key=lambda s: s.start)
    assert first.attributes["pier.session.acquired"] == "started"
    assert then.attributes["pier.session.acquired"] in ("joined", "existing")
    [producer] = [s for s in spans if s.name == "send pier:jobs"]
    assert producer.kind == "producer"
    assert producer.service == "pier-router"
    [consumer] = [s for s in spans if s.name == "process pier:jobs"]
    # The worker's span: in the caller's trace, under the hand-off, and linked to it.
    assert (consumer.kind, consumer.service, consumer.parent_id) == ("consumer", "pier-jobs", producer.span_id)
    assert consumer.links == [(caller.trace_id, producer.span_id)]
    assert consumer.attributes["pier.job.status"] == "completed"
    calling = _the_server_was_called_by(spans, _received_meta(job["result"]["content"][0]["text"]), caller)
    # The worker started the call: the server's parent leads back to the worker's span.
    assert "process pier:jobs" in path_to_root(spans, calling)
    assert "POST /v1/calls" in path_to_root(spans, calling)
    # The webhook's POST carries its span's context, so the receiver can join the trace too.
    [delivery] = [s for s in spans if s.name == "webhook delivery"]
    [post] = [s for s in spans if s.parent_id == delivery.span_id]
    sent = tracing.from_headers({k.lower(): v for k, v in receiver.received[0][0].items()})
    assert sent is not None
    assert (sent.trace_id, sent.span_id) == (caller.trace_id, post.span_id)
    assert post.attributes["http.response.status_code"] == 204
    assert "url.full" not in post.attributes  # a webhook URL may be a credential: its address only


async def test_a_hanging_collector_never_fails_a_call_and_its_lost_spans_are_counted(http, redis_server, monkeypatch):
    async with Collector(mode="hang") as hanging:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", hanging.endpoint)
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        async with traced_router(redis_server.url) as running:
            url = f"{running.user_url('alice', PROFILE)}/tools/echo/call"
            for n in range(20):
                async with http.post(url, json={"arguments": {"message": str(n)}}) as response:
                    assert response.status == 200
                    assert (await response.json())["result"]["content"][0]["text"] == f"Echo: {n}"
            metrics = await scrape(http, running.url)
    assert hanging.bodies  # the exporter did try
    assert metrics.value("pier_tracing_spans_total", outcome="dropped") > 0


async def test_bridgekit_and_websocket_callers_join_the_trace_too(http, redis_server, collector):
    async with traced_router(redis_server.url) as running:
        # bridgekit's /chat: the traceparent header.
        chat_caller = _caller()
        body = {"user_id": "alice", "server": PROFILE, "tool_name": "meta", "tool_args": {}}
        async with http.post(f"{running.url}/chat", json=body, headers=chat_caller.carrier()) as r:
            [frame] = [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
        meta = _received_meta(json.loads(frame[6:])["result"]["content"][0]["text"])
        spans = await _exported(collector, chat_caller.trace_id, "tools/call meta")
        tree(spans, chat_caller.span_id)
        assert _the_server_was_called_by(spans, meta, chat_caller)
        # The WebSocket: each request's `_meta.traceparent` (a socket carries many calls).
        ws_caller = _caller()
        url = running.user_url("alice", PROFILE).replace("http://", "ws://") + "/ws"
        async with http.ws_connect(url) as ws:
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "ws"}}
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}))
            await ws.receive()
            params = {"name": "meta", "arguments": {}, "_meta": {**ws_caller.carrier(), **MARKER}}
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}))
            answer = json.loads((await ws.receive()).data)
        meta = _received_meta(answer["result"]["content"][0]["text"])
        assert meta["com.example/marker"] == "kept"
        spans = await _exported(collector, ws_caller.trace_id, "tools/call meta", count=2)
        tree(spans, ws_caller.span_id)
        assert _the_server_was_called_by(spans, meta, ws_caller)


async def test_a_bridge_process_passes_the_routers_span_on_to_its_server(http, redis_server, collector):
    """A bridge as a process (as in a pod) records nothing of its own: the server's parent is the router's
    client span of the request to the bridge (REST: `POST /v1/calls`; MCP: `POST /mcp`)."""
    rest_caller, mcp_caller = _caller(), _caller()
    async with traced_router(redis_server.url, local_bridges="process") as running:
        url = f"{running.user_url('alice', PROFILE)}/tools/meta/call"
        async with http.post(url, json={"arguments": {}}, headers=rest_caller.carrier()) as r:
            rest_meta = _received_meta(text_of_rest(await r.json()))
        with ambient(mcp_caller):
            async with Client(f"{running.user_url('alice', PROFILE)}/mcp", mode="legacy") as client:
                mcp_meta = _received_meta(text_of(await client.call_tool("meta", {})))
        rest_spans = await _exported(collector, rest_caller.trace_id, "POST /v1/calls")
        mcp_spans = await _exported(collector, mcp_caller.trace_id, "tools/call meta")
    for spans, meta, caller, name in (
        (rest_spans, rest_meta, rest_caller, "POST /v1/calls"), (mcp_spans, mcp_meta, mcp_caller, "POST /mcp")
    ):  # fmt: skip
        tree(spans, caller.span_id)
        received = tracing.parse(meta["traceparent"])
        assert received is not None
        [calling] = [s for s in spans if s.span_id == received.span_id]
        assert (calling.name, calling.kind, calling.service) == (name, "client", "pier-router")
        assert {s.service for s in spans} == {"pier-router"}  # nothing from the bridge process itself


@pytest.mark.parametrize("component", ["router", "jobs"])
async def test_an_otlp_protocol_pier_does_not_speak_stops_it_in_one_line(redis_server, component):
    env = {
        **os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "PIER_REDIS_URL": redis_server.url, "PIER_PORT": "0", "PIER_JOBS_PORT": "0",
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *PIER, component, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert err.decode().splitlines()[-1] == (
        f"pier {component}: OTEL_EXPORTER_OTLP_PROTOCOL=grpc: Pier exports traces over OTLP/HTTP (http/protobuf) "
        "only; point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318 by default)"
    )
