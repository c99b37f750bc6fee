"""MCP Streamable HTTP at `/mcp`: revisions 2025-03-26, 2025-06-18, 2025-11-25 and 2026-07-28.

Each request goes the way its revision says (`pier.core.protocol.is_modern_request`): 2026-07-28
requests are stateless and served by `pier.sidecar.stateless`; the handshake revisions give each
client its own `Mcp-Session-Id`, whose `initialize` is answered from the bridge's cache and never
reaches the server. Their requests are relayed through the multiplexer; progress, server→client
requests, log records and final responses of a POST stream back on that POST's response (plain
JSON when the responses come before anything else). SSE events carry ids at 2025-11-25, and a
client whose stream dropped resumes it with `GET` and `Last-Event-ID`.

`handle` is the one entry, over HTTP (`post`/`get`/`delete`) and for the router's relay when the
bridge lives in the router's process (the body parsed once, by the router).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from aiohttp import web

from pier.core.callapi import ClientState, Output
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
from pier.core.protocol import (
    ASSUMED_VERSION,
    HANDSHAKE_VERSIONS,
    SESSION_HEADER,
    VERSION_HEADER,
    era_mismatch,
    is_modern_request,
)
from pier.core.web import (
    KEEPALIVE_S,
    PEER_POLL_S,
    SSE_HEADERS,
    CoalescedSSE,
    json_response,
    peer_gone,
    read_body,
    sse_message,
    write_or_gone,
)
from pier.sidecar.clients import ClientRegistry, ClientSession, EventStream
from pier.sidecar.metrics import BridgeMetrics
from pier.sidecar.multiplexer import ALL_LOGS, NO_SINK, Pending
from pier.sidecar.stateless import StatelessHTTP
from pier.sidecar.upstream import Eras, Upstream

log = logging.getLogger("pier.sidecar.mcp")

SUPPORTED_VERSIONS = HANDSHAKE_VERSIONS  # the handshake revisions a client may ask for at initialize
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
_REPLAY_TIMEOUT_S = 10.0  # a resumed client's replayed request (its log level, a subscription)
_REPLAY_IDS = itertools.count(1)
__all__ = ["ASSUMED_VERSION", "LATEST_VERSION", "SESSION_HEADER", "SUPPORTED_VERSIONS", "StreamableHTTP"]


def rpc_error(status: int, code: int, message: str, request_id: Any = None) -> web.Response:
    return web.Response(
        status=status, body=dumps(error_response(request_id, code, message)), content_type="application/json"
    )


def _single_id(payload: Any) -> Any:
    """The id of a body that is one request (errors about the whole body then carry it)."""
    return payload.get("id") if isinstance(payload, dict) else None


class PostStream:
    """Messages tied to one POST's requests, then their responses (a sink of the multiplexer)."""

    def __init__(self, queue: asyncio.Queue[tuple[Message, bool]]) -> None:
        self.queue = queue

    def deliver(self, message: Message) -> None:
        self.queue.put_nowait((message, False))

    def attach(self, pending: Pending) -> None:
        pending.future.add_done_callback(lambda f: self.queue.put_nowait((f.result(), True)))


class StreamableHTTP:
    """The `/mcp` endpoint: POST (messages), GET (server stream), DELETE (end session)."""

    def __init__(self, eras: Eras, clients: ClientRegistry, metrics: BridgeMetrics) -> None:
        self.eras = eras
        self.upstream = eras.primary  # the call API's run, and 2026-07-28 callers'
        self.clients = clients
        self.metrics = metrics
        self.stateless = StatelessHTTP(self.upstream, metrics, self.upstream.settings.input_wait_s)

    def broadcast(self, message: Message) -> None:
        """A server notification that belongs to no call: every GET stream and every listener."""
        self.clients.broadcast(message)
        self.stateless.broadcast(message)

    # -- HTTP ------------------------------------------------------------------------------

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
        return await self.handle(request, payload)

    async def get(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, None)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, None)

    async def handle(self, request: web.Request, payload: Any, output: Output | None = None) -> web.StreamResponse:
        """Serve one request whose body, if any, is parsed (`payload`); `output` filters what goes back."""
        if is_modern_request(request.headers.get(VERSION_HEADER)):
            if request.method != "POST":
                return web.Response(status=405, headers={"Allow": "POST"})
            return await self.stateless.serve(request, payload, output)
        mismatch = era_mismatch(payload, request.headers.get(VERSION_HEADER))
        if mismatch is not None:
            # A body that claims 2026-07-28 under a handshake revision's header: refused, sent nowhere.
            self.metrics.rejected.labels("PROTOCOL").inc()
            return json_response(mismatch.answer(_single_id(payload)), mismatch.http_status)
        if request.method == "GET":
            return await self._get(request, output)
        if request.method == "DELETE":
            return self._delete(request)
        return await self._post(request, payload, output)

    # -- POST (handshake revisions) --------------------------------------------------------

    async def _post(self, request: web.Request, payload: Any, output: Output | None) -> web.StreamResponse:
        batch = isinstance(payload, list)
        messages: list[Any] = payload if batch else [payload]
        if not messages:
            return rpc_error(400, INVALID_REQUEST, "Invalid Request: empty batch")
        for message in messages:
            problem = validate_message(message)
            if problem:
                request_id = message.get("id") if isinstance(message, dict) else None
                return rpc_error(400, INVALID_REQUEST, f"Invalid Request: {problem}", request_id)
        request_id = _single_id(payload)
        if any(m.get("method") == "initialize" for m in messages):
            if len(messages) > 1:
                return rpc_error(400, INVALID_REQUEST, "Invalid Request: initialize must not be batched")
            return await self._initialize(messages[0], output)

        client = self._session(request, request_id=request_id)
        if isinstance(client, web.Response):
            return client
        requests: list[Message] = []
        mux = self.eras.handshake_now().mux
        for message in messages:
            if is_request(message):
                requests.append(message)
            elif is_notification(message):
                mux.client_notification(client, message)
            else:
                mux.client_response(client, message)
        if not requests:
            return web.Response(status=202)
        try:
            run = await self.eras.for_handshake()
        except PierError as err:
            answers = [gateway_error_response(m["id"], err) for m in requests]
            return json_response(answers if batch else answers[0], err.http_status)
        return await self._relay(request, run, client, requests, batch, output)

    async def _initialize(self, message: Message, output: Output | None) -> web.Response:
        if not is_request(message):
            return rpc_error(400, INVALID_REQUEST, "Invalid Request: initialize must be a request")
        params = message.get("params") or {}
        try:
            await self.upstream.wait_ready()
        except PierError as err:
            self.metrics.requests.labels("initialize", err.code).inc()
            return json_response(gateway_error_response(message["id"], err))
        # A server that speaks 2026-07-28 on a pipe that takes one era: this caller's run starts now,
        # while it is answered from the first run's server/discover (its requests wait for its run).
        self.eras.start_secondary()
        run = self.eras.handshake_now()
        init = run.init_result if run.ready else self.upstream.init_result
        client = self._new_client(params)
        self.metrics.requests.labels("initialize", "ok").inc()
        result = {**(init or {}), "protocolVersion": client.protocol_version}
        answer: Message = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        if output is not None:
            answer = await output(answer) or answer
        return json_response(answer, headers={SESSION_HEADER: client.id})

    def _new_client(self, params: dict[str, Any], session_id: str | None = None) -> ClientSession:
        """A client session as its `initialize` params ask (the revision negotiated as the spec says)."""
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        capabilities, info = params.get("capabilities"), params.get("clientInfo")
        client = self.clients.create(
            version, capabilities if isinstance(capabilities, dict) else {}, info if isinstance(info, dict) else {},
            session_id,
        )  # fmt: skip
        self.metrics.clients.set(len(self.clients.sessions))
        return client

    async def resume(self, state: ClientState) -> bool:
        """Recreate a client session another bridge (or this one, before it lost it) served, under its id,
        as its client set it up; False when it is here already.

        Its `initialize` is answered again from the cache (as every client's is: the server was initialized
        once, and a client's `notifications/initialized` ends at the bridge), so only what the client told
        the server since is replayed: its log level and its resource subscriptions.
        """
        if state.session_id in self.clients.sessions:
            return False
        # As at an initialize: which run is the client's is known once the server has said which eras it
        # speaks (while it starts, or probes it, the first run looks like a handshake-only server, or like
        # a 2026-07-28 one: a new bridge's resumes would go to the wrong run, or start a needless one).
        await self.upstream.wait_ready()
        run = await self.eras.for_handshake()
        if state.session_id in self.clients.sessions:
            return False  # a concurrent resume of the same session made it while this one waited
        client = self._new_client(state.initialize, state.session_id)
        replayed: list[Message] = []
        if state.log_level is not None:
            replayed.append(_replay_request("logging/setLevel", {"level": state.log_level}))
        replayed += [_replay_request("resources/subscribe", {"uri": uri}) for uri in state.subscriptions]
        for message in replayed:
            await self._replay(run, client, message)
        log.info("client session resumed", extra={"client": client.id, "replayed": len(replayed)})
        return True

    async def _replay(self, run: Upstream, client: ClientSession, message: Message) -> None:
        """One request of a resumed client's, sent as the client sent it first; a refusal is logged, not fatal
        (the server refused it the first time too, or no longer offers it)."""
        if self._local_answer(run, client, message) is not None:
            return
        try:
            pending = await run.begin(message, client, NO_SINK)
        except PierError as err:
            why = err.message
            log.warning("could not replay a resumed client's request", extra={"method": message["method"], "why": why})
            return
        self._observe(run, message, pending)
        try:
            response = await asyncio.wait_for(asyncio.shield(pending.future), _REPLAY_TIMEOUT_S)
        except TimeoutError:
            run.mux.cancel(pending, "replay timed out")
            response = error_response(message["id"], INVALID_REQUEST, "timed out")
        if "error" in response:
            refusal = {"method": message["method"], "why": response["error"].get("message")}
            log.warning("the server refused a resumed client's request", extra=refusal)

    def _session(self, request: web.Request, end: bool = False, request_id: Any = None) -> ClientSession | web.Response:
        """The client session the request names (ended, with `end`), or the error answer."""
        session_id = request.headers.get(SESSION_HEADER)
        if not session_id:
            return rpc_error(400, INVALID_REQUEST, f"Bad Request: {SESSION_HEADER} header is required", request_id)
        client = self.clients.remove(session_id) if end else self.clients.get(session_id)
        if client is None:
            return rpc_error(404, INVALID_REQUEST, "Session not found: initialize a new session", request_id)
        return client

    def _local_answer(self, run: Upstream, client: ClientSession, message: Message) -> Message | None:
        """Answer what the bridge knows without asking the server."""
        method = message["method"]
        if method == "ping":
            return {"jsonrpc": "2.0", "id": message["id"], "result": {}}
        if method == "tools/list" and run.tools_by_name and not (message.get("params") or {}).get("cursor"):
            return {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": run.tools}}
        if method == "logging/setLevel" and run.modern:
            # A 2026-07-28 server takes the level with each request: the bridge remembers it.
            level = (message.get("params") or {}).get("level")
            client.log_level = level if isinstance(level, str) else client.log_level
            return {"jsonrpc": "2.0", "id": message["id"], "result": {}}
        return None

    async def _relay(
        self,
        request: web.Request,
        run: Upstream,
        client: ClientSession,
        requests: list[Message],
        batch: bool,
        output: Output | None,
    ) -> web.StreamResponse:
        answered: list[Message] = []
        forwarded: list[Message] = []
        for message in requests:
            answer = self._local_answer(run, client, message)
            if answer is not None:
                self.metrics.requests.labels(message["method"], "ok").inc()
                answered.append(answer)
            else:
                forwarded.append(message)
        if not forwarded:
            return await _answers(answered, batch, output)

        stream = client.new_stream(post=True)
        await self._begin(run, client, stream, forwarded, answered)
        accept = request.headers.get("Accept", "")
        sse_ok = "text/event-stream" in accept
        # The spec lets a server answer a POST with JSON or with SSE. JSON is one response and one
        # write, so it is the answer whenever nothing else (progress, a server request) comes
        # first; SSE only when something does, or when the client accepts nothing else.
        first: Message | None = None
        if not sse_ok or "application/json" in accept:
            first = await _answers_until_other(stream, answered, sse_ok)
            if first is None:
                client.streams.pop(stream.id, None)
                return await _answers(answered, batch, output)

        response = CoalescedSSE(headers=SSE_HEADERS)
        await response.prepare(request)
        events: list[bytes] = [stream.event(None)] if client.resumable else []
        for message in [*answered, *([first] if first is not None else [])]:
            events.append(await self._event(client, stream, message, output))
        if not await write_or_gone(response, b"".join(events)):
            stream.detach()
            return response
        await self._pump(request, response, client, stream, output)
        return response

    async def _begin(
        self,
        run: Upstream,
        client: ClientSession,
        stream: EventStream,
        requests: list[Message],
        answered: list[Message],
    ) -> None:
        """Send a POST's requests to the server, their messages to `stream`; one refused is answered at once."""
        assert stream.queue is not None
        sink = PostStream(stream.queue)
        level = client.log_level if run.modern else ALL_LOGS
        for message in requests:
            try:
                pending = await run.begin(message, client, sink, capabilities=client.capabilities, log_level=level)
            except PierError as err:
                self.metrics.requests.labels(message["method"], err.code).inc()
                answered.append(gateway_error_response(message["id"], err))
                continue
            self._observe(run, message, pending)
            sink.attach(pending)
            stream.waiting += 1

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        client: ClientSession,
        stream: EventStream,
        output: Output | None,
    ) -> None:
        """Write a POST's stream until its last answer; a dropped connection leaves it resumable."""
        assert stream.queue is not None
        stream.attached = True
        stream.released.clear()
        while stream.waiting:
            try:
                async with asyncio.timeout(PEER_POLL_S):
                    message, final = await stream.queue.get()
            except TimeoutError:
                if peer_gone(request):
                    # A dropped stream is not a cancellation (2025 revisions); it waits for a resume.
                    stream.detach()
                    return
                continue
            stream.waiting -= final
            event = await self._event(client, stream, message, output)
            # The last event goes out with the end of the stream: one write, not two.
            try:
                await (response.write(event) if stream.waiting else response.write_eof(event))
            except (ConnectionResetError, RuntimeError):
                log.info("client closed its POST stream early", extra={"client": client.id})
                stream.detach()
                return
        client.streams.pop(stream.id, None)  # everything was delivered: nothing left to resume
        stream.detach()

    async def _event(
        self, client: ClientSession, stream: EventStream, message: Message, output: Output | None
    ) -> bytes:
        if output is not None:
            filtered = await output(message)
            if not filtered:
                return b": withheld by policy\n\n"
            message = filtered
        return stream.event(message) if client.resumable else sse_message(message)

    def _observe(self, run: Upstream, message: Message, pending: Pending) -> None:
        method = pending.method
        tool = None
        if method == "tools/call":
            name = (message.get("params") or {}).get("name")
            # Only known tool names become label values: callers cannot grow the metric's cardinality.
            tool = name if name in run.tools_by_name else "other"

        def done(future: asyncio.Future[Message]) -> None:
            self.metrics.requests.labels(method, _outcome(future)).inc()
            if tool is not None:
                self.metrics.call_duration.labels(tool).observe(time.monotonic() - pending.started)

        pending.future.add_done_callback(done)

    # -- GET (handshake revisions) ---------------------------------------------------------

    async def _get(self, request: web.Request, output: Output | None) -> web.StreamResponse:
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return rpc_error(406, INVALID_REQUEST, "Not Acceptable: GET needs Accept: text/event-stream")
        client = self._session(request)
        if isinstance(client, web.Response):
            return client
        resumed = None
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id and client.resumable:
            resumed = client.find_stream(last_event_id)
        # Headers go out at once: a client may wait for them before it does anything else.
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        if resumed is not None:
            stream, seen = resumed
            # The connection it replaces may not be noticed gone yet: its writer lets go first.
            if stream.queue is not None and stream.attached:
                await stream.released.wait()
            if not await write_or_gone(response, b"".join(stream.after(seen))):
                return response
            if stream.queue is not None:
                # The rest of a POST's stream, on this response; it ends with its last answer.
                await self._pump(request, response, client, stream, output)
                return response
        else:
            stream = client.new_stream(post=False)
        await self._listen(request, response, client, stream, output)
        return response

    async def _listen(
        self,
        request: web.Request,
        response: web.StreamResponse,
        client: ClientSession,
        stream: EventStream,
        output: Output | None,
    ) -> None:
        client.get_streams += 1
        try:
            last_write = time.monotonic()
            while True:
                try:
                    async with asyncio.timeout(PEER_POLL_S):
                        message = await client.outbox.get()
                except TimeoutError:
                    if peer_gone(request):
                        return
                    if time.monotonic() - last_write >= KEEPALIVE_S:
                        await response.write(b": keepalive\n\n")
                        last_write = time.monotonic()
                    continue
                if message is None:
                    break
                await response.write(await self._event(client, stream, message, output))
                last_write = time.monotonic()
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            client.get_streams -= 1

    # -- DELETE ----------------------------------------------------------------------------

    def _delete(self, request: web.Request) -> web.Response:
        client = self._session(request, end=True)
        if isinstance(client, web.Response):
            return client
        for run in self.eras.all:
            run.mux.cancel_client(client, "client session ended")
        self.metrics.clients.set(len(self.clients.sessions))
        return web.Response(status=204)


async def _answers(answered: list[Message], batch: bool, output: Output | None) -> web.Response:
    """A POST's answers as one JSON response."""
    if output is not None:
        answered = [await output(m) or m for m in answered]
    return json_response(answered if batch else answered[0])


async def _answers_until_other(stream: EventStream, answered: list[Message], sse_ok: bool) -> Message | None:
    """Collect the stream's answers into `answered` until the last, or until something else comes first
    (returned) for a client that takes SSE; a JSON-only client gets the answers without the rest."""
    assert stream.queue is not None
    while stream.waiting:
        message, final = await stream.queue.get()
        if final:
            answered.append(message)
            stream.waiting -= 1
        elif sse_ok:
            return message
    return None


def _replay_request(method: str, params: dict[str, Any]) -> Message:
    return {"jsonrpc": "2.0", "id": f"pier-resume-{next(_REPLAY_IDS)}", "method": method, "params": params}


def _outcome(future: asyncio.Future[Message]) -> str:
    response = future.result()
    if "error" not in response:
        return "ok"
    data = response["error"].get("data")
    return data["code"] if isinstance(data, dict) and isinstance(data.get("code"), str) else "rpc_error"
