"""The router's middleware: request ids, metrics and the HTTP server span (every route but the probes),
and, for the API's routes, error rendering and identity (the first step of the ingress pipeline:
`auth.ingress`).

Errors are rendered by whoever owns the routes: the v1 API in Pier's shape
(`{"error": {"code", "message", "details"}}`), bridgekit's routes in bridgekit's (`rest.bridgekit`);
either way a refusal for want of a credential carries the OAuth challenge (`auth.protected_resource`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from redis.exceptions import RedisError

from pier.core import logs, tracing
from pier.core.errors import PierError
from pier.core.web import too_large
from pier.router.auth.keys import presented_key
from pier.router.auth.protected_resource import with_challenge
from pier.router.processes import HandedOver
from pier.router.shared import with_connect_url
from pier.router.state import router_of

log = logging.getLogger("pier.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RECEIVED = web.RequestKey("received", float)  # time.monotonic() when the request arrived: deadlines count from it
ERROR_CODE = web.RequestKey("error_code", str)  # the PierError its answer carries, for the request's span
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: many, and nothing to follow
Render = Callable[[web.Request, PierError], web.Response]


# Where an authorization server sends a browser back: its query holds an authorization code.
CALLBACK_PATHS = frozenset({"/v1/oauth/callback", "/portal/callback"})


class AccessLog(AccessLogger):
    """aiohttp's access log (when a platform turns it on), without what a log must not hold: the query of
    an OAuth callback (its authorization code) and a Referer that carries one."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        referer = request.headers.get("Referer", "")
        if request.path in CALLBACK_PATHS or "code=" in referer:
            headers = {**request.headers, "Referer": referer.split("?", 1)[0]} if referer else request.headers
            request = request.clone(rel_url=request.rel_url.with_query(None), headers=headers)
        super().log(request, response, time)


ACCESS_LOG: type[AbstractAccessLogger] = AccessLog


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, log context, per-route metrics, the request's span (its parent the caller's
    `traceparent`); the moment the request arrived."""
    request[RECEIVED] = time.monotonic()
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    token = logs.bind(request_id=request_id)
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    status: int | None = 500
    with _server_span(request, label, request_id) as span:
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except HandedOver:
            # Another router process serves this request (and its connection): it counts it, not this one.
            # aiohttp ends a handler whose connection went away by its cancellation: so does this one.
            status = None
            raise asyncio.CancelledError from None
        finally:
            if status is not None:
                router_of(request).metrics.requests.labels(label, request.method, str(status)).inc()
                if span.recording:
                    _answered(span, status, request.get(ERROR_CODE))
            logs.unbind(token)


def _server_span(request: web.Request, route: str, request_id: str) -> tracing.Scope:
    """The HTTP server span of a request (semantic conventions: `{method} {route}`)."""
    if request.path in _UNTRACED:
        return tracing.nothing()
    if not tracing.enabled():  # nothing recorded: only the caller's context, for logs and what is sent on
        return tracing.span("", parent=tracing.from_headers(request.headers))
    attributes: dict[str, str | int] = {
        "http.request.method": request.method, "url.path": request.path, "url.scheme": request.scheme,
        "server.address": request.host.rsplit(":", 1)[0], "pier.request_id": request_id,
    }  # fmt: skip
    if route != "unmatched":
        attributes["http.route"] = route
    if request.remote:
        attributes["client.address"] = request.remote
    agent = request.headers.get("User-Agent")
    if agent:
        attributes["user_agent.original"] = agent[:200]
    name = f"{request.method} {route}" if route != "unmatched" else request.method
    return tracing.span(name, "server", attributes, parent=tracing.from_headers(request.headers))


def _answered(span: tracing.Span, status: int, code: str | None) -> None:
    span.set("http.response.status_code", status)
    if code is not None:
        span.set("pier.error.code", code)
    if status >= 500:  # a 4xx is the caller's error, not the server's (HTTP conventions)
        span.fail(code or str(status))


def errors(render: Render) -> Middleware:
    """Failures become answers `render` makes (with the OAuth challenge where one is due); nothing
    leaks a traceback, nothing is a bare 500."""

    def answer(request: web.Request, err: PierError) -> web.Response:
        request[ERROR_CODE] = err.code
        return with_challenge(request, err, render(request, with_connect_url(request, err)))

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except PierError as err:
            if err.http_status >= 500:
                log.warning("request failed", extra={"code": err.code, "why": err.message, "path": request.path})
            return answer(request, err)
        except web.HTTPRequestEntityTooLarge:
            return answer(request, too_large(router_of(request).settings.max_body_bytes))
        except RedisError as exc:
            # Jobs, idempotency keys and events live in Redis: while it is away, say so and when to retry.
            router_of(request).metrics.redis_errors.labels("request").inc()
            log.warning("Redis unavailable", extra={"path": request.path, "error": str(exc)})
            return answer(
                request,
                PierError("STORE_UNAVAILABLE", "Pier's job store (Redis) is unreachable; retry", {"retry_after_s": 1}),
            )
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error", extra={"path": request.path})
            return answer(request, PierError("INTERNAL", "internal error; the request id is in the logs"))

    return middleware


OPEN = "open"  # a route anyone may reach (the OAuth callback: the browser brings no credential)
COOKIE = "cookie"  # a route a browser opens: the portal's sign-in cookie identifies its user too


def access(kind: str) -> Callable[[Handler], Handler]:
    """Mark a route's handler as `OPEN` or `COOKIE` (see `authenticate`)."""

    def mark(handler: Handler) -> Handler:
        handler.pier_access = kind  # type: ignore[attr-defined]
        return handler

    return mark


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identity first: no handler runs for a caller the ingress pipeline does not know. A browser that
    opens a cookie route unsigned is sent to sign in, then back."""
    kind = getattr(request.match_info.handler, "pier_access", None)
    if kind == OPEN:
        return await handler(request)
    router = router_of(request)
    try:
        await router.ingress.identify(request, cookie=kind == COOKIE)
    except PierError as err:
        if kind == COOKIE and err.code == "UNAUTHENTICATED" and _signs_in(request):
            raise web.HTTPFound("/portal/login?" + urlencode({"next": request.path_qs})) from None
        raise
    return await handler(request)


def _signs_in(request: web.Request) -> bool:
    """A browser (it asks for HTML) with no credential of its own, where the portal can sign it in."""
    router = router_of(request)
    return (
        request.method == "GET" and router.ingress.portal is not None
        and "text/html" in request.headers.get("Accept", "") and presented_key(request) is None
    )  # fmt: skip
