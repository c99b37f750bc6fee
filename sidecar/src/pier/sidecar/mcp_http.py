"""MCP Streamable HTTP at `/mcp` (revisions 2025-03-26, 2025-06-18, 2025-11-25).

Each client gets its own `Mcp-Session-Id`; its `initialize` is answered from the bridge's cache
and never reaches the server. Requests are relayed through the multiplexer; their progress,
server→client requests and final response stream back on the POST's SSE response; a POST whose
responses come before anything else is answered with plain JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from pier.core.errors import PierError
from pier.core.jsonrpc import (
    INVALID_REQUEST,
    PARSE_ERROR,
    Message,
    TooDeep,
    dumps,
    error_response,
    gateway_error_response,
    is_notification,
    is_request,
    parse,
    validate_message,
)
from pier.core.web import SSE_HEADERS, CoalescedSSE, json_response, read_body
from pier.sidecar.clients import ClientRegistry, ClientSession
from pier.sidecar.metrics import BridgeMetrics
from pier.sidecar.multiplexer import Pending
from pier.sidecar.upstream import Upstream

log = logging.getLogger("pier.sidecar.mcp")

SUPPORTED_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
# A client that sends no MCP-Protocol-Version header is taken to speak 2025-03-26 (spec 2025-06-18).
ASSUMED_VERSION = "2025-03-26"
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
KEEPALIVE_S = 15.0


def sse_event(message: Message) -> bytes:
    return b"event: message\ndata: " + dumps(message) + b"\n\n"


def rpc_error(status: int, code: int, message: str, request_id: Any = None) -> web.Response:
    return web.Response(
        status=status, body=dumps(error_response(request_id, code, message)), content_type="application/json"
    )


class PostStream:
    """The SSE response of one POST: messages tied to its requests, then their responses."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Message, bool]] = asyncio.Queue()

    def deliver(self, message: Message) -> None:
        self.queue.put_nowait((message, False))

    def attach(self, pending: Pending) -> None:
        pending.future.add_done_callback(lambda f: self.queue.put_nowait((f.result(), True)))


class StreamableHTTP:
    """The `/mcp` endpoint: POST (messages), GET (server stream), DELETE (end session)."""

    def __init__(self, upstream: Upstream, clients: ClientRegistry, metrics: BridgeMetrics) -> None:
        self.upstream = upstream
        self.clients = clients
        self.metrics = metrics

    # -- POST ------------------------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return rpc_error(415, INVALID_REQUEST, "Unsupported Media Type: send application/json")
        settings = self.upstream.settings
        try:
            body = await read_body(request, settings.max_message_bytes, settings.body_timeout_s)
        except PierError as err:
            return rpc_error(err.http_status, INVALID_REQUEST, err.message)
        try:
            payload = parse(body)
        except TooDeep as exc:
            self.metrics.rejected.labels("PARSE_ERROR").inc()
            return rpc_error(400, PARSE_ERROR, f"Parse error: {exc}")
        except ValueError:
            self.metrics.rejected.labels("PARSE_ERROR").inc()
            return rpc_error(400, PARSE_ERROR, "Parse error: the body is not valid JSON")
        batch = isinstance(payload, list)
        messages: list[Any] = payload if batch else [payload]
        if not messages:
            return rpc_error(400, INVALID_REQUEST, "Invalid Request: empty batch")
        for message in messages:
            problem = validate_message(message)
            if problem:
                request_id = message.get("id") if isinstance(message, dict) else None
                return rpc_error(400, INVALID_REQUEST, f"Invalid Request: {problem}", request_id)

        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in SUPPORTED_VERSIONS:
            return rpc_error(
                400,
                INVALID_REQUEST,
                f"Bad Request: unsupported {VERSION_HEADER} {version!r}; supported: " + ", ".join(SUPPORTED_VERSIONS),
            )
        if any(m.get("method") == "initialize" for m in messages):
            if len(messages) > 1:
                return rpc_error(400, INVALID_REQUEST, "Invalid Request: initialize must not be batched")
            return await self._initialize(messages[0])

        client = self._session(request)
        if isinstance(client, web.Response):
            return client
        requests: list[Message] = []
        for message in messages:
            if is_request(message):
                requests.append(message)
            elif is_notification(message):
                self.upstream.mux.client_notification(client, message)
            else:
                self.upstream.mux.client_response(client, message)
        if not requests:
            return web.Response(status=202)
        return await self._relay(request, client, requests, batch)

    async def _initialize(self, message: Message) -> web.Response:
        if not is_request(message):
            return rpc_error(400, INVALID_REQUEST, "Invalid Request: initialize must be a request")
        params = message.get("params") or {}
        try:
            await self.upstream.wait_ready()
        except PierError as err:
            self.metrics.requests.labels("initialize", err.code).inc()
            return json_response(gateway_error_response(message["id"], err))
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        client = self.clients.create(version, params.get("capabilities") or {}, params.get("clientInfo") or {})
        self.metrics.clients.set(len(self.clients.sessions))
        self.metrics.requests.labels("initialize", "ok").inc()
        result = {**(self.upstream.init_result or {}), "protocolVersion": version}
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        return json_response(answer, headers={SESSION_HEADER: client.id})

    def _session(self, request: web.Request, end: bool = False) -> ClientSession | web.Response:
        """The client session the request names (ended, with `end`), or the error answer."""
        session_id = request.headers.get(SESSION_HEADER)
        if not session_id:
            return rpc_error(400, INVALID_REQUEST, f"Bad Request: {SESSION_HEADER} header is required")
        client = self.clients.remove(session_id) if end else self.clients.get(session_id)
        if client is None:
            return rpc_error(404, INVALID_REQUEST, "Session not found: initialize a new session")
        return client

    def _local_answer(self, message: Message) -> Message | None:
        """Answer what the bridge knows without asking the server."""
        method = message["method"]
        if method == "ping":
            return {"jsonrpc": "2.0", "id": message["id"], "result": {}}
        if method == "tools/list" and self.upstream.tools_by_name and not (message.get("params") or {}).get("cursor"):
            return {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": self.upstream.tools}}
        return None

    async def _relay(
        self, request: web.Request, client: ClientSession, requests: list[Message], batch: bool
    ) -> web.StreamResponse:
        answered: list[Message] = []
        forwarded: list[Message] = []
        for message in requests:
            answer = self._local_answer(message)
            if answer is not None:
                self.metrics.requests.labels(message["method"], "ok").inc()
                answered.append(answer)
            else:
                forwarded.append(message)
        if not forwarded:
            return json_response(answered if batch else answered[0])

        stream = PostStream()
        waiting = 0
        for message in forwarded:
            try:
                pending = await self.upstream.begin(message, client, stream)
            except PierError as err:
                self.metrics.requests.labels(message["method"], err.code).inc()
                answered.append(gateway_error_response(message["id"], err))
                continue
            self._observe(message, pending)
            stream.attach(pending)
            waiting += 1

        accept = request.headers.get("Accept", "")
        sse_ok = "text/event-stream" in accept
        # The spec lets a server answer a POST with JSON or with SSE. JSON is one response and one
        # write, so it is the answer whenever nothing else (progress, a server request) comes
        # first; SSE only when something does, or when the client accepts nothing else.
        first: Message | None = None
        if not sse_ok or "application/json" in accept:
            while waiting:
                message, final = await stream.queue.get()
                if final:
                    answered.append(message)
                    waiting -= 1
                elif sse_ok:
                    first = message
                    break
                # else: a JSON-only client gets the responses without what came before them.
            if first is None:
                return json_response(answered if batch else answered[0])

        response = CoalescedSSE(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            for message in answered:
                await response.write(sse_event(message))
            if first is not None:
                await response.write(sse_event(first))
            while waiting:
                message, final = await stream.queue.get()
                waiting -= final
                event = sse_event(message)
                # The last event goes out with the end of the stream: one write, not two.
                await (response.write(event) if waiting else response.write_eof(event))
        except ConnectionResetError:
            # A dropped stream is not a cancellation (spec); the calls finish, unheard.
            log.info("client closed its POST stream early", extra={"client": client.id})
        return response

    def _observe(self, message: Message, pending: Pending) -> None:
        method = pending.method
        tool = None
        if method == "tools/call":
            name = (message.get("params") or {}).get("name")
            # Only known tool names become label values: callers cannot grow the metric's cardinality.
            tool = name if name in self.upstream.tools_by_name else "other"

        def done(future: asyncio.Future[Message]) -> None:
            self.metrics.requests.labels(method, _outcome(future)).inc()
            if tool is not None:
                self.metrics.call_duration.labels(tool).observe(time.monotonic() - pending.started)

        pending.future.add_done_callback(done)

    # -- GET -------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return rpc_error(406, INVALID_REQUEST, "Not Acceptable: GET needs Accept: text/event-stream")
        client = self._session(request)
        if isinstance(client, web.Response):
            return client
        response = web.StreamResponse(headers=SSE_HEADERS)
        client.get_streams += 1
        try:
            await response.prepare(request)
            while True:
                try:
                    message = await asyncio.wait_for(client.outbox.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if message is None:
                    break
                await response.write(sse_event(message))
        except ConnectionResetError:
            pass
        finally:
            client.get_streams -= 1
        return response

    # -- DELETE ----------------------------------------------------------------------------

    async def delete(self, request: web.Request) -> web.Response:
        client = self._session(request, end=True)
        if isinstance(client, web.Response):
            return client
        self.upstream.mux.cancel_client(client, "client session ended")
        self.metrics.clients.set(len(self.clients.sessions))
        return web.Response(status=204)


def _outcome(future: asyncio.Future[Message]) -> str:
    response = future.result()
    if "error" not in response:
        return "ok"
    data = response["error"].get("data")
    return data["code"] if isinstance(data, dict) and isinstance(data.get("code"), str) else "rpc_error"
