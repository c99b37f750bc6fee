"""The native MCP relay: `/v1/users/{user}/servers/{server}/mcp` streamed to the session's bridge.

Bodies and responses (SSE included) are streamed both ways unchanged; only the router's own
credentials are swapped for the session's token. MCP sessions belong to the bridge: if the
bridge is replaced, the client gets the spec's 404 and initializes again.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from pier.errors import PierError
from pier.router.backends.base import Session
from pier.router.context import ROUTER, Router
from pier.sidecar.client import BridgeUnreachable
from pier.web import origin_allowed

# Headers of the MCP transport that pass through; everything else stays on its side.
_REQUEST_HEADERS = ("Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID")
_RESPONSE_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control")


async def relay(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, router.settings.allowed_origins):
        raise PierError("FORBIDDEN", f"origin {origin!r} is not allowed")
    user, server = request.match_info["user"], request.match_info["server"]
    profile = await router.target(request, user, server)
    body = await request.read() if request.method == "POST" else None
    headers = {name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers}

    if request.method == "GET":
        # A held GET stream is not a call in flight: it must not keep an idle session alive forever.
        session = await router.backend.acquire(user, profile)
        return await _forward(router, request, session, headers, body)
    async with router.backend.use(user, profile) as session:
        try:
            return await _forward(router, request, session, headers, body)
        except BridgeUnreachable:
            await router.backend.forget(session, "unreachable")
    # The bridge was gone: a fresh session answers (an old MCP session id gets its 404 there).
    async with router.backend.use(user, profile) as session:
        return await _forward(router, request, session, headers, body)


async def _forward(
    router: Router, request: web.Request, session: Session, headers: dict[str, str], body: bytes | None
) -> web.StreamResponse:
    try:
        upstream = await router.http.request(
            request.method,
            session.endpoint.url + "/mcp",
            headers={**headers, **session.endpoint.headers()},
            data=body,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
    except (aiohttp.ClientError, OSError) as exc:
        raise BridgeUnreachable(session.endpoint, exc) from exc
    async with upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={name: upstream.headers[name] for name in _RESPONSE_HEADERS if name in upstream.headers},
        )
        await response.prepare(request)
        try:
            with router.streaming():
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientError):
            pass  # either side hung up; the bridge keeps the calls running
        return response


def add_routes(app: web.Application) -> None:
    path = "/v1/users/{user}/servers/{server}/mcp"
    app.router.add_post(path, relay)
    app.router.add_get(path, relay)
    app.router.add_delete(path, relay)
