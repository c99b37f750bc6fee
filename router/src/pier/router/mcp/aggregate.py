"""`/v1/me/mcp`: one MCP endpoint for every server a user may use, each behind the user's own session.

An agent holds one URL; behind it, every profile of the catalog: tools and prompts named
`{profile}__{name}`, resources addressed `pier-{profile}+{uri}`. Listing starts none of the user's
sessions: what each profile offers is cached per profile (the same for every user), learned once from
a discovery session that belongs to nobody (`DISCOVERY_USER`; idle sessions are reaped as any) — or,
for a profile whose servers need a user's own secrets, from that user's session. A call starts (or
reuses) the user's own session of that one profile, through the same ingress pipeline as every call.

Answers are JSON (one per request); calls that overrun the profile's timeout are answered with an
error naming their job (`JOB_RUNNING`), whose result `/v1/jobs/{id}` serves. The endpoint is
stateless: the session id it hands out is for the client's bookkeeping only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from pier.core import __version__, tracing
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Message,
    TooDeep,
    error_response,
    gateway_error_response,
    is_request,
    parse,
)  # fmt: skip
from pier.core.mcp_client import ask
from pier.core.names import DISCOVERY_USER
from pier.core.protocol import VERSION_HEADER
from pier.core.web import json_response
from pier.router.mcp.messages import connection_answer
from pier.router.middleware import RECEIVED
from pier.router.shared import read_request_body, user_of, with_connect_url
from pier.router.state import Router, router_of

log = logging.getLogger("pier.router.mcp.aggregate")

SEPARATOR = "__"
VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
_OFFER_TTL_S = 600.0  # how long what a profile offers is trusted before it is asked again
_LISTS = {"tools/list": "tools", "prompts/list": "prompts", "resources/list": "resources",
          "resources/templates/list": "resourceTemplates"}  # fmt: skip


class Offers:
    """What each profile's servers offer (tools, prompts, resources), learned once, for every user."""

    def __init__(self) -> None:
        self._offers: dict[str, tuple[float, dict[str, list[dict[str, Any]]]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def of(self, router: Router, profile: Profile, user: str) -> dict[str, list[dict[str, Any]]]:
        cached = self._offers.get(profile.name)
        if cached is not None and time.monotonic() - cached[0] < _OFFER_TTL_S:
            return cached[1]
        async with self._locks.setdefault(profile.name, asyncio.Lock()):
            cached = self._offers.get(profile.name)
            if cached is not None and time.monotonic() - cached[0] < _OFFER_TTL_S:
                return cached[1]
            offers = await _discover(router, profile, user)
            self._offers[profile.name] = (time.monotonic(), offers)
            return offers


OFFERS = web.AppKey("aggregate_offers", Offers)


async def _discover(router: Router, profile: Profile, user: str) -> dict[str, list[dict[str, Any]]]:
    # A server that needs a user's secrets cannot start for nobody: it is asked in this user's session.
    owner = user if profile.carries_user_credentials else DISCOVERY_USER
    session = await router.backend.acquire(owner, profile)
    answers = await ask(
        router.http, session.endpoint.url + "/mcp", [(method, {}) for method in _LISTS],
        session.endpoint.headers(), router.bridge_ssl, router.settings.session_start_timeout_s,
    )  # fmt: skip
    offers: dict[str, list[dict[str, Any]]] = {}
    for key, answer in zip(_LISTS.values(), answers, strict=True):
        offers[key] = (answer.get("result") or {}).get(key, [])  # a server without prompts answers an error
    return offers


def _split(name: str) -> tuple[str, str]:
    profile, sep, rest = name.partition(SEPARATOR)
    if not sep or not rest:
        raise PierError("UNKNOWN_TOOL", f"{name!r} names no server: use {{server}}{SEPARATOR}{{name}}")
    return profile, rest


def _split_uri(uri: str) -> tuple[str, str]:
    head, sep, rest = uri.partition("+")
    if not head.startswith("pier-") or not sep:
        raise PierError("NOT_FOUND", f"{uri!r} is not a resource of this endpoint")
    return head.removeprefix("pier-"), rest


async def mcp(request: web.Request) -> web.StreamResponse:
    router = router_of(request)
    user = user_of(request)
    if request.method == "DELETE":
        return web.Response(status=204)
    if request.method == "GET":
        raise web.HTTPMethodNotAllowed("GET", ["POST", "DELETE"])  # no server-initiated messages here
    raw = await read_request_body(request)
    try:
        payload = parse(raw)
    except TooDeep as exc:
        return json_response(error_response(None, PARSE_ERROR, f"Parse error: {exc}"), 400)
    except ValueError:
        return json_response(error_response(None, PARSE_ERROR, "Parse error: the body is not valid JSON"), 400)
    batch = isinstance(payload, list)
    messages = payload if batch else [payload]
    answers = [await _answer(request, router, user, m) for m in messages if isinstance(m, dict) and is_request(m)]
    if not answers:
        return web.Response(status=202)
    headers = (
        {"Mcp-Session-Id": secrets.token_hex(16)} if any(m.get("method") == "initialize" for m in messages) else {}
    )
    return json_response(answers if batch else answers[0], headers=headers)


async def _answer(request: web.Request, router: Router, user: str, message: Message) -> Message:
    with tracing.mcp_server_span(message) as span:
        answer = await _answer_one(request, router, user, message)
        tracing.record_answer(span, answer)
        return answer


async def _answer_one(request: web.Request, router: Router, user: str, message: Message) -> Message:
    method, params, request_id = message["method"], message.get("params") or {}, message["id"]
    try:
        if method == "initialize":
            requested = params.get("protocolVersion")
            result: dict[str, Any] = {
                "protocolVersion": requested if requested in VERSIONS else VERSIONS[-1],
                "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
                "serverInfo": {"name": "pier", "version": __version__},
                "instructions": f"Every server you may use, each in your own session: names are server{SEPARATOR}name.",
            }
        elif method == "ping":
            result = {}
        elif method in _LISTS:
            result = {_LISTS[method]: await _listing(request, router, user, _LISTS[method])}
        elif method == "tools/call":
            result = await _call(request, router, user, params)
        elif method in ("prompts/get", "resources/read"):
            result = await _forward(request, router, user, method, params)
        else:
            return error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
    except PierError as err:
        if err.code == "CONNECTION_REQUIRED":  # a way to connect, as the client's revision can show it
            version = request.headers.get(VERSION_HEADER)
            return connection_answer(message, with_connect_url(request, err), version, modern=False)
        return gateway_error_response(request_id, err)
    except (KeyError, TypeError, AttributeError):
        return error_response(request_id, INVALID_PARAMS, f"Invalid params for {method}")
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


async def _listing(request: web.Request, router: Router, user: str, key: str) -> list[dict[str, Any]]:
    offers = request.app[OFFERS]
    items: list[dict[str, Any]] = []
    for profile in router.catalog.profiles.values():
        try:
            await router.ingress.admit(request, user, profile.name, "mcp")
            offered = await offers.of(router, profile, user)
        except PierError as err:  # a profile that cannot answer now is left out, not the whole list
            log.warning("a server's offers are unavailable", extra={"profile": profile.name, "code": err.code})
            continue
        for item in offered.get(key, []):
            renamed = dict(item)
            if "name" in renamed and key != "resources":
                renamed["name"] = f"{profile.name}{SEPARATOR}{item['name']}"
            for field in ("uri", "uriTemplate"):
                if field in renamed:
                    renamed[field] = f"pier-{profile.name}+{item[field]}"
            items.append(renamed)
    return items


async def _call(request: web.Request, router: Router, user: str, params: dict[str, Any]) -> dict[str, Any]:
    profile_name, tool = _split(params["name"])
    caller, profile = await router.ingress.admit(request, user, profile_name, "mcp")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise PierError("INVALID_ARGUMENTS", "arguments must be an object")
    result = await router.calls.call(caller, profile, tool, arguments, received_at=request[RECEIVED])
    if result.status == 202:
        job_id = result.body["job_id"]
        raise PierError(
            "JOB_RUNNING", f"the call runs on as job {job_id}; its result will be at /v1/jobs/{job_id}",
            {"job_id": job_id, "poll_url": result.body["poll_url"]},
        )  # fmt: skip
    answer: dict[str, Any] = result.body["result"]
    return answer


async def _forward(request: web.Request, router: Router, user: str, method: str, params: dict[str, Any]) -> Any:
    if method == "prompts/get":
        profile_name, name = _split(params["name"])
        params = {**params, "name": name}
    else:
        profile_name, uri = _split_uri(params["uri"])
        params = {**params, "uri": uri}
    _, profile = await router.ingress.admit(request, user, profile_name, "mcp")
    session = await router.backend.acquire(user, profile)
    [answer] = await ask(
        router.http, session.endpoint.url + "/mcp", [(method, params)], session.endpoint.headers(), router.bridge_ssl
    )
    if "error" in answer:
        raise PierError("SERVER_ERROR", str(answer["error"].get("message")), {"jsonrpc_error": answer["error"]})
    return answer["result"]


def add_routes(v1: web.Application) -> None:
    v1[OFFERS] = Offers()
    for method in ("POST", "GET", "DELETE"):
        v1.router.add_route(method, "/me/mcp", mcp)
