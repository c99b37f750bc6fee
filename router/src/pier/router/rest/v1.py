"""Router v1 REST (the `/v1` sub-application): servers, tools, calls, sessions, jobs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pier.core.callapi import BridgeUnreachable
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import dumps, parse
from pier.core.web import json_response
from pier.router import shared
from pier.router.auth.ingress import groups_of, principal_of
from pier.router.middleware import RECEIVED
from pier.router.shared import USERS, load_job, read_model, read_request_body, stream_job, user_of
from pier.router.state import router_of
from pier.router.usersecrets import SecretStore, check_values

log = logging.getLogger("pier.router.rest.v1")


class ToolCallBody(BaseModel):
    """`POST …/tools/{tool}/call`."""

    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, description="hand-off threshold for this call (capped)")


async def list_servers(request: web.Request) -> web.Response:
    router = router_of(request)
    groups = groups_of(principal_of(request))
    return json_response({"servers": [p.public() for p in router.catalog.profiles.values() if p.usable_by(groups)]})


async def list_tools(request: web.Request) -> web.Response:
    router = router_of(request)
    user, server = user_of(request), request.match_info["server"]
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
    user, server = user_of(request), request.match_info["server"]
    caller, profile = await router.ingress.admit(request, user, server, "rest")
    body = await read_model(request, ToolCallBody)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200):
        raise PierError("BAD_REQUEST", "Idempotency-Key must be 1-200 characters")
    tool = request.match_info["tool"]
    result = await router.calls.call(caller, profile, tool, body.arguments, body.timeout_s, key, request[RECEIVED])
    return json_response(result.body, result.status)


async def list_sessions(request: web.Request) -> web.Response:
    router = router_of(request)
    user = user_of(request)
    principal_of(request).check_user(user)
    sessions = router.backend.list(user)
    await asyncio.gather(*(session.look() for session in sessions))  # their bridges' counts now
    return json_response({"sessions": [s.view() for s in sessions]})


async def end_session(request: web.Request) -> web.Response:
    router = router_of(request)
    user, server = user_of(request), request.match_info["server"]
    principal_of(request).check_user(user)
    router.catalog.get(server)
    if not await router.backend.end(user, server):
        raise PierError("NOT_FOUND", f"{user} has no {server} session")
    return web.Response(status=204)


# -- users' secrets ------------------------------------------------------------------------------


async def _secrets_of(request: web.Request) -> tuple[str, Profile, SecretStore]:
    router = router_of(request)
    user = user_of(request)
    _, profile = await router.ingress.admit(request, user, request.match_info["server"], "rest")
    if not profile.user_secrets or router.backend.secrets is None:
        raise PierError("NOT_FOUND", f"{profile.name} takes no users' secrets")
    return user, profile, router.backend.secrets


async def put_secrets(request: web.Request) -> web.Response:
    """Set some of the user's secrets (write-only); their session restarts to take them."""
    user, profile, store = await _secrets_of(request)
    raw = await read_request_body(request)
    try:
        values = parse(raw) if raw else None
    except ValueError:
        raise PierError("BAD_REQUEST", "the body is not valid JSON") from None
    values = check_values(profile, values)
    await store.put(user, profile.name, values)
    await _restart(request, user, profile.name)
    log.info("user secrets set", extra={"user": user, "profile": profile.name, "names": sorted(values)})
    return web.Response(status=204)


async def list_secrets(request: web.Request) -> web.Response:
    user, profile, store = await _secrets_of(request)
    return json_response({"secrets": await store.listing(user, profile.name)})


async def delete_secret(request: web.Request) -> web.Response:
    user, profile, store = await _secrets_of(request)
    name = request.match_info["name"]
    if not await store.delete(user, profile.name, name):
        raise PierError("NOT_FOUND", f"{user} has no secret {name!r} for {profile.name}")
    await _restart(request, user, profile.name)
    return web.Response(status=204)


async def _restart(request: web.Request, user: str, profile: str) -> None:
    """The user's session takes its secrets when it starts: end it, the next use starts it afresh."""
    await router_of(request).backend.end(user, profile)


# -- jobs ------------------------------------------------------------------------------------


async def get_job(request: web.Request) -> web.Response:
    record = await load_job(request, request.match_info["job_id"])
    return json_response(record.view())


async def cancel_job(request: web.Request) -> web.Response:
    router = router_of(request)
    record = await load_job(request, request.match_info["job_id"])
    # One cancellation for REST jobs and MCP tasks: they are the same thing.
    return json_response((await shared.cancel_job(router, record)).view())


async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: `progress` events while the job runs, then one `completed` event, then the stream ends."""
    record = await load_job(request, request.match_info["job_id"])

    def render(event: dict[str, Any]) -> bytes:
        data = {k: v for k, v in event.items() if k != "type"}
        return f"event: {event['type']}\n".encode() + b"data: " + dumps(data) + b"\n\n"

    return await stream_job(request, record.job_id, render)


def add_routes(v1: web.Application) -> None:
    r = v1.router
    r.add_get("/servers", list_servers)
    for user in USERS:
        r.add_get(f"{user}/servers/{{server}}/tools", list_tools)
        r.add_post(f"{user}/servers/{{server}}/tools/{{tool}}/call", call_tool)
        r.add_get(f"{user}/sessions", list_sessions)
        r.add_delete(f"{user}/servers/{{server}}", end_session)
        r.add_put(f"{user}/servers/{{server}}/secrets", put_secrets)
        r.add_get(f"{user}/servers/{{server}}/secrets", list_secrets)
        r.add_delete(f"{user}/servers/{{server}}/secrets/{{name}}", delete_secret)
    r.add_get("/jobs/{job_id}", get_job)
    r.add_get("/jobs/{job_id}/events", job_events)
    r.add_delete("/jobs/{job_id}", cancel_job)
