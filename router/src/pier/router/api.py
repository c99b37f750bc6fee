"""Router v1 REST (the `/v1` sub-application): servers, tools, calls, sessions, jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pier.core.bridge import BridgeUnreachable
from pier.core.errors import PierError
from pier.core.job import JobRecord
from pier.core.jsonrpc import MAX_DEPTH, TooDeep, dumps, parse
from pier.core.web import SSE_HEADERS, json_response
from pier.router import tasks
from pier.router.context import read_request_body, router_of
from pier.router.ingress import principal_of

M = TypeVar("M", bound=BaseModel)
JOB_EVENTS_TIMEOUT_S = 3600.0


class ToolCallBody(BaseModel):
    """`POST …/tools/{tool}/call`."""

    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, description="hand-off threshold for this call (capped)")


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the JSON body into `model`: 400 for bad JSON, 422 for a body that breaks the schema."""
    raw = await read_request_body(request)
    try:
        data = parse(raw) if raw else {}
    except TooDeep as exc:
        raise PierError("BAD_REQUEST", f"the body is {exc}", {"max_depth": MAX_DEPTH}) from None
    except ValueError:
        raise PierError("BAD_REQUEST", "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = [{"path": list(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise PierError("INVALID_ARGUMENTS", "the request body does not match the schema", {"errors": errors}) from None


async def list_servers(request: web.Request) -> web.Response:
    router = router_of(request)
    return json_response({"servers": [p.public() for p in router.catalog.profiles.values()]})


async def list_tools(request: web.Request) -> web.Response:
    router = router_of(request)
    user, server = request.match_info["user"], request.match_info["server"]
    _, profile = await router.ingress.admit(request, user, server, "rest")
    async with router.backend.use(user, profile) as session:
        try:
            tools = await session.bridge.tools(router.settings.session_start_timeout_s)
        except BridgeUnreachable:
            await router.backend.forget(session, "unreachable")
            raise
        session.tools = {t["name"]: t for t in tools}
    return json_response({"tools": tools})


async def call_tool(request: web.Request) -> web.Response:
    router = router_of(request)
    user, server = request.match_info["user"], request.match_info["server"]
    caller, profile = await router.ingress.admit(request, user, server, "rest")
    body = await read_model(request, ToolCallBody)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200):
        raise PierError("BAD_REQUEST", "Idempotency-Key must be 1-200 characters")
    result = await router.calls.call(caller, profile, request.match_info["tool"], body.arguments, body.timeout_s, key)
    return json_response(result.body, result.status)


async def list_sessions(request: web.Request) -> web.Response:
    router = router_of(request)
    user = request.match_info["user"]
    principal_of(request).check_user(user)
    return json_response({"sessions": [s.view() for s in router.backend.list(user)]})


async def end_session(request: web.Request) -> web.Response:
    router = router_of(request)
    user, server = request.match_info["user"], request.match_info["server"]
    principal_of(request).check_user(user)
    router.catalog.get(server)
    if not await router.backend.end(user, server):
        raise PierError("NOT_FOUND", f"{user} has no {server} session")
    return web.Response(status=204)


# -- jobs ------------------------------------------------------------------------------------


async def load_job(request: web.Request, job_id: str) -> JobRecord:
    record = await router_of(request).store.get(job_id)
    if record is None:
        raise PierError("JOB_NOT_FOUND", f"no job {job_id!r} (results expire after their TTL)")
    principal_of(request).check_user(record.user)
    return record


async def get_job(request: web.Request) -> web.Response:
    record = await load_job(request, request.match_info["job_id"])
    return json_response(record.view())


async def cancel_job(request: web.Request) -> web.Response:
    router = router_of(request)
    record = await load_job(request, request.match_info["job_id"])
    # One cancellation for REST jobs and MCP tasks: they are the same thing.
    return json_response((await tasks.cancel_job(router, record)).view())


async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: `progress` events while the job runs, then one `completed` event, then the stream ends."""
    record = await load_job(request, request.match_info["job_id"])

    def render(event: dict[str, Any]) -> bytes:
        data = {k: v for k, v in event.items() if k != "type"}
        return f"event: {event['type']}\n".encode() + b"data: " + dumps(data) + b"\n\n"

    return await stream_job(request, record.job_id, render)


async def stream_job(
    request: web.Request, job_id: str, render: Callable[[dict[str, Any]], bytes | None]
) -> web.StreamResponse:
    """Stream a job's events as SSE; `render` makes one event a frame (None skips it)."""
    router = router_of(request)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        with router.streaming():
            async for event in router.store.events(job_id, JOB_EVENTS_TIMEOUT_S):
                frame = b": keepalive\n\n" if event["type"] == "keepalive" else render(event)
                if frame:
                    await response.write(frame)
            await response.write_eof()
    except ConnectionResetError:
        pass  # the caller left; the job goes on
    return response


def add_routes(v1: web.Application) -> None:
    r = v1.router
    r.add_get("/servers", list_servers)
    r.add_get("/users/{user}/servers/{server}/tools", list_tools)
    r.add_post("/users/{user}/servers/{server}/tools/{tool}/call", call_tool)
    r.add_get("/users/{user}/sessions", list_sessions)
    r.add_delete("/users/{user}/servers/{server}", end_session)
    r.add_get("/jobs/{job_id}", get_job)
    r.add_get("/jobs/{job_id}/events", job_events)
    r.add_delete("/jobs/{job_id}", cancel_job)
