"""What the router's wings share (`rest/`, `mcp/`): no route module imports another, they import this.

The user a request acts for (`USERS`, `user_of`), its body (`read_request_body`, `read_model`),
and the job it names: loaded for its owner (`load_job`), streamed as SSE (`stream_job`), cancelled
(`cancel_job`: a REST job and an MCP task are the same thing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import pydantic
from aiohttp import web
from pydantic import BaseModel

from pier.core.callapi import Endpoint
from pier.core.errors import PierError
from pier.core.job import JobRecord
from pier.core.jsonrpc import MAX_DEPTH, TooDeep, parse
from pier.core.web import SSE_HEADERS, read_body
from pier.router.auth.ingress import principal_of
from pier.router.auth.oidc import router_url
from pier.router.state import Router, router_of

M = TypeVar("M", bound=BaseModel)
JOB_EVENTS_TIMEOUT_S = 3600.0

# A user's resources, under the URL that names the user and under the caller's own (`/v1/me`).
USERS = ("/users/{user}", "/me")


def user_of(request: web.Request) -> str:
    """The user a request acts for: the one its URL names, or, on `/v1/me/…`, the caller's own."""
    user = request.match_info.get("user")
    if user is not None:
        return user
    principal = principal_of(request)
    if principal.user_id is None:
        raise PierError(
            "FORBIDDEN", "/v1/me/… acts for the signed-in user (a token or a user key); an app key names the user"
        )
    return principal.user_id


def base_url(request: web.Request) -> str:
    """The router's URL as its callers reach it (PIER_PUBLIC_URL, else as this request did)."""
    return router_url(request, router_of(request).settings.public_url)


def connect_url(request: web.Request, server: str) -> str:
    """Where a user's browser goes to connect their account for `server` (they sign in there if need be)."""
    return f"{base_url(request)}/v1/me/servers/{server}/connect"


def with_connect_url(request: web.Request, err: PierError) -> PierError:
    """A CONNECTION_REQUIRED error with the URL its user opens to connect (`details.connect_url`)."""
    server = err.details.get("server")
    if err.code == "CONNECTION_REQUIRED" and isinstance(server, str) and "connect_url" not in err.details:
        err.details["connect_url"] = connect_url(request, server)
    return err


# -- bodies ---------------------------------------------------------------------------------------


async def read_request_body(request: web.Request) -> bytes:
    """The body, within the router's size and time limits (413, 408)."""
    settings = router_of(request).settings
    return await read_body(request, settings.max_body_bytes, settings.body_timeout_s)


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


# -- jobs -----------------------------------------------------------------------------------------


async def load_job(request: web.Request, job_id: str) -> JobRecord:
    """The job `job_id`, if the caller may see it (JOB_NOT_FOUND, FORBIDDEN)."""
    record = await router_of(request).store.get(job_id)
    if record is None:
        raise PierError("JOB_NOT_FOUND", f"no job {job_id!r} (results expire after their TTL)")
    principal_of(request).check_user(record.user)
    return record


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


async def cancel_job(router: Router, record: JobRecord) -> JobRecord:
    """Cancel a job (`DELETE /v1/jobs/{id}` and `tasks/cancel` alike): the call on its bridge gets
    `notifications/cancelled`, the record ends `cancelled` unless it ended first."""
    if record.done:
        return record
    if record.endpoint:
        # If the session is gone, so is the call.
        with contextlib.suppress(PierError):
            await router.http_bridge(Endpoint(record.endpoint, record.endpoint_token)).cancel_call(record.call_id)
    cancelled = PierError("CANCELLED", "cancelled by the caller")
    # A worker following the call may have seen the cancellation first and ended the job
    # itself: then the stored record, not the one read before, says how it ended.
    ended = await router.store.finish(record.job_id, "cancelled", error=cancelled)
    return ended or await router.store.get(record.job_id) or record
