"""The router's middleware: request ids and metrics (every route), and, for the API's routes, error
rendering and identity (the first step of the ingress pipeline: `auth.ingress`).

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

from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from pier.core import logs
from pier.core.errors import PierError
from pier.core.web import too_large
from pier.router.auth.protected_resource import with_challenge
from pier.router.processes import HandedOver
from pier.router.state import router_of

log = logging.getLogger("pier.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RECEIVED = web.RequestKey("received", float)  # time.monotonic() when the request arrived: deadlines count from it
Render = Callable[[web.Request, PierError], web.Response]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, log context, per-route metrics; the moment the request arrived."""
    request[RECEIVED] = time.monotonic()
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    token = logs.bind(request_id=request_id)
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    status: int | None = 500
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
        logs.unbind(token)


def errors(render: Render) -> Middleware:
    """Failures become answers `render` makes (with the OAuth challenge where one is due); nothing
    leaks a traceback, nothing is a bare 500."""

    def answer(request: web.Request, err: PierError) -> web.Response:
        return with_challenge(request, err, render(request, err))

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


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identity first: no handler runs for a caller the ingress pipeline does not know."""
    await router_of(request).ingress.identify(request)
    return await handler(request)
