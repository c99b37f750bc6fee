"""The native MCP relay: `/v1/users/{user}/servers/{server}/mcp` streamed to the session's bridge.

Bodies and responses (SSE included) pass through unchanged; the router's own credentials are
swapped for the session's token. When the profile has a policy, or the body calls a tool, the
relay reads what it forwards: tools are checked against the built-in rules, messages go through
the policy hook (`Input` before forwarding, `Output` per response message), and each tool call
gets its audit record and accounting (the ingress pipeline, `ingress`). MCP sessions belong to
the bridge: when the bridge is replaced, the client gets the spec's 404 and initializes again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from pier.core.bridge import BridgeUnreachable
from pier.core.errors import PierError
from pier.core.jsonrpc import PARSE_ERROR, Message, TooDeep, dumps, error_response, gateway_error_response, loads, parse
from pier.core.policy import Caller, PolicyDenied
from pier.core.web import CoalescedSSE, json_response, origin_allowed
from pier.router.api import USERS
from pier.router.backends.base import Session, hold
from pier.router.context import Router, read_request_body, router_of
from pier.router.ingress import Ingress, user_of
from pier.router.middleware import RECEIVED

# Headers of the MCP transport that pass through; everything else stays on its side.
_REQUEST_HEADERS = ("Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID")
_RESPONSE_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control")


class Exchange:
    """One relayed POST (or WebSocket) through the ingress pipeline: each message's rules and policy
    on the way in, each answer's policy on the way out, each tool call's audit and accounting."""

    def __init__(self, ingress: Ingress, caller: Caller) -> None:
        self.ingress = ingress
        self.caller = caller
        self.tool_calls: dict[Any, tuple[str, Any, float]] = {}  # request id → (tool, arguments, start)

    @property
    def inspects_output(self) -> bool:
        return bool(self.caller.policy_url or self.tool_calls)

    async def check_input(self, messages: list[Message]) -> None:
        """Built-in tool rules, then the policy hook; raises PolicyDenied (nothing is forwarded)."""
        for message in messages:
            if message.get("method") == "tools/call":
                params = message.get("params") or {}
                tool, arguments = str(params.get("name")), params.get("arguments") or {}
                started = time.monotonic()
                try:
                    await self.ingress.gate.check_call(self.caller, tool, arguments, message)
                except PolicyDenied as denied:
                    self.ingress.finish(self.caller, tool, arguments, denied.code, started, denied)
                    raise
                self.tool_calls[message.get("id")] = (tool, arguments, started)
        others = [m for m in messages if m.get("method") != "tools/call"]
        await self.ingress.gate.check_messages(self.caller, others)

    async def check_output(self, message: Message) -> Message:
        """The message to forward: itself, or an error in its place when the policy denies it."""
        try:
            await self.ingress.gate.check_output(self.caller, message)
        except PolicyDenied as denied:
            self._finish(message, denied)
            return gateway_error_response(message.get("id"), denied) if "id" in message else {}
        self._finish(message, None)
        return message

    def _finish(self, message: Message, denied: PolicyDenied | None) -> None:
        if "method" in message or message.get("id") not in self.tool_calls:
            return
        tool, arguments, started = self.tool_calls.pop(message["id"])
        if denied is not None:
            outcome = denied.code
        elif "error" in message:
            data = message["error"].get("data")
            outcome = data.get("code", "rpc_error") if isinstance(data, dict) else "rpc_error"
        else:
            outcome = "tool_error" if (message.get("result") or {}).get("isError") else "completed"
        self.ingress.finish(self.caller, tool, arguments, outcome, started, denied)


def parse_messages(body: bytes | None) -> list[Message] | None:
    """The JSON-RPC messages of a caller's body, or None when it is not JSON (the bridge will say so).

    Raises TooDeep for JSON nested too deeply to pass on.
    """
    if not body:
        return None
    try:
        payload = parse(body)
    except TooDeep:
        raise
    except ValueError:
        return None
    return messages_in(payload)


def messages_in(payload: Any) -> list[Message]:
    """The messages of a parsed body: one, or a batch."""
    return [m for m in (payload if isinstance(payload, list) else [payload]) if isinstance(m, dict)]


def is_batch(body: bytes | None) -> bool:
    return (body or b"").lstrip()[:1] == b"["


def _session_starting(messages: list[Message], batch: bool) -> web.Response:
    """503 with a JSON-RPC error per request: the session is starting (it goes on); retry shortly."""
    err = PierError("SESSION_STARTING", "the session is still starting; retry shortly", {"retry_after_s": 1})
    errors = [gateway_error_response(m["id"], err) for m in messages if "id" in m and "method" in m]
    body = errors if batch else (errors[0] if errors else gateway_error_response(None, err))
    return json_response(body, 503, {"Retry-After": "1"})


def too_deep_response(exc: TooDeep) -> web.Response:
    """A body nested too deeply: refused here, as the bridge would refuse it."""
    return json_response(error_response(None, PARSE_ERROR, f"Parse error: {exc}"), 400)


async def relay(request: web.Request) -> web.StreamResponse:
    router = router_of(request)
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, router.settings.allowed_origins):
        raise PierError("FORBIDDEN", f"origin {origin!r} is not allowed")
    user, server = user_of(request), request.match_info["server"]
    caller, profile = await router.ingress.admit(request, user, server, "mcp")
    body = await read_request_body(request) if request.method == "POST" else None
    headers = {name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers}
    exchange = Exchange(router.ingress, caller)
    try:
        messages = parse_messages(body)
    except TooDeep as exc:
        return too_deep_response(exc)
    if messages:
        try:
            await exchange.check_input(messages)
        except PolicyDenied as denied:
            errors = [gateway_error_response(m["id"], denied) for m in messages if "id" in m and "method" in m]
            if not errors:
                raise
            return json_response(errors if is_batch(body) else errors[0])

    if request.method == "GET":
        # A held GET stream is not a call in flight: it must not keep an idle session alive forever.
        session = await router.backend.acquire(user, profile)
        return await _forward(router, request, session, headers, body, exchange)
    # One deadline, as for REST calls: a session still starting when the profile's timeout (counted
    # from the request's arrival) runs out is an answer to retry, not a wait past the caller's patience.
    deadline = request[RECEIVED] + router.calls.timeout_for(profile, None)
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            session = await router.backend.acquire(user, profile)
    except TimeoutError:
        return _session_starting(messages or [], is_batch(body))
    async with hold(session):
        try:
            return await _forward(router, request, session, headers, body, exchange)
        except BridgeUnreachable:
            await router.backend.forget(session, "unreachable")
    # The bridge was gone: a fresh session answers (an old MCP session id gets its 404 there).
    async with router.backend.use(user, profile) as session:
        return await _forward(router, request, session, headers, body, exchange)


async def _forward(
    router: Router,
    request: web.Request,
    session: Session,
    headers: dict[str, str],
    body: bytes | None,
    exchange: Exchange,
) -> web.StreamResponse:
    try:
        upstream = await router.http.request(
            request.method,
            session.endpoint.url + "/mcp",
            headers={**headers, **session.endpoint.headers()},
            data=body,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ssl=router.bridge_ssl,
        )
    except (aiohttp.ClientError, OSError) as exc:
        raise BridgeUnreachable(session.endpoint, exc) from exc
    async with upstream:
        out_headers = {name: upstream.headers[name] for name in _RESPONSE_HEADERS if name in upstream.headers}
        inspect = exchange.inspects_output and request.method != "DELETE"
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if not is_sse and request.method != "GET":
            # A JSON (or empty) answer is complete as it comes: one response, one write.
            try:
                raw = await upstream.read()
            except aiohttp.ClientError as exc:
                # Not BridgeUnreachable: the request reached the bridge, so it must not be sent again.
                raise PierError("SESSION_LOST", f"the bridge's answer was cut off: {exc}") from exc
            if inspect:
                raw = await _checked_json(raw, exchange)
            return web.Response(status=upstream.status, headers=out_headers, body=raw)
        response = CoalescedSSE(status=upstream.status, headers=out_headers)
        try:
            with router.streaming():
                await response.prepare(request)
                if inspect:
                    await _relay_sse(upstream, response, exchange)
                else:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientError):
            pass  # either side hung up; the bridge keeps the calls running
        return response


async def _checked_json(raw: bytes, exchange: Exchange) -> bytes:
    """A JSON answer with each message through the output policy (and its tool calls audited)."""
    try:
        payload = loads(raw)
    except ValueError:
        return raw
    messages = messages_in(payload)
    if not messages:
        return raw
    checked = [await exchange.check_output(m) for m in messages]
    return dumps(checked if isinstance(payload, list) else checked[0])


async def _relay_sse(upstream: aiohttp.ClientResponse, response: web.StreamResponse, exchange: Exchange) -> None:
    """Forward an SSE stream event by event, each message through the output policy."""
    buffer = b""
    async for chunk in upstream.content.iter_any():
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            await response.write(await _checked_event(event, exchange) + b"\n\n")
    if buffer:
        await response.write(buffer)


async def _checked_event(event: bytes, exchange: Exchange) -> bytes:
    lines = event.split(b"\n")
    data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
    try:
        messages = messages_in(loads(data)) if data else []
    except ValueError:
        messages = []
    if not messages:
        return event  # comments, keepalives, priming events
    checked = await exchange.check_output(messages[0])
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
