"""MCP 2026-07-28 at the bridge's `/mcp`: stateless requests onto the one stdio session (`StatelessHTTP`).

Each POST is one request, checked as the spec says (`_meta` envelope -32602, headers against the
body -32020, the revision -32022, removed methods 404/-32601) and answered on its own response:
JSON, or SSE when a notification (progress, a log record the request asked for) precedes the
answer. A response stream the caller closes cancels the request on the server.

What the bridge does depends on the server's era (`Upstream.modern`):

- A handshake-era server (most stdio servers, and dual-era ones, initialized once by the bridge):
  the bridge translates. `server/discover` and `tools/list` are answered from the cache; results
  get `resultType`, the server's identity and caching hints (`ttlMs`); `subscriptions/listen` is
  served by the bridge from the server's list-changed and resource-updated notifications
  (`subscriptions`); and a server→client request during a call (sampling, elicitation, roots)
  becomes an `InputRequiredResult` (multi round-trip requests, `input_required`): the call stays
  parked on the server, and the caller's retry hands the answers on, so the call goes on — on the
  same session, run once.
- A 2026-07-28 server: requests pass through (ids and progress tokens rewritten, as always): its
  multi round-trip requests, its capability checks, and — for a server with the tasks extension —
  its own tasks (`tasks/get`, `tasks/update`, `tasks/cancel`).

A `subscriptions/listen` the bridge ends (it is stopping) gets its graceful completion: the listen
request's result, carrying the subscription id (2026-07-28, #2953), then the end of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from pier.core.callapi import Output
from pier.core.errors import PierError
from pier.core.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    Message,
    gateway_error_response,
    is_notification,
    is_request,
    validate_message,
)
from pier.core.protocol import (
    CACHEABLE,
    LOG_LEVEL_KEY,
    REMOVED_METHODS,
    SERVER_INFO_KEY,
    SUPPORTED_VERSIONS,
    TASK_METHODS,
    TASK_NAMED,
    VERSION_HEADER,
    Refusal,
    check_param_headers,
    check_request,
    meta_of,
    param_headers,
    strip_envelope,
    unsupported,
)
from pier.core.web import KEEPALIVE_S, PEER_POLL_S, SSE_HEADERS, json_response, peer_gone, sse_message, write_or_gone
from pier.sidecar.input_required import InputRequests, InputWait
from pier.sidecar.metrics import BridgeMetrics
from pier.sidecar.multiplexer import Pending
from pier.sidecar.subscriptions import Subscriptions, listen_completed
from pier.sidecar.upstream import BRIDGE_INFO, Upstream

log = logging.getLogger("pier.sidecar.stateless")

# Caching hints of results the bridge answers or translates: a list is fresh until the server says
# it changed (list-changed notifications, which subscriptions/listen carries); per-user sessions
# make every answer private to its caller.
TTL_MS = 60_000
CACHE_SCOPE = "private"
_RESOURCE_NOT_FOUND = -32002  # handshake-era code, -32602 at 2026-07-28


class PeerWatch:
    """Looks every PEER_POLL_S whether a waiting request's caller is still there: a "tick" in its
    return path's queue (one timer per request in flight, rather than a timeout per wait)."""

    def __init__(self, request: web.Request, path: ReturnPath) -> None:
        self.queue = path.queue
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_later(PEER_POLL_S, self._tick)

    def _tick(self) -> None:
        self.queue.put_nowait(("tick", {}))
        self.handle = self.loop.call_later(PEER_POLL_S, self._tick)

    def stop(self) -> None:
        self.handle.cancel()


class ReturnPath:
    """One 2026-07-28 request's way back: what reaches its caller while the server works on it (its
    notifications and the server's requests, then its answer), in one queue with the peer watch's ticks."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()

    # Sink: notifications and server requests tied to this request.
    def deliver(self, message: Message) -> None:
        self.queue.put_nowait(("request" if is_request(message) else "note", message))

    def deliver_final(self, message: Message) -> None:
        self.queue.put_nowait(("final", message))


class StatelessHTTP:
    """2026-07-28 requests at `/mcp` (and through the router's relay, in the router's process)."""

    def __init__(self, upstream: Upstream, metrics: BridgeMetrics, input_wait_s: float) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.inputs = InputRequests(upstream.mux, input_wait_s)  # calls parked for their callers' input
        self.subscriptions = Subscriptions(upstream)  # subscriptions/listen (handshake-era server)
        self._headers_of: dict[str, dict[str, Any]] | None = None
        self._headers: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        self._listens: dict[Pending, ReturnPath] = {}  # subscriptions/listen passed through to the server

    def _param_headers(self, tool: str) -> list[tuple[tuple[str, ...], str, str]]:
        """A tool's `x-mcp-header` parameters (found once per tool list)."""
        tools = self.upstream.tools_by_name
        if self._headers_of is not tools:
            self._headers_of, self._headers = tools, {}
        annotated = self._headers.get(tool)
        if annotated is None:
            spec = tools.get(tool)
            annotated = self._headers[tool] = param_headers(spec.get("inputSchema")) if spec else []
        return annotated

    # -- notifications that belong to no call, housekeeping ----------------------------------

    def broadcast(self, message: Message) -> None:
        self.subscriptions.broadcast(message)

    def expire(self) -> None:
        """Cancel parked calls whose caller never came back with the input."""
        self.inputs.expire()

    def close(self) -> None:
        """The bridge is stopping: every subscriptions/listen stream ends, gracefully."""
        self.subscriptions.close()
        for pending, path in list(self._listens.items()):
            path.deliver_final(listen_completed(pending.original_id, self.upstream))
            self.upstream.mux.cancel(pending, "the bridge is stopping")
        self._listens.clear()

    # -- entry -----------------------------------------------------------------------------

    async def serve(self, request: web.Request, payload: Any, output: Output | None = None) -> web.StreamResponse:
        """Answer one 2026-07-28 POST whose body (`payload`) is parsed already."""
        early = _not_a_request(request, payload)
        if early is not None:
            return early
        message: Message = payload
        try:
            capabilities = self._check(message, request)
        except Refusal as refusal:
            self.metrics.rejected.labels("PROTOCOL").inc()
            return _refuse(refusal, message["id"])
        method = message["method"]
        server_tasks = method in TASK_NAMED and self.upstream.modern and self.upstream.server_tasks
        if method in REMOVED_METHODS or (method in TASK_METHODS and not server_tasks):
            # tasks/result and tasks/list are gone at 2026-07-28; the others are the server's, if it has tasks.
            return _refuse(Refusal(METHOD_NOT_FOUND, f"Method not found: {method}"), message["id"])
        if method == "server/discover":
            return await self._discover(message, output)
        if self.upstream.modern:
            return await self._forward(request, message, capabilities, output)
        return await self._translated(request, message, capabilities, output)

    def _check(self, message: Message, request: web.Request) -> dict[str, Any]:
        """The spec's checks of a request (Refusal); the caller's capabilities."""
        _version, capabilities = check_request(message, request.headers)
        if message["method"] == "tools/call":
            # The bridge reads the body, so it checks the tool's mirrored parameters (the
            # server, on stdio, sees no headers).
            params = message.get("params") or {}
            annotated = self._param_headers(str(params.get("name")))
            if annotated:
                check_param_headers(annotated, params.get("arguments"), request.headers)
        return capabilities

    async def _translated(
        self, request: web.Request, message: Message, capabilities: dict[str, Any], output: Output | None
    ) -> web.StreamResponse:
        """A request for a handshake-era server: what the bridge answers itself, or the request translated."""
        method = message["method"]
        params = message.get("params") or {}
        if method == "subscriptions/listen":
            return await self.subscriptions.listen(request, message, output)
        if method == "tools/list" and self.upstream.tools_by_name and not params.get("cursor"):
            return await self._json(self._complete(message, {"tools": self.upstream.tools}), output)
        if "requestState" in params or "inputResponses" in params:
            return await self._resume(request, message, capabilities, output)
        return await self._forward(request, message, capabilities, output)

    # -- answered by the bridge ------------------------------------------------------------

    async def _discover(self, message: Message, output: Output | None) -> web.StreamResponse:
        try:
            await self.upstream.wait_ready()
        except PierError as err:
            return await self._json(gateway_error_response(message["id"], err), output, err.http_status)
        if self.upstream.modern and self.upstream.discover_result is not None:
            result = dict(self.upstream.discover_result)
            # DiscoverResult has no serverInfo since #3002: it is in _meta (from an older server too).
            info = result.pop("serverInfo", None)
            found = result.get("_meta")
            meta: dict[str, Any] = found if isinstance(found, dict) else {}
            if info is not None and SERVER_INFO_KEY not in meta:
                result["_meta"] = {**meta, SERVER_INFO_KEY: info}
        else:
            init = self.upstream.init_result or {}
            result = {"capabilities": init.get("capabilities") or {}}
            if "instructions" in init:
                result["instructions"] = init["instructions"]
            result["_meta"] = {SERVER_INFO_KEY: init.get("serverInfo") or BRIDGE_INFO}
        result["supportedVersions"] = list(SUPPORTED_VERSIONS)
        return await self._json(self._complete(message, result), output)

    def _complete(self, message: Message, result: dict[str, Any]) -> Message:
        """A result as a 2026-07-28 caller expects it from a handshake-era server."""
        result = dict(result)
        result.setdefault("resultType", "complete")
        meta = result.get("_meta")
        if not isinstance(meta, dict) or SERVER_INFO_KEY not in meta:
            info = (self.upstream.init_result or {}).get("serverInfo") or BRIDGE_INFO
            result["_meta"] = {**(meta if isinstance(meta, dict) else {}), SERVER_INFO_KEY: info}
        if message["method"] in CACHEABLE and result["resultType"] == "complete":
            result.setdefault("ttlMs", TTL_MS)
            result.setdefault("cacheScope", CACHE_SCOPE)
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def _translate(self, message: Message, answer: Message) -> Message:
        """The server's answer to a translated request, in 2026-07-28 terms."""
        if "result" in answer and isinstance(answer["result"], dict):
            return self._complete(message, answer["result"])
        error = answer.get("error")
        if isinstance(error, dict) and error.get("code") == _RESOURCE_NOT_FOUND:
            return {**answer, "error": {**error, "code": INVALID_PARAMS}}
        return answer

    # -- forwarded to the server -----------------------------------------------------------

    async def _forward(
        self, request: web.Request, message: Message, capabilities: dict[str, Any], output: Output | None
    ) -> web.StreamResponse:
        modern = self.upstream.modern
        path = ReturnPath()
        meta = meta_of(message)
        log_level = meta.get(LOG_LEVEL_KEY) if isinstance(meta.get(LOG_LEVEL_KEY), str) else None
        try:
            pending = await self.upstream.begin(
                message if modern else strip_envelope(message), None, path, capabilities=capabilities,
                log_level=log_level,
            )  # fmt: skip
        except PierError as err:
            self.metrics.requests.labels(_label(message["method"]), err.code).inc()
            return await self._json(gateway_error_response(message["id"], err), output, err.http_status)
        _finish_into(pending)
        if message["method"] != "subscriptions/listen":
            return await self._respond(request, message, pending, path, output)
        self._listens[pending] = path
        try:
            return await self._respond(request, message, pending, path, output)
        finally:
            self._listens.pop(pending, None)

    async def _respond(
        self,
        request: web.Request,
        message: Message,
        pending: Pending,
        path: ReturnPath,
        output: Output | None,
        response: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        """Stream what comes for `pending` until its answer (or an InputRequiredResult, or the caller leaves)."""
        started = time.monotonic()
        watch = PeerWatch(request, path)
        try:
            return await self._stream(request, message, pending, path, output, response, started)
        finally:
            watch.stop()

    async def _stream(
        self,
        request: web.Request,
        message: Message,
        pending: Pending,
        path: ReturnPath,
        output: Output | None,
        response: web.StreamResponse | None,
        started: float,
    ) -> web.StreamResponse:
        modern = self.upstream.modern
        last_write = started
        while True:
            kind, item = await path.queue.get()
            if kind == "tick":
                if peer_gone(request):
                    self._caller_left(pending)
                    return response or web.Response(status=499)
                if response is not None and time.monotonic() - last_write >= KEEPALIVE_S:
                    await write_or_gone(response, b": keepalive\n\n")
                    last_write = time.monotonic()
                continue
            if kind == "request" and not modern:
                # The server needs its caller's input: park the call, answer with what it asks.
                wait = self.inputs.park(message, pending, item)
                self.metrics.requests.labels(_label(message["method"]), "input_required").inc()
                return await self._send(
                    request, response, {"jsonrpc": "2.0", "id": message["id"], "result": wait.result()}, output
                )
            if kind == "final":
                self._observe(message, item, started)
                answer = item if modern else self._translate(message, item)
                return await self._send(request, response, answer, output)
            if kind == "request":
                continue  # a 2026-07-28 server sends none; nothing could answer it here
            if output is not None:
                item = await output(item)
                if not item:
                    continue
            if response is None:
                response = web.StreamResponse(headers=SSE_HEADERS)
                await response.prepare(request)
            if not await write_or_gone(response, sse_message(item)):
                self._caller_left(pending)
                return response
            last_write = time.monotonic()

    async def _send(
        self, request: web.Request, response: web.StreamResponse | None, answer: Message, output: Output | None
    ) -> web.StreamResponse:
        if response is None:
            return await self._json(answer, output)
        if output is not None:
            answer = await output(answer) or answer
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof(sse_message(answer))
        return response

    async def _json(self, answer: Message, output: Output | None, status: int | None = None) -> web.Response:
        if output is not None:
            answer = await output(answer) or answer
        if status is None:
            error = answer.get("error")
            status = (
                Refusal(error["code"], "").http_status
                if isinstance(error, dict) and error.get("code") in _STATUS_CODES
                else 200
            )
        return json_response(answer, status)

    def _caller_left(self, pending: Pending) -> None:
        """A closed response stream is a cancellation (2026-07-28)."""
        self.metrics.requests.labels(_label(pending.method), "cancelled").inc()
        self.upstream.mux.withdraw_server_requests(pending, "the caller cancelled the request")
        self.upstream.mux.cancel(pending, "the caller closed its response stream")

    def _observe(self, message: Message, answer: Message, started: float) -> None:
        method = message["method"]
        outcome = "ok" if "result" in answer else "rpc_error"
        self.metrics.requests.labels(_label(method), outcome).inc()
        if method == "tools/call":
            name = (message.get("params") or {}).get("name")
            tool = name if name in self.upstream.tools_by_name else "other"
            self.metrics.call_duration.labels(tool).observe(time.monotonic() - started)

    # -- multi round-trip requests (handshake-era server) ----------------------------------

    async def _resume(
        self, request: web.Request, message: Message, capabilities: dict[str, Any], output: Output | None
    ) -> web.StreamResponse:
        """A caller's retry with the input its parked call needs: the call goes on, on this request."""
        resumed = self.inputs.resume(message, capabilities)
        if not isinstance(resumed, InputWait):
            return await self._json(resumed, output)
        path = ReturnPath()
        if resumed.final is not None:  # the call ended while parked: its answer is this retry's
            path.deliver_final({**resumed.final, "id": message["id"]})
        resumed.pending.sink = path
        return await self._respond(request, message, resumed.pending, path, output)


_STATUS_CODES = frozenset({-32700, -32600, -32602, -32020, -32021, -32022, -32601})
_KNOWN_METHODS = frozenset(
    {"tools/call", "tools/list", "prompts/get", "prompts/list", "resources/read", "resources/list",
     "resources/templates/list", "completion/complete", "subscriptions/listen", "server/discover"}
)  # fmt: skip


def _label(method: str) -> str:
    # Only known methods become label values: callers cannot grow the metric's cardinality.
    return method if method in _KNOWN_METHODS else "other"


def _finish_into(pending: Pending) -> None:
    # The answer goes to whichever sink the call has by then (its retry's, after input).
    pending.future.add_done_callback(lambda f: _final(pending, f.result()))


def _final(pending: Pending, answer: Message) -> None:
    sink = pending.sink
    if isinstance(sink, ReturnPath | InputWait):
        sink.deliver_final(answer)


def _refuse(refusal: Refusal, request_id: Any) -> web.Response:
    return json_response(refusal.answer(request_id), refusal.http_status)


def _not_a_request(request: web.Request, payload: Any) -> web.Response | None:
    """The answer to a body that is not one JSON-RPC request (refused, or a notification accepted and
    dropped); None for a request."""
    if not isinstance(payload, dict):
        return _refuse(Refusal(INVALID_REQUEST, "Invalid Request: a 2026-07-28 body is one JSON-RPC message"), None)
    problem = validate_message(payload)
    if problem:
        return _refuse(Refusal(INVALID_REQUEST, f"Invalid Request: {problem}"), payload.get("id"))
    if is_notification(payload):
        # Nothing to act on (cancellation is closing the stream): accepted and dropped, as the spec allows.
        version = request.headers.get(VERSION_HEADER)
        if version not in SUPPORTED_VERSIONS:
            return _refuse(unsupported(version), None)
        return web.Response(status=202)
    if not is_request(payload):
        return _refuse(
            Refusal(INVALID_REQUEST, "Invalid Request: clients do not send responses at 2026-07-28"), payload.get("id")
        )
    return None
