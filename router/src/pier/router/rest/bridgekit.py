"""mcp-bridgekit compatibility: its routes, fields and `error_code`s, so its users switch by URL.

Its routes live at the root, where bridgekit has them (aiohttp mounts sub-applications under a
prefix only), so each is wrapped in its own middleware chain — bridgekit's error shape around the
same identity step the v1 API takes — rather than chosen by its path in a global middleware.

`POST /chat` answers with one SSE `data:` frame, as bridgekit does. Its `mcp_config` (a command
chosen by the caller) is refused unless the operator turned `allow_inline_commands` on; callers
name a catalog profile with `server` (or get the default profile).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pier.core.catalog import Profile, inline_profile
from pier.core.errors import PierError
from pier.core.job import iso
from pier.core.jsonrpc import dumps
from pier.core.web import SSE_HEADERS, json_response
from pier.router.auth.ingress import principal_of
from pier.router.middleware import RECEIVED, Handler, authenticate, errors
from pier.router.processes import steer
from pier.router.shared import load_job, read_model, stream_job
from pier.router.state import Router, router_of

# Pier's codes in bridgekit's vocabulary (codes it lacks keep Pier's name).
_CODES = {
    "SESSION_START_FAILED": "SESSION_CREATE_FAILED",
    "SESSION_CAPACITY": "SESSION_CREATE_FAILED",
    "SERVER_EXITED": "TOOL_CALL_FAILED",
    "SESSION_LOST": "TOOL_CALL_FAILED",
    "SERVER_ERROR": "TOOL_CALL_FAILED",
    "SERVER_UNAVAILABLE": "TOOL_CALL_FAILED",
    "UNKNOWN_TOOL": "TOOL_CALL_FAILED",
    "INVALID_ARGUMENTS": "TOOL_CALL_FAILED",
    "CALL_QUEUE_FULL": "TOOL_CALL_FAILED",
}


def bridgekit_code(err: PierError) -> str:
    if err.code == "UNAUTHENTICATED":
        return "MISSING_API_KEY" if err.details.get("reason") == "missing" else "INVALID_API_KEY"
    return _CODES.get(err.code, err.code)


def error_body(err: PierError) -> dict[str, Any]:
    return {"status": "error", "error_code": bridgekit_code(err), "message": err.message, "details": err.details}


def error_response(err: PierError) -> web.Response:
    retry_after = err.details.get("retry_after_s")
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return json_response(error_body(err), err.http_status, headers)


class McpConfig(BaseModel):
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)


class ChatRequest(BaseModel):
    """bridgekit's `POST /chat` body, plus `server` to name a Pier profile."""

    model_config = ConfigDict(extra="ignore")

    user_id: str
    tool_name: str | None = None
    tool_args: dict[str, Any] = Field(default_factory=dict)
    messages: list[dict[str, Any]] = Field(default_factory=list)  # accepted and ignored, as bridgekit does
    mcp_config: McpConfig | None = None
    server: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)


def pick_profile(router: Router, server: str | None, config: McpConfig | None) -> Profile:
    if config is not None:
        if not router.settings.allow_inline_commands:
            raise PierError(
                "INLINE_COMMANDS_DISABLED",
                "mcp_config (a caller-chosen command) is disabled here; name a server profile with 'server'",
                {"servers": sorted(router.catalog.profiles)},
            )
        profile = inline_profile(config.command, config.args)
        router.catalog.add(profile)
        return router.catalog.get(profile.name)
    return router.catalog.get(server or router.settings.default_profile)


def sse_frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    router = router_of(request)
    body = await read_model(request, ChatRequest)
    if router.peers is not None:  # bridgekit names its user in the body: the process of that user serves it
        await steer(request, router.peers, body.user_id)
    profile = pick_profile(router, body.server, body.mcp_config)
    caller, _ = await router.ingress.admit(request, body.user_id, profile.name, "chat")
    if not body.tool_name:
        raise PierError("INVALID_ARGUMENTS", "tool_name is required")
    result = await router.calls.call(
        caller, profile, body.tool_name, body.tool_args, body.timeout_s, received_at=request[RECEIVED]
    )
    if result.status == 202:
        frame = {"status": "queued", "error_code": "TOOL_TIMED_OUT", "job_id": result.body["job_id"]}
    else:
        frame = {"status": "completed", "result": result.body["result"], "user_id": body.user_id}
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(sse_frame(frame))
    await response.write_eof()
    return response


async def get_job(request: web.Request) -> web.Response:
    record = await load_job(request, request.match_info["job_id"])
    view = record.completion_event()
    view["status"] = record.status
    return json_response(view)


async def tools(request: web.Request) -> web.Response:
    router = router_of(request)
    user = request.match_info["user_id"]
    command = request.query.get("command")
    config = McpConfig(command=command, args=request.query.get("args", "").split(",")) if command else None
    profile = pick_profile(router, request.query.get("server"), config)
    await router.ingress.admit(request, user, profile.name, "chat")
    async with router.backend.use(user, profile) as session:
        listed = await session.bridge.tools(router.settings.session_start_timeout_s)
    return json_response({"user_id": user, "server": profile.name, "tools": listed})


async def delete_session(request: web.Request) -> web.Response:
    router = router_of(request)
    user = request.match_info["user_id"]
    principal_of(request).check_user(user)
    ended = [s.key.profile for s in router.backend.list(user)]
    for name in ended:
        await router.backend.end(user, name)
    return json_response({"status": "closed" if ended else "not_found", "user_id": user, "servers": ended})


async def job_events(request: web.Request) -> web.StreamResponse:
    """One `data:` frame when the job completes, then the stream closes (same key and owner check as jobs)."""
    record = await load_job(request, request.match_info["job_id"])

    def render(event: dict[str, Any]) -> bytes | None:
        if event["type"] != "completed":
            return None
        return sse_frame({k: v for k, v in event.items() if k != "type"})

    return await stream_job(request, record.job_id, render)


async def health(request: web.Request) -> web.Response:
    router = router_of(request)
    sessions = router.backend.list()
    try:
        queued = await router.store.queue_depth()
    except Exception:
        queued = None
    return json_response(
        {
            "status": "ok",
            "active_sessions": len(sessions),
            "total_requests": router.ingress.total,
            "errors": router.ingress.errors,
            "queued_jobs": queued,
            "known_tools": sorted({name for s in sessions for name in s.tools}),
            "time": iso(time.time()),
        }
    )


_render_errors = errors(lambda request, err: error_response(err))


def bridgekit_route(handler: Handler, public: bool = False) -> Handler:
    """`handler` behind bridgekit's error shape and, unless `public`, the ingress pipeline's identity step
    (and, with several router processes, the process of the user its URL names)."""

    async def steered(request: web.Request) -> web.StreamResponse:
        peers = router_of(request).peers
        if peers is not None:
            await steer(request, peers, request.match_info.get("user_id"))
        return await handler(request)

    inner: Handler = handler if public else functools.partial(authenticate, handler=steered)

    async def route(request: web.Request) -> web.StreamResponse:
        return await _render_errors(request, inner)

    return route


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/chat", bridgekit_route(chat))
    r.add_get("/job/{job_id}", bridgekit_route(get_job))
    r.add_get("/tools/{user_id}", bridgekit_route(tools))
    r.add_delete("/session/{user_id}", bridgekit_route(delete_session))
    r.add_get("/mcp/events/{job_id}", bridgekit_route(job_events))
    r.add_get("/health", bridgekit_route(health, public=True))
