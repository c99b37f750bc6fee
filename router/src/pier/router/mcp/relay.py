"""The native MCP relay: `/v1/users/{user}/servers/{server}/mcp`, to the session's bridge.

Every revision the bridge serves passes (2025-03-26 … 2026-07-28), chosen per request by the
bridge as the spec says. The body is parsed once, here: each message goes through the ingress
pipeline (`auth.ingress`: tool rules and the policy hook on the way in, the output policy and each
tool call's audit and accounting on the way out, through a `Checkpoint`). A bridge in the router's own
process gets the parsed body directly (its `/mcp` handler writes this response: no second HTTP
hop); one elsewhere gets it over HTTP, with the session's token in place of the caller's key, and
its answer (JSON or SSE) is streamed back.

Tasks: a caller that takes them has its `tools/call` run by the call service, so a call that
overruns the profile's timeout becomes a task backed by the job pool, and `tasks/*` about Pier's
jobs are answered here from Redis (`tasks`). A 2026-07-28 caller that closes its response stream
cancels its request — except a call that became a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pier.core.callapi import BridgeUnreachable, Output
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import PARSE_ERROR, Message, TooDeep, dumps, error_response, gateway_error_response, loads
from pier.core.policy import Caller, PolicyDenied
from pier.core.protocol import (
    HTTP_STATUS,
    TASK_METHODS,
    TASKS_EXTENSION,
    VERSION_HEADER,
    Refusal,
    check_request,
    is_modern_request,
)
from pier.core.web import PEER_POLL_S, CoalescedSSE, json_response, origin_allowed, peer_gone
from pier.router.backends.base import Session, hold
from pier.router.mcp.messages import (
    Checkpoint,
    connection_answer,
    is_batch,
    messages_in,
    parse_body,
    too_deep_response,
    without_connect_state,
)
from pier.router.mcp.tasks import Tasks, wants_tasks
from pier.router.middleware import RECEIVED
from pier.router.shared import USERS, read_request_body, user_of, with_connect_url
from pier.router.state import Router, router_of

# Headers of the MCP transport that pass through; everything else stays on its side.
_REQUEST_HEADERS = (
    "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID", "Mcp-Method", "Mcp-Name",
)  # fmt: skip
_PARAM_PREFIX = "mcp-param-"
_RESPONSE_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control", "Allow")
# What a handshake-era caller is told Pier can do with tasks (2025-11-25).
_TASK_CAPABILITY: dict[str, Any] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}


def _session_starting(messages: list[Message], batch: bool) -> web.Response:
    """503 with a JSON-RPC error per request: the session is starting (it goes on); retry shortly."""
    err = PierError("SESSION_STARTING", "the session is still starting; retry shortly", {"retry_after_s": 1})
    errors = [gateway_error_response(m["id"], err) for m in messages if "id" in m and "method" in m]
    body = errors if batch else (errors[0] if errors else gateway_error_response(None, err))
    return json_response(body, 503, {"Retry-After": "1"})


class Advertiser:
    """What the caller learns of Pier's tasks: the capability in `initialize` (2025-11-25) and
    `server/discover` (2026-07-28) answers, and task support on each listed tool (2025-11-25)."""

    def __init__(self, messages: list[Message], modern: bool) -> None:
        wanted = ("server/discover",) if modern else ("initialize", "tools/list")
        self.methods = {m["id"]: m["method"] for m in messages if "id" in m and m.get("method") in wanted}

    @property
    def needed(self) -> bool:
        return bool(self.methods)

    def __call__(self, message: Message) -> Message:
        method = self.methods.get(message.get("id")) if "id" in message else None
        result = message.get("result")
        if method is None or not isinstance(result, dict):
            return message
        capabilities = result.get("capabilities")
        if method == "initialize" and isinstance(capabilities, dict) and "tasks" not in capabilities:
            result = {**result, "capabilities": {**capabilities, "tasks": _TASK_CAPABILITY}}
        elif method == "server/discover" and isinstance(capabilities, dict):
            extensions = {**(capabilities.get("extensions") or {}), TASKS_EXTENSION: {}}
            result = {**result, "capabilities": {**capabilities, "extensions": extensions}}
        elif method == "tools/list" and isinstance(result.get("tools"), list):
            tools = [
                t if not isinstance(t, dict) or "execution" in t else {**t, "execution": {"taskSupport": "optional"}}
                for t in result["tools"]
            ]
            result = {**result, "tools": tools}
        else:
            return message
        return {**message, "result": result}


@dataclass
class Relayed:
    """One caller's request on its way to the session's bridge: its body, read and parsed once, and the
    headers of the MCP transport that pass on."""

    method: str
    body: bytes | None
    payload: Any
    headers: dict[str, str]
    modern: bool  # a 2026-07-28 request (`is_modern_request`)
    messages: list[Message] = field(init=False)
    single: Message | None = field(init=False)  # the body is one request (not a batch of one)

    def __post_init__(self) -> None:
        self.messages = [] if self.payload is None else messages_in(self.payload)
        one = len(self.messages) == 1 and not isinstance(self.payload, list) and "id" in self.messages[0]
        self.single = self.messages[0] if one else None

    @classmethod
    async def read(cls, request: web.Request) -> Relayed:
        """The request's body and headers; raises TooDeep for a body nested too deeply."""
        body = await read_request_body(request) if request.method == "POST" else None
        headers = {name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers}
        headers.update({k: v for k, v in request.headers.items() if k.lower().startswith(_PARAM_PREFIX)})
        modern = is_modern_request(request.headers.get(VERSION_HEADER))
        payload = parse_body(body)
        if modern and isinstance(payload, dict):
            # The retry of a request Pier asked to connect an account first: what Pier asked is not the server's.
            retried = without_connect_state(payload)
            if retried is not None:
                payload, body = retried, dumps(retried)
        return cls(request.method, body, payload, headers, modern)

    @property
    def batch(self) -> bool:
        return is_batch(self.body)

    @property
    def holds_a_stream(self) -> bool:
        """A GET stream or a `subscriptions/listen`: held open, not a call in flight."""
        return self.method == "GET" or (self.single is not None and self.single.get("method") == "subscriptions/listen")


async def relay(request: web.Request) -> web.StreamResponse:
    router = router_of(request)
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, router.settings.allowed_origins):
        raise PierError("FORBIDDEN", f"origin {origin!r} is not allowed")
    caller, profile = await router.ingress.admit(request, user_of(request), request.match_info["server"], "mcp")
    try:
        relayed = await Relayed.read(request)
    except TooDeep as exc:
        return too_deep_response(exc)
    answered = await _answer_here(request, router, caller, profile, relayed)
    if answered is not None:
        return answered
    checkpoint = Checkpoint(router.ingress, caller)
    if relayed.messages:
        try:
            await checkpoint.check_input(relayed.messages)
        except PolicyDenied as denied:
            errors = [gateway_error_response(m["id"], denied) for m in relayed.messages if "id" in m and "method" in m]
            if not errors:
                raise
            return json_response(errors if relayed.batch else errors[0])
    output = _output_filter(request, checkpoint, Advertiser(relayed.messages, relayed.modern))
    try:
        return await _serve(request, router, profile, relayed, output)
    except PierError as err:
        if err.code != "CONNECTION_REQUIRED" or request.method != "POST" or not relayed.messages:
            raise
        return _connection_required(request, relayed, with_connect_url(request, err))


def _connection_required(request: web.Request, relayed: Relayed, err: PierError) -> web.Response:
    """The session cannot start before the user connects their account: each request is answered with a
    way to connect that its client can show (`connection_answer`)."""
    requests = [m for m in relayed.messages if "id" in m and "method" in m]
    if not requests:
        return web.Response(status=202)
    answers = [connection_answer(m, err, _revision(request, m), relayed.modern) for m in requests]
    status = err.http_status if relayed.modern and "error" in answers[0] else 200
    return json_response(answers if relayed.batch else answers[0], status)


def _revision(request: web.Request, message: Message) -> str | None:
    """The revision a handshake-era request speaks: its header, or what an `initialize` asks for."""
    if message.get("method") == "initialize":
        version = (message.get("params") or {}).get("protocolVersion")
        return version if isinstance(version, str) else None
    return request.headers.get(VERSION_HEADER)


async def _answer_here(
    request: web.Request, router: Router, caller: Caller, profile: Profile, relayed: Relayed
) -> web.StreamResponse | None:
    """What the router answers itself, before any session: a 2026-07-28 request the spec refuses,
    `tasks/*` about Pier's jobs, and a call from a caller that takes tasks. None: the bridge answers."""
    single = relayed.single
    if single is None:
        return None
    if relayed.modern:
        # The spec's checks come before Pier's own answers (tasks), as the bridge makes them.
        try:
            check_request(single, request.headers)
        except Refusal as refusal:
            return json_response(refusal.answer(single["id"]), refusal.http_status)
    if single.get("method") in TASK_METHODS:
        answer = await Tasks(router, caller, profile, relayed.modern).answer(single)
        if answer is not None:
            return _json_answer(answer, relayed.modern)
    if wants_tasks(single, relayed.modern):
        # Rules, policy and audit are the call service's, as for a REST call.
        return await _task_call(request, router, caller, profile, single, relayed.modern)
    return None


def _output_filter(request: web.Request, checkpoint: Checkpoint, advertise: Advertiser) -> Output | None:
    """What each message back passes (Pier's task support advertised, the output policy), or None
    when nothing needs to look at them."""
    inspect = checkpoint.inspects_output and request.method != "DELETE"
    if not (inspect or advertise.needed):
        return None

    async def output(message: Message) -> Message:
        if advertise.needed:
            message = advertise(message)
        return await checkpoint.check_output(message) if inspect else message

    return output


async def _serve(
    request: web.Request, router: Router, profile: Profile, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    """The request through the user's session of the profile (started if need be)."""
    user = user_of(request)
    if relayed.holds_a_stream:
        # A held stream is not a call in flight: it must not keep an idle session alive forever.
        session = await router.backend.acquire(user, profile)
        return await _to_bridge(router, request, session, relayed, output)
    # One deadline, as for REST calls: a session still starting when the profile's timeout (counted
    # from the request's arrival) runs out is an answer to retry, not a wait past the caller's patience.
    deadline = request[RECEIVED] + router.calls.timeout_for(profile, None)
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            session = await router.backend.acquire(user, profile)
    except TimeoutError:
        return _session_starting(relayed.messages, relayed.batch)
    async with hold(session):
        try:
            return await _to_bridge(router, request, session, relayed, output)
        except BridgeUnreachable:
            await router.backend.forget(session, "unreachable")
    # The bridge was gone: a fresh session answers (an old MCP session id gets its 404 there).
    async with router.backend.use(user, profile) as session:
        return await _to_bridge(router, request, session, relayed, output)


def _json_answer(answer: Message, modern: bool) -> web.Response:
    error = answer.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = HTTP_STATUS.get(code, 200) if modern and isinstance(code, int) else 200
    return json_response(answer, status)


async def _task_call(
    request: web.Request, router: Router, caller: Caller, profile: Profile, message: Message, modern: bool
) -> web.StreamResponse:
    """A tools/call from a caller that takes tasks: its answer, or a task if it overruns."""
    job_id = uuid.uuid4().hex
    work = asyncio.ensure_future(Tasks(router, caller, profile, modern).call(message, job_id, request[RECEIVED]))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=PEER_POLL_S)
            if not work.done() and modern and peer_gone(request):
                # The caller closed its stream before the call became a task: a cancellation.
                work.cancel()
                with contextlib.suppress(PierError):
                    session = await router.backend.acquire(caller.user, profile)
                    await session.bridge.cancel_call(job_id)
                return web.Response(status=499)
        answer = work.result()
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    error = answer.get("error")
    data = error.get("data") if isinstance(error, dict) else None
    if isinstance(error, dict) and isinstance(data, dict) and data.get("code") == "CONNECTION_REQUIRED":
        err = with_connect_url(request, PierError("CONNECTION_REQUIRED", str(error.get("message")), dict(data)))
        err.details.pop("code", None)
        answer = connection_answer(message, err, request.headers.get(VERSION_HEADER), modern)
    return _json_answer(answer, modern)


async def _to_bridge(
    router: Router, request: web.Request, session: Session, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    if session.bridge.mcp is not None:
        # The bridge is in this process: its handler serves this very request, body parsed already.
        if request.method == "POST":
            if request.content_type != "application/json":
                return json_response(error_response(None, -32600, "Unsupported Media Type: send application/json"), 415)
            if relayed.payload is None:
                return json_response(error_response(None, PARSE_ERROR, "Parse error: the body is not valid JSON"), 400)
        with router.streaming():
            return await session.bridge.mcp.handle(request, relayed.payload, output)
    return await _forward(router, request, session, relayed, output)


async def _forward(
    router: Router, request: web.Request, session: Session, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    """The request over HTTP to a bridge elsewhere, with the session's token in place of the caller's key."""
    try:
        upstream = await router.http.request(
            request.method,
            session.endpoint.url + "/mcp",
            headers={**relayed.headers, **session.endpoint.headers()},
            data=relayed.body,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ssl=router.bridge_ssl,
        )
    except (aiohttp.ClientError, OSError) as exc:
        raise BridgeUnreachable(session.endpoint, exc) from exc
    async with upstream:
        out_headers = {name: upstream.headers[name] for name in _RESPONSE_HEADERS if name in upstream.headers}
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if not is_sse and request.method != "GET":
            return await _forward_json(request, upstream, out_headers, output)
        return await _forward_stream(router, request, upstream, out_headers, output)


async def _forward_json(
    request: web.Request, upstream: aiohttp.ClientResponse, out_headers: dict[str, str], output: Output | None
) -> web.Response:
    """A JSON (or empty) answer is complete as it comes: one response, one write."""
    try:
        raw = await _read_watching(request, upstream)
    except aiohttp.ClientError as exc:
        # Not BridgeUnreachable: the request reached the bridge, so it must not be sent again.
        raise PierError("SESSION_LOST", f"the bridge's answer was cut off: {exc}") from exc
    if raw is None:
        return web.Response(status=499)  # the caller left: closing our side tells the bridge
    if output is not None:
        raw = await _checked_json(raw, output)
    return web.Response(status=upstream.status, headers=out_headers, body=raw)


async def _forward_stream(
    router: Router,
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    out_headers: dict[str, str],
    output: Output | None,
) -> web.StreamResponse:
    """An SSE answer (or a GET stream), relayed as it comes."""
    # A GET stream's headers go out at once (a client may wait for them); a POST's SSE answer
    # sends them with its first event.
    response = (
        web.StreamResponse(status=upstream.status, headers=out_headers)
        if request.method == "GET"
        else CoalescedSSE(status=upstream.status, headers=out_headers)
    )
    try:
        with router.streaming():
            await response.prepare(request)
            if output is not None:
                await _relay_sse(upstream, response, output)
            else:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientError):
        pass  # either side hung up; closing ours tells the bridge (a 2026-07-28 request is cancelled)
    return response


async def _read_watching(request: web.Request, upstream: aiohttp.ClientResponse) -> bytes | None:
    """The bridge's JSON answer; None if the caller left first (the connection to the bridge is then
    closed, which cancels a 2026-07-28 request there)."""
    reading = asyncio.ensure_future(upstream.read())
    try:
        while True:
            done, _ = await asyncio.wait({reading}, timeout=PEER_POLL_S)
            if done:
                return reading.result()
            if peer_gone(request):
                return None
    finally:
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            upstream.close()


async def _checked_json(raw: bytes, output: Output) -> bytes:
    """A JSON answer with each message through the output filter (and its tool calls audited)."""
    try:
        payload = loads(raw)
    except ValueError:
        return raw
    messages = messages_in(payload)
    if not messages:
        return raw
    checked = [await output(m) for m in messages]
    return dumps(checked if isinstance(payload, list) else checked[0])


async def _relay_sse(upstream: aiohttp.ClientResponse, response: web.StreamResponse, output: Output) -> None:
    """Forward an SSE stream event by event, each message through the output filter."""
    buffer = b""
    async for chunk in upstream.content.iter_any():
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            await response.write(await _checked_event(event, output) + b"\n\n")
    if buffer:
        await response.write(buffer)


async def _checked_event(event: bytes, output: Output) -> bytes:
    lines = event.split(b"\n")
    data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
    try:
        messages = messages_in(loads(data)) if data else []
    except ValueError:
        messages = []
    if not messages:
        return event  # comments, keepalives, priming events
    checked = await output(messages[0])
    if not checked:
        return b": withheld by policy"
    kept = [line for line in lines if not line.startswith(b"data:")]
    return b"\n".join([*kept, b"data: " + dumps(checked)])


def add_routes(v1: web.Application) -> None:
    for user in USERS:
        path = f"{user}/servers/{{server}}/mcp"
        v1.router.add_post(path, relay)
        v1.router.add_get(path, relay)
        v1.router.add_delete(path, relay)
