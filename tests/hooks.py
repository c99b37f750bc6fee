"""What Pier calls out to, as real HTTP servers on loopback: a webhook receiver, a policy service and an
OpenTelemetry collector (OTLP/HTTP, decoded with opentelemetry-proto)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


class Receiver:
    """A webhook endpoint (a real HTTP server) that records what it gets; `fail_first` deliveries fail."""

    def __init__(self, fail_with: int | None = None, fail_first: int = 0) -> None:
        self.fail_with = fail_with
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if len(self.received) <= self.fail_first:
            return web.Response(status=503)
        return web.Response(status=self.fail_with or 204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


POLICY_TOKEN = "policy-token-do-not-log"


class PolicyServer:
    """A policy service: allows everything but calls of `counter`, and results that mention 'secret'."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.auth: list[str | None] = []
        self.url = ""

    async def police(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        self.auth.append(request.headers.get("Authorization"))
        for raw in body["messages"]:
            message = json.loads(raw)
            if (message.get("params") or {}).get("name") == "counter":
                return web.json_response({"decision": "Deny", "reasons": ["counter is not allowed for you"]})
            if body["type"] == "Output" and "secret" in raw:
                return web.json_response({"decision": "Deny", "reasons": ["the result leaks a secret"]})
        return web.json_response({"decision": "Allow"})

    async def __aenter__(self) -> PolicyServer:
        app = web.Application()
        app.router.add_post("/police", self.police)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/police"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


# -- an OpenTelemetry collector ---------------------------------------------------------------------


@dataclass
class Span:
    """One exported span, decoded."""

    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: str  # internal, server, client, producer, consumer
    service: str
    attributes: dict[str, Any]
    status: str  # unset, ok, error
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)
    events: list[str] = field(default_factory=list)
    start: int = 0  # nanoseconds since the epoch

    @property
    def error_type(self) -> Any:
        return self.attributes.get("error.type")


_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUS = {0: "unset", 1: "ok", 2: "error"}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _decoded(span: Any, service: str) -> Span:
    return Span(
        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(), name=span.name,
        kind=_KINDS[span.kind], service=service, attributes={a.key: _value(a.value) for a in span.attributes},
        status=_STATUS[span.status.code], links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
        events=[event.name for event in span.events], start=span.start_time_unix_nano,
    )  # fmt: skip


class Collector:
    """An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) that keeps every span it is sent, and every
    request's raw body (to grep). `mode`: "ok"; "hang" (never answers: a slow collector); "refuse" (503)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.spans: list[Span] = []
        self.bodies: list[bytes] = []
        self.url = ""
        self._hanging: set[asyncio.Future[None]] = set()

    async def handle(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        self.bodies.append(body)
        if self.mode == "hang":
            forever = asyncio.get_running_loop().create_future()
            self._hanging.add(forever)
            await forever  # cancelled when the collector stops
        if self.mode == "refuse":
            return web.Response(status=503)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [_decoded(span, str(resource.get("service.name"))) for span in scope_spans.spans]
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT names (the exporter adds /v1/traces)."""
        return self.url.removesuffix("/v1/traces")

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str, trace_id: str | None = None) -> list[Span]:
        return [s for s in self.spans if s.name == name and (trace_id is None or s.trace_id == trace_id)]

    async def __aenter__(self) -> Collector:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1/traces"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for hanging in self._hanging:
            hanging.cancel()
        await self.runner.cleanup()


def tree(spans: list[Span], root_parent: str) -> dict[str, list[Span]]:
    """Children by parent span id, checked to form one tree hanging from `root_parent` (the caller's span):
    every span's parent is that span or another span of the list."""
    ids = {s.span_id for s in spans}
    orphans = [s.name for s in spans if s.parent_id not in ids and s.parent_id != root_parent]
    assert not orphans, f"spans outside the tree from {root_parent}: {orphans}"
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id, []).append(s)
    return children


def path_to_root(spans: list[Span], span: Span) -> list[str]:
    """The names from `span` up to the root of its trace (its own name first)."""
    by_id = {s.span_id: s for s in spans}
    names = [span.name]
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names
