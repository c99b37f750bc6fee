"""The native MCP relay: `/v1/users/{user}/servers/{server}/mcp`, to the session's bridge.

Every revision the bridge serves passes (2025-03-26 … 2026-07-28), chosen per request by the
bridge as the spec says. The body is parsed once, here: each message goes through the ingress
pipeline (`auth.ingress`: tool rules and the policy hook on the way in, the output policy and each
tool call's audit and accounting on the way out, through a `Checkpoint`). A bridge in the router's own
process gets the parsed body directly (its `/mcp` handler writes this response: no second HTTP
hop); one elsewhere gets it over HTTP, with the session's token in place of the caller's key, and
its answer (JSON or SSE) is streamed back.

MCP sessions (handshake revisions) outlive the user's server session: a client's `Mcp-Session-Id` is
recorded in Redis when its `initialize` is answered, and a bridge that does not know it (a new session,
pod or router since) recreates it from that record before it answers (`sessions`). A client's
`notifications/cancelled` lets go of its call's hold on the session as soon as the bridge has it, so the
session's in-flight count never includes a call its caller was told is cancelled.

Tasks: a caller that takes them has its `tools/call` run by the call service, so a call becomes a
task backed by the job pool at once (a tool the profile runs as a task) or when it overruns the
profile's timeout, and `tasks/*` about Pier's jobs are answered here from Redis (`tasks`). A server
with tasks of its own (the 2026-07-28 tasks extension in its server/discover) decides itself: its
callers' requests pass through to it. A 2026-07-28 caller that closes its response stream cancels
its request — except a call that became a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pier.core import tracing
from pier.core.callapi import BridgeUnreachable, Output
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import (
    INVALID_REQUEST,
    PARSE_ERROR,
    Message,
    RequestId,
    TooDeep,
    dumps,
    error_response,
    gateway_error_response,
    loads,
)
from pier.core.policy import Caller, PolicyDenied
from pier.core.protocol import (
    HTTP_STATUS,
    SESSION_HEADER,
    TASK_METHODS,
    TASKS_EXTENSION,
    VERSION_HEADER,
    Refusal,
    check_request,
    era_mismatch,
    is_modern_request,
)
from pier.core.web import PEER_POLL_S, CoalescedSSE, json_response, origin_allowed, peer_gone
from pier.router.backends.base import Hold, Session, hold
from pier.router.mcp.messages import (
    Checkpoint,
    connection_answer,
    is_batch,
    messages_in,
    parse_body,
    too_deep_response,
    without_connect_state,
)
from pier.router.mcp.sessions import NOTED, well_formed
from pier.router.mcp.tasks import Tasks, declares_tasks, missing_extension, wants_tasks
from pier.router.middleware import RECEIVED
from pier.router.shared import USERS, read_request_body, user_of, with_connect_url
from pier.router.state import Router, router_of

log = logging.getLogger("pier.router.mcp.relay")

# Headers of the MCP transport that pass through; everything else stays on its side.
_REQUEST_HEADERS = (
    "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID", "Mcp-Method", "Mcp-Name",
)  # fmt: skip
_PARAM_PREFIX = "mcp-param-"
_RESPONSE_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control", "Allow")
# What a handshake-era caller is told Pier can do with tasks (2025-11-25).
_TASK_CAPABILITY: dict[str, Any] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
HELD = web.RequestKey("mcp_hold", Hold)  # a relayed request's hold on its session, let go early when it ends


class UnknownClient(Exception):
    """The bridge does not know the request's MCP session id (it answered 404)."""


# (user, profile, MCP session id, request id): a client's calls in flight, as their caller names them.
CallKey = tuple[str, str, str, RequestId]


@dataclass(eq=False)
class _HeldPost:
    held: Hold
    ids: set[RequestId]


class HeldCalls:
    """The relayed POSTs of handshake-era clients holding their session, by the calls they carry: a client's
    `notifications/cancelled` for the last of a POST's calls lets go of its hold at once, not when the
    POST's answer comes back through the relay."""

    def __init__(self) -> None:
        self.calls: dict[CallKey, _HeldPost] = {}

    def hold(self, held: Hold, keys: list[CallKey]) -> _HeldPost | None:
        """Note a POST's calls under its hold (`drop` them when it returns)."""
        if not keys:
            return None
        post = _HeldPost(held, {key[3] for key in keys})
        for key in keys:
            self.calls[key] = post
        return post

    def drop(self, post: _HeldPost | None, keys: list[CallKey]) -> None:
        for key in keys:
            if self.calls.get(key) is post:
                del self.calls[key]

    def cancelled(self, key: CallKey) -> None:
        post = self.calls.pop(key, None)
        if post is not None:
            post.ids.discard(key[3])
            if not post.ids:
                post.held.release()


HELD_CALLS = web.AppKey("mcp_held_calls", HeldCalls)


def _session_starting(messages: list[Message], batch: bool) -> web.Response:
    """503 with a JSON-RPC error per request: the session is starting (it goes on); retry shortly."""
    err = PierError("SESSION_STARTING", "the session is still starting; retry shortly", {"retry_after_s": 1})
    errors = [gateway_error_response(m["id"], err) for m in messages if "id" in m and "method" in m]
    body = errors if batch else (errors[0] if errors else gateway_error_response(None, err))
    return json_response(body, 503, {"Retry-After": "1"})


class Advertiser:
    """What the caller learns of Pier's tasks: the capability in `initialize` (2025-11-25) and
    `server/discover` (2026-07-28) answers, and task support on each listed tool (2025-11-25: the
    profile's `task_support`, else optional)."""

    def __init__(self, messages: list[Message], modern: bool, profile: Profile) -> None:
        wanted = ("server/discover",) if modern else ("initialize", "tools/list")
        self.methods = {m["id"]: m["method"] for m in messages if "id" in m and m.get("method") in wanted}
        self.profile = profile

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
                t
                if not isinstance(t, dict) or "execution" in t
                else {**t, "execution": {"taskSupport": self.profile.task_mode(str(t.get("name"))) or "optional"}}
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
    def client_session(self) -> str | None:
        """The MCP session id a handshake-era request names (2026-07-28 requests have none)."""
        return None if self.modern else self.headers.get(SESSION_HEADER)

    @property
    def initialize(self) -> Message | None:
        """The request, when it is a handshake-era client's `initialize`."""
        single = self.single
        if self.modern or self.method != "POST" or single is None or single.get("method") != "initialize":
            return None
        return single

    def not_found(self) -> web.Response:
        """404 for a session id no bridge knows and no record names: the client initializes anew (as the spec says)."""
        request_id = self.payload.get("id") if isinstance(self.payload, dict) else None
        answer = error_response(request_id, INVALID_REQUEST, "Session not found: initialize a new session")
        return json_response(answer, 404)

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
    with _mcp_span(request, relayed) as span:
        response = await _relayed(request, router, caller, profile, relayed)
        if response.status >= 400:
            span.fail(str(response.status))
        return response


def _mcp_span(request: web.Request, relayed: Relayed) -> tracing.Scope:
    """The MCP server span of a one-request body (its parent the caller's `params._meta.traceparent` when
    it sends one, the HTTP request's span linked)."""
    if relayed.single is None:
        return tracing.nothing()
    version = request.headers.get(VERSION_HEADER)
    return tracing.mcp_server_span(relayed.single, {"mcp.protocol.version": version[:32]} if version else None)


async def _relayed(
    request: web.Request, router: Router, caller: Caller, profile: Profile, relayed: Relayed
) -> web.StreamResponse:
    """A relayed request, read and admitted: answered here, or through the user's session."""
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
    output = _output_filter(request, checkpoint, Advertiser(relayed.messages, relayed.modern, profile))
    if request.method == "DELETE" and relayed.client_session is not None:
        return await _end_client(request, router, profile, relayed, output)
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
    """What the router answers itself, before any session: a request the spec refuses, `tasks/*`
    about Pier's jobs, and a call that is (or may become) one of Pier's tasks. None: the bridge answers."""
    single = relayed.single
    if single is None:
        return None
    # The spec's checks come before Pier's own answers (tasks), as the bridge makes them.
    refusal = _refusal(single, request, relayed.modern)
    if refusal is not None:
        return json_response(refusal.answer(single["id"]), refusal.http_status)
    method = single.get("method")
    tasks = Tasks(router, caller, profile, relayed.modern)
    if method in TASK_METHODS:
        # An id that is no job of Pier's may be the server's own task: only a live session can hold one.
        answer = await tasks.answer(single, lambda: _server_tasks(request, router, caller, profile, start=False))
        return _json_answer(answer, relayed.modern) if answer is not None else None
    if not relayed.modern:
        # 2025-11-25: a `task` field asks for one of Pier's tasks (rules, policy and audit: the call service's).
        return await _task_call(request, tasks, single, True) if wants_tasks(single, False) else None
    if method != "tools/call":
        return None
    mode = profile.task_mode(str((single.get("params") or {}).get("name")))
    declared = declares_tasks(single)
    if mode == "forbidden" or not (declared or mode == "required"):
        return None
    if await _server_tasks(request, router, caller, profile):
        return None  # a server with tasks of its own decides, and gates, them itself
    if not declared:
        # A tool that only runs as a task, for a caller that takes none: refused, nothing started.
        return _json_answer(missing_extension(single["id"]), True)
    return await _task_call(request, tasks, single, mode in ("optional", "required"))


def _refusal(message: Message, request: web.Request, modern: bool) -> Refusal | None:
    """The spec's refusal of a request (2026-07-28's checks; a handshake header over a 2026-07-28 body)."""
    if not modern:
        return era_mismatch(message, request.headers.get(VERSION_HEADER))
    try:
        check_request(message, request.headers)
    except Refusal as refusal:
        return refusal
    return None


async def _server_tasks(
    request: web.Request, router: Router, caller: Caller, profile: Profile, start: bool = True
) -> bool:
    """Whether the user's session's server runs tasks of its own (asked of its bridge once per session).
    A session still starting when the request's deadline comes is taken as one without (Pier's tasks);
    without `start`, so is a user without a session."""
    if start:
        deadline = request[RECEIVED] + router.calls.timeout_for(profile, None)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                session = await router.backend.acquire(caller.user, profile)
        except (TimeoutError, PierError):
            return False
    else:
        found = [s for s in router.backend.list(caller.user) if s.key.profile == profile.name]
        if not found:
            return False
        session = found[0]
    if session.server_tasks is None:
        try:
            session.server_tasks = (await session.bridge.status()).server_tasks
        except PierError:
            return False
    return session.server_tasks


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
        return await _exchange(router, request, session, profile, relayed, output)
    # One deadline, as for REST calls: a session still starting when the profile's timeout (counted
    # from the request's arrival) runs out is an answer to retry, not a wait past the caller's patience.
    deadline = request[RECEIVED] + router.calls.timeout_for(profile, None)
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            session = await router.backend.acquire(user, profile)
    except TimeoutError:
        return _session_starting(relayed.messages, relayed.batch)
    held_calls = request.config_dict[HELD_CALLS]
    calls = _calls(user, profile, relayed)
    async with hold(session) as held:
        request[HELD] = held
        post = held_calls.hold(held, calls)
        try:
            response = await _exchange(router, request, session, profile, relayed, output)
        except BridgeUnreachable:
            await router.backend.forget(session, "unreachable")
        else:
            _let_go_of_cancelled(held_calls, user, profile, relayed, response)
            return response
        finally:
            held_calls.drop(post, calls)
    # The bridge was gone: a fresh session answers (an MCP session is recreated there).
    async with router.backend.use(user, profile) as session:
        return await _exchange(router, request, session, profile, relayed, output)


def _calls(user: str, profile: Profile, relayed: Relayed) -> list[CallKey]:
    """The calls a handshake-era client's POST carries, as it names them."""
    client = relayed.client_session
    if client is None:
        return []
    return [(user, profile.name, client, m["id"]) for m in relayed.messages if "method" in m and "id" in m]


def _let_go_of_cancelled(
    held_calls: HeldCalls, user: str, profile: Profile, relayed: Relayed, response: web.StreamResponse
) -> None:
    """The bridge took the client's `notifications/cancelled`: the calls it names are no longer in flight."""
    client = relayed.client_session
    if client is None or response.status not in (200, 202):
        return
    for message in relayed.messages:
        if message.get("method") == "notifications/cancelled" and "id" not in message:
            request_id = (message.get("params") or {}).get("requestId")
            if isinstance(request_id, str | int):
                held_calls.cancelled((user, profile.name, client, request_id))


async def _exchange(
    router: Router, request: web.Request, session: Session, profile: Profile, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    """The request through the session's bridge, the client's MCP session carried over: one the bridge does
    not know is recreated there from its record first, when there is one (`sessions`)."""
    sessions = router.mcp_sessions
    client = relayed.client_session
    if client is not None:
        noted = [m for m in relayed.messages if m.get("method") in NOTED and "id" in m]
        if noted:
            await sessions.note(client, noted)  # before it is sent: a failure here sends nothing
        elif sessions.due(client):
            await sessions.touch(client)
    try:
        response = await _to_bridge(router, request, session, relayed, output)
    except UnknownClient:
        assert client is not None
        state = await sessions.load(client, session.key.user, profile.name)
        if state is None:
            return relayed.not_found()
        if await session.bridge.resume_client(state, router.settings.session_start_timeout_s):
            router.metrics.mcp_sessions_resumed.labels(profile.name).inc()
            log.info("MCP session resumed", extra={"user": session.key.user, "profile": profile.name})
        try:
            response = await _to_bridge(router, request, session, relayed, output)
        except UnknownClient:
            return relayed.not_found()  # ended again meanwhile (its DELETE, or the bridge's)
    initialize = relayed.initialize
    if initialize is not None and response.status == 200:
        issued = response.headers.get(SESSION_HEADER)
        if well_formed(issued):
            assert issued is not None
            params = initialize.get("params")
            params = _negotiated(params if isinstance(params, dict) else {}, response)
            await sessions.created(issued, session.key.user, profile.name, params)
    return response


def _negotiated(params: dict[str, Any], response: web.StreamResponse) -> dict[str, Any]:
    """The client's `initialize` params with the revision it was answered (so that a recreated session
    speaks the same one, whatever the bridge then offers)."""
    body = response.body if isinstance(response, web.Response) else None
    try:
        answer = loads(body) if isinstance(body, bytes) else None
    except ValueError:
        answer = None
    result = answer.get("result") if isinstance(answer, dict) else None
    version = result.get("protocolVersion") if isinstance(result, dict) else None
    return {**params, "protocolVersion": version} if isinstance(version, str) else params


async def _end_client(
    request: web.Request, router: Router, profile: Profile, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    """A client's `DELETE`: its MCP session ends — its record, and its client session on the bridge of the
    user's running session, if any (none is started for it)."""
    client = relayed.client_session
    assert client is not None
    user = user_of(request)
    ended = await router.mcp_sessions.end(client, user, profile.name)
    mine = [s for s in router.backend.list(user) if s.key.profile == profile.name]
    running = next((s for s in mine if s.state == "ready" and s.endpoint.url), None)
    answer: web.StreamResponse | None = None
    if running is not None:
        with contextlib.suppress(UnknownClient, BridgeUnreachable):
            answer = await _to_bridge(router, request, running, relayed, output)
    if answer is not None and answer.status != 204:
        return answer
    return web.Response(status=204) if ended or answer is not None else relayed.not_found()


def _json_answer(answer: Message, modern: bool) -> web.Response:
    error = answer.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = HTTP_STATUS.get(code, 200) if modern and isinstance(code, int) else 200
    return json_response(answer, status)


async def _task_call(request: web.Request, tasks: Tasks, message: Message, at_once: bool) -> web.StreamResponse:
    """A tools/call from a caller that takes tasks: a task (at once, or if it overruns), or its answer."""
    job_id = uuid.uuid4().hex
    work = asyncio.ensure_future(tasks.call(message, job_id, request[RECEIVED], at_once))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=PEER_POLL_S)
            if not work.done() and tasks.modern and peer_gone(request):
                # The caller closed its stream before the call became a task: a cancellation.
                work.cancel()
                with contextlib.suppress(PierError):
                    session = await tasks.router.backend.acquire(tasks.caller.user, tasks.profile)
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
        answer = connection_answer(message, err, request.headers.get(VERSION_HEADER), tasks.modern)
    return _json_answer(answer, tasks.modern)


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
            response = await session.bridge.mcp.handle(request, relayed.payload, output)
        if response.status == 404 and relayed.client_session is not None and not response.prepared:
            raise UnknownClient
        return response
    return await _forward(router, request, session, relayed, output)


async def _forward(
    router: Router, request: web.Request, session: Session, relayed: Relayed, output: Output | None
) -> web.StreamResponse:
    """The request over HTTP to a bridge elsewhere, with the session's token in place of the caller's key.

    Watched all along, from before the bridge's first byte: a caller that leaves lets go of its call at
    once, and closing the connection to the bridge cancels a 2026-07-28 request there."""
    sending = asyncio.ensure_future(_send(router, request, session, relayed))
    try:
        while True:
            done, _ = await asyncio.wait({sending}, timeout=PEER_POLL_S)
            if done:
                break
            if peer_gone(request):
                _let_go(request)
                return web.Response(status=499)  # the caller left (the finally below closes the connection)
    finally:
        if not sending.done():
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    upstream, raw = sending.result()
    async with upstream:
        out_headers = {name: upstream.headers[name] for name in _RESPONSE_HEADERS if name in upstream.headers}
        if raw is None:
            return await _forward_stream(router, request, upstream, out_headers, output)
        # A JSON (or empty) answer is complete as it comes: one response, one write.
        if output is not None:
            raw = await _checked_json(raw, output)
        return web.Response(status=upstream.status, headers=out_headers, body=raw)


async def _send(
    router: Router, request: web.Request, session: Session, relayed: Relayed
) -> tuple[aiohttp.ClientResponse, bytes | None]:
    """The bridge's answer: its response, and its body when it is JSON (None: a stream, to relay as it comes)."""
    url = session.endpoint.url + "/mcp"
    attributes = tracing.http_client_attributes(request.method, url, "/mcp") if tracing.enabled() else None
    with tracing.span(tracing.http_client_name(request.method, "/mcp"), "client", attributes) as span:
        try:
            upstream = await router.http.request(
                request.method,
                url,
                headers={**relayed.headers, **session.endpoint.headers(), **tracing.headers()},
                data=relayed.body,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                ssl=router.bridge_ssl,
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise BridgeUnreachable(session.endpoint, exc) from exc
        span.set("http.response.status_code", upstream.status)
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    if (is_sse or request.method == "GET") and upstream.status != 404:
        return upstream, None
    try:
        raw = await upstream.read()
    except aiohttp.ClientError as exc:
        # Not BridgeUnreachable: the request reached the bridge, so it must not be sent again.
        raise PierError("SESSION_LOST", f"the bridge's answer was cut off: {exc}") from exc
    finally:
        if not upstream.content.at_eof():
            upstream.close()  # cut off, or abandoned by its caller: the connection is not reused
    if upstream.status == 404 and relayed.client_session is not None:
        upstream.release()
        raise UnknownClient
    return upstream, raw


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
            chunks = _chunks_watching(request, upstream)
            if output is not None:
                await _relay_sse(chunks, response, output)
            else:
                async for chunk in chunks:
                    await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientError):
        pass  # either side hung up; closing ours tells the bridge (a 2026-07-28 request is cancelled)
    return response


async def _chunks_watching(request: web.Request, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The bridge's stream as it comes, until it ends or the caller leaves: a stream with nothing to say
    for a while (a long call) must not keep a gone caller's call in flight until its next event."""
    while True:
        try:
            async with asyncio.timeout(PEER_POLL_S):
                chunk = await upstream.content.readany()
        except TimeoutError:
            if peer_gone(request):
                _caller_gone(request, upstream)
                return
            continue
        if not chunk:
            return
        yield chunk


def _caller_gone(request: web.Request, upstream: aiohttp.ClientResponse) -> None:
    """The caller left: its call is over for the session's count first, then the connection to the bridge
    is closed, which cancels a 2026-07-28 request there."""
    _let_go(request)
    upstream.close()


def _let_go(request: web.Request) -> None:
    held = request.get(HELD)
    if held is not None:
        held.release()


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


async def _relay_sse(chunks: AsyncIterator[bytes], response: web.StreamResponse, output: Output) -> None:
    """Forward an SSE stream event by event, each message through the output filter."""
    buffer = b""
    async for chunk in chunks:
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
    v1[HELD_CALLS] = HeldCalls()
    for user in USERS:
        path = f"{user}/servers/{{server}}/mcp"
        v1.router.add_post(path, relay)
        v1.router.add_get(path, relay)
        v1.router.add_delete(path, relay)
