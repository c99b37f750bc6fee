"""The bridge's aiohttp application: wiring, guards, the call API, probes, and serving."""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from pier.core import tracing
from pier.core.callapi import BridgeStatus, CallAnswer, CallRequest, ClientState
from pier.core.errors import PierError
from pier.core.jsonrpc import MAX_DEPTH, Message, TooDeep, dumps, parse
from pier.core.process import clean_env
from pier.core.protocol import MODERN
from pier.core.tls import server_context
from pier.core.web import error_response, json_response, origin_allowed, read_body
from pier.core.web import serve as web_serve
from pier.sidecar.attach import FifoPeer
from pier.sidecar.call_registry import CallRegistry
from pier.sidecar.child import ChildProcess
from pier.sidecar.clients import ClientRegistry
from pier.sidecar.config import SidecarSettings
from pier.sidecar.metrics import CONTENT_TYPE, BridgeMetrics
from pier.sidecar.streamable import StreamableHTTP
from pier.sidecar.transport import Transport
from pier.sidecar.upstream import Eras, Upstream

log = logging.getLogger("pier.sidecar")

_HOUSEKEEPING_S = 10.0


@dataclass
class Bridge:
    """Everything one bridge owns, built once per app.

    Its call API is these methods; the HTTP handlers below serve them, and a router running the
    bridge in its own process (local backend, in-process mode) calls them directly.
    """

    settings: SidecarSettings
    # The server's environment; by default the bridge's own without its settings.
    server_env: dict[str, str] | None = None
    metrics: BridgeMetrics = field(default_factory=BridgeMetrics)
    draining: bool = False

    def __post_init__(self) -> None:
        self.clients = ClientRegistry(self.settings.max_clients, self.settings.client_idle_s)
        # Notifications that belong to no call go to every listener, of either era.
        self.upstream = Upstream(self.settings, self._make_transport, self.metrics, self._broadcast)
        self.eras = Eras(self.upstream, self._handshake_run)
        self.calls = CallRegistry(self.upstream, self.settings.call_retention_s, self.settings.max_retained_calls)
        self.mcp = StreamableHTTP(self.eras, self.clients, self.metrics)

    def _broadcast(self, message: Message) -> None:
        # The first run's notification that belongs to no call: to every listener, and to the GET
        # streams unless handshake-era callers have a run of their own (whose notifications they get).
        # `self.mcp` is looked up when called: it is built after the upstream.
        if self.eras.handshake_now() is self.upstream:
            self.mcp.broadcast(message)
        else:
            self.mcp.stateless.broadcast(message)

    def _handshake_run(self) -> Upstream:
        """The server's second run, for handshake-era callers of a server whose stdio takes one era."""
        upstream = Upstream(
            self.settings, self._make_transport, self.metrics, self.clients.broadcast,
            era="handshake", slots=self.upstream.slots,
        )  # fmt: skip
        upstream.mux.forwarded = self.upstream.mux.forwarded  # one count of requests per method
        return upstream

    def _make_transport(self) -> Transport:
        s = self.settings
        if s.attach_dir is not None:
            return FifoPeer(s.attach_dir, limit=s.max_message_bytes, stderr_lines=s.stderr_tail_lines)
        return ChildProcess(
            s.command,
            limit=s.max_message_bytes,
            stderr_lines=s.stderr_tail_lines,
            kill_timeout=s.kill_timeout_s,
            cwd=s.cwd,
            # The server never sees the bridge's own settings (its token among them).
            env=self.server_env if self.server_env is not None else clean_env(("PIER_SIDECAR_",)),
            confinement=s.confinement(),
        )

    async def start_call(self, request: CallRequest) -> CallAnswer:
        """Start (or join) a call and wait up to `request.wait_s` for it; PierError when refused."""
        if self.draining:
            raise PierError("SHUTTING_DOWN", "the bridge is shutting down")
        try:
            call = await self.calls.start(request.tool, request.arguments, request.call_id, request.capabilities)
        except PierError as err:
            self.metrics.rejected.labels(err.code).inc()
            raise
        await call.wait(request.wait_s)
        return call.answer()

    async def get_call(
        self, call_id: str, wait_s: float = 0, progress_after: int = -1, input_after: int = -1
    ) -> CallAnswer:
        """A call once it is done, has progress beyond `progress_after`, its input requests changed
        since `input_after`, or after `wait_s`."""
        call = self.calls.get(call_id)
        await call.wait(wait_s, progress_after, input_after)
        return call.answer(max(progress_after, 0))

    def answer_call(self, call_id: str, responses: dict[str, Any]) -> CallAnswer:
        """The caller's answers to what the server asked during a call (`tasks/update`)."""
        call = self.calls.get(call_id)
        if call.pending is not None:
            call.answer_input(self.upstream.mux, responses)
        return call.answer()

    def cancel_call(self, call_id: str, reason: str = "cancelled by the caller") -> CallAnswer:
        call = self.calls.get(call_id)
        self.calls.cancel(call, reason)
        return call.answer()

    async def tools(self) -> list[dict[str, Any]]:
        """The server's tools, once it is ready (PierError if it cannot become ready)."""
        await self.upstream.wait_ready()
        return self.upstream.tools

    async def resume_client(self, state: ClientState) -> bool:
        """Recreate an MCP client session under its id (`StreamableHTTP.resume`); False when it is here."""
        if self.draining:
            raise PierError("SHUTTING_DOWN", "the bridge is shutting down")
        return await self.mcp.resume(state)

    def status(self) -> BridgeStatus:
        up = self.upstream
        runs = self.eras.all
        init = up.init_result or {}
        transport = up.transport
        return BridgeStatus(
            state="draining" if self.draining else up.state,
            ready=up.ready and not self.draining,
            mode="attach" if self.settings.attach_dir is not None else "child",
            pid=transport.pid if transport else None,
            restarts=sum(run.restarts for run in runs),
            in_flight=sum(run.in_flight for run in runs),
            queued=sum(run.queued for run in runs),
            calls_running=self.calls.running,
            clients=len(self.clients.sessions),
            started_at=up.started_at,
            last_activity=max(run.last_activity for run in runs),
            server_info=init.get("serverInfo"),
            protocol_version=MODERN if up.modern else init.get("protocolVersion"),
            tools=len(up.tools),
            last_exit=up.last_exit.details() if up.last_exit else None,
            server_tasks=up.server_tasks,
            server_runs=sum(1 for run in runs if run.transport is not None),
        )


BRIDGE = web.AppKey("bridge", Bridge)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_guard(settings: SidecarSettings) -> Middleware:
    token = settings.token.get_secret_value().encode() if settings.token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, settings.allowed_origins):
            return error_response(PierError("FORBIDDEN", f"origin {origin!r} is not allowed"))
        if token is not None and (request.path == "/mcp" or request.path.startswith("/v1/")):
            supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(supplied, token):
                return error_response(PierError("UNAUTHENTICATED", "a valid bearer token is required"))
        route = _traced_route(request)
        if route is None:
            return await handler(request)
        # The caller's trace context: this bridge's spans join it (tracing on, in the router's process),
        # or it passes on to the server as it came (off: a bridge process records nothing).
        with tracing.span(
            f"{request.method} {route}", "server", {"http.request.method": request.method, "http.route": route},
            parent=tracing.from_headers(request.headers),
        ) as span:  # fmt: skip
            response = await handler(request)
            span.set("http.response.status_code", response.status)
            if response.status >= 500:
                span.fail(str(response.status))
            return response

    return guard


def _traced_route(request: web.Request) -> str | None:
    """The route of a request that starts work on the server (calls, MCP posts), or None: probes, status,
    streams and long polls are not worth a span each."""
    path, method = request.path, request.method
    if path == "/mcp":
        return path if method != "GET" else None
    if path in ("/v1/calls", "/v1/tools"):
        return path
    if method == "DELETE" and path.startswith("/v1/calls/"):
        return "/v1/calls/{call_id}"
    return None


# -- the call API ----------------------------------------------------------------------------


async def _body(request: web.Request) -> Any:
    """A call API request's JSON body; BAD_REQUEST when it is not JSON, or nested too deeply."""
    settings = request.app[BRIDGE].settings
    try:
        return parse(await read_body(request, settings.max_message_bytes, settings.body_timeout_s))
    except TooDeep as exc:
        raise PierError("BAD_REQUEST", f"the body is {exc}", {"max_depth": MAX_DEPTH}) from None
    except ValueError:
        raise PierError("BAD_REQUEST", "the body is not valid JSON") from None


async def post_call(request: web.Request) -> web.Response:
    try:
        answer = await request.app[BRIDGE].start_call(CallRequest.parse(await _body(request)))
    except PierError as err:
        return error_response(err, retry_after(err))
    return json_response(answer.to_dict(), answer.http_status)


def retry_after(err: PierError) -> dict[str, str] | None:
    """The Retry-After header an error's answer carries, if any."""
    return {"Retry-After": "1"} if err.code in ("CALL_QUEUE_FULL", "SERVER_UNAVAILABLE") else None


def _query_float(request: web.Request, name: str, default: float, high: float) -> float:
    try:
        return min(max(float(request.query.get(name, default)), 0.0), high)
    except ValueError:
        raise PierError("BAD_REQUEST", f"query parameter {name} must be a number") from None


async def get_call(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    try:
        bridge.calls.get(request.match_info["call_id"])  # an unknown call is 404, whatever the query says
        wait_s = _query_float(request, "wait_s", 0, 300)
        progress_after = (
            int(_query_float(request, "progress_after", -1, 1e12)) if "progress_after" in request.query else -1
        )
        input_after = int(_query_float(request, "input_after", -1, 1e12)) if "input_after" in request.query else -1
        answer = await bridge.get_call(request.match_info["call_id"], wait_s, progress_after, input_after)
    except PierError as err:
        return error_response(err)
    return json_response(answer.to_dict(), answer.http_status)


async def post_input(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    settings = bridge.settings
    try:
        bridge.calls.get(request.match_info["call_id"])
        body = parse(await read_body(request, settings.max_message_bytes, settings.body_timeout_s))
        responses = body.get("responses") if isinstance(body, dict) else None
        if not isinstance(responses, dict):
            raise PierError("INVALID_ARGUMENTS", 'the body must be {"responses": {key: result, ...}}')
        answer = bridge.answer_call(request.match_info["call_id"], responses)
    except TooDeep as exc:
        return error_response(PierError("BAD_REQUEST", f"the body is {exc}", {"max_depth": MAX_DEPTH}))
    except ValueError:
        return error_response(PierError("BAD_REQUEST", "the body is not valid JSON"))
    except PierError as err:
        return error_response(err)
    return json_response(answer.to_dict(), answer.http_status)


async def delete_call(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    try:
        reason = request.query.get("reason", "cancelled by the caller")
        answer = bridge.cancel_call(request.match_info["call_id"], reason)
    except PierError as err:
        return error_response(err)
    return json_response(answer.to_dict(), answer.http_status)


async def post_client(request: web.Request) -> web.Response:
    """`POST /v1/clients`: recreate an MCP client session (201), or find it here already (200)."""
    try:
        created = await request.app[BRIDGE].resume_client(ClientState.parse(await _body(request)))
    except PierError as err:
        return error_response(err, retry_after(err))
    return json_response({"created": created}, 201 if created else 200)


async def get_tools(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    try:
        tools = await bridge.tools()
    except PierError as err:
        return error_response(err, retry_after(err))
    return json_response({"tools": tools})


async def get_status(request: web.Request) -> web.Response:
    return json_response(request.app[BRIDGE].status().to_dict())


async def get_logs(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    up = bridge.upstream
    lines = list(up.transport.stderr_tail) if up.transport else (up.last_exit.stderr_tail if up.last_exit else [])
    try:
        count = int(_query_float(request, "lines", 100, bridge.settings.stderr_tail_lines))
    except PierError as err:
        return error_response(err)
    note = "attach mode: the server's stderr is in its own container's log" if bridge.settings.attach_dir else None
    return json_response({"lines": lines[-count:] if count else [], "note": note})


async def healthz(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    if bridge.upstream.gave_up.is_set():
        return json_response({"status": "failed", "last_exit": bridge.status().last_exit}, 503)
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    status = bridge.status()
    return json_response({"ready": status.ready, "state": status.state}, 200 if status.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    bridge.metrics.clients.set(len(bridge.clients.sessions))
    return web.Response(body=bridge.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


# -- lifecycle -------------------------------------------------------------------------------


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    bridge = app[BRIDGE]
    bridge.upstream.start()
    housekeeping = asyncio.create_task(_housekeeping(bridge))
    yield
    housekeeping.cancel()
    await asyncio.gather(housekeeping, return_exceptions=True)
    await bridge.calls.close()
    await bridge.eras.stop()


async def _housekeeping(bridge: Bridge) -> None:
    while True:
        await asyncio.sleep(_HOUSEKEEPING_S)
        bridge.calls.sweep()
        bridge.mcp.stateless.expire()
        for client in bridge.clients.expire():
            for run in bridge.eras.all:
                run.mux.cancel_client(client, "client session expired")


async def _drain(app: web.Application) -> None:
    """SIGTERM: refuse new work, end GET streams, give in-flight calls the grace period."""
    bridge = app[BRIDGE]
    bridge.draining = True
    bridge.clients.close_all()
    bridge.mcp.stateless.close()
    deadline = time.monotonic() + bridge.settings.shutdown_grace_s

    # A few polls, once, at shutdown: simpler than an event every call would have to set.
    def in_flight() -> int:
        return sum(run.in_flight for run in bridge.eras.all)

    while (in_flight() or bridge.calls.running) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if in_flight():
        log.warning("grace period over; stopping with calls in flight", extra={"in_flight": in_flight()})


def create_app(settings: SidecarSettings, server_env: dict[str, str] | None = None) -> web.Application:
    """The bridge app; the server starts with the app and stops with it."""
    if not settings.command and settings.attach_dir is None:
        raise ValueError("the bridge needs a server command or an attach directory")
    app = web.Application(client_max_size=settings.max_message_bytes, middlewares=[make_guard(settings)])
    bridge = Bridge(settings, server_env)
    app[BRIDGE] = bridge
    app.cleanup_ctx.append(_lifespan)
    app.on_shutdown.append(_drain)
    app.router.add_post("/mcp", bridge.mcp.post)
    app.router.add_get("/mcp", bridge.mcp.get)
    app.router.add_delete("/mcp", bridge.mcp.delete)
    app.router.add_post("/v1/calls", post_call)
    app.router.add_get("/v1/calls/{call_id}", get_call)
    app.router.add_delete("/v1/calls/{call_id}", delete_call)
    app.router.add_post("/v1/calls/{call_id}/input", post_input)
    app.router.add_post("/v1/clients", post_client)
    app.router.add_get("/v1/tools", get_tools)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/logs", get_logs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(settings: SidecarSettings) -> int:
    """Run the bridge until SIGTERM/SIGINT (or until the server keeps failing). Returns the exit code."""
    app = create_app(settings)
    gave_up = app[BRIDGE].upstream.gave_up

    def listening(url: str) -> None:
        # One machine-readable line on stdout, so a parent that asked for port 0 learns the real one.
        sys.stdout.write(dumps({"event": "listening", "url": url}).decode() + "\n")
        sys.stdout.flush()
        log.info("bridge listening", extra={"url": url})

    context = None
    if settings.tls_cert is not None:
        context = server_context(settings.tls_cert, settings.tls_key or settings.tls_cert, settings.tls_client_ca)
    await web_serve(
        app, settings.host, settings.port, shutdown_timeout=settings.shutdown_grace_s + 1,
        on_ready=listening, stop_when=gave_up.wait(), ssl_context=context,
    )  # fmt: skip
    return 1 if gave_up.is_set() else 0
