"""The router's aiohttp application: middleware (request id → errors → auth), lifespan, probes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from pier.core import logs
from pier.core.bridge import BridgeClient
from pier.core.catalog import Catalog
from pier.core.errors import PierError
from pier.core.jobstore import JobStore, connect
from pier.core.policy import Policer, PolicyMetrics
from pier.core.tls import CertReloader, client_context, peer_subject, server_context
from pier.core.web import error_response, json_response, too_large
from pier.router import api, compat, dashboard, relay, websocket
from pier.router.auth import KeyRing, presented_key
from pier.router.backends.base import SessionBackend
from pier.router.backends.local import LocalBackend
from pier.router.calls import CallService
from pier.router.config import RouterSettings
from pier.router.context import PRINCIPAL, ROUTER, Router
from pier.router.ratelimit import RateLimiter

log = logging.getLogger("pier.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# No key needed: probes, metrics, the dashboard page (its data needs one), bridgekit's health route.
# bridgekit's `/mcp/events/{job_id}` is public there; here it takes a key like every job route, or
# anyone holding a job id would read another user's result.
PUBLIC = frozenset({"/healthz", "/readyz", "/metrics", "/health", "/dashboard"})
PUBLIC_PREFIXES = ("/static/",)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, log context, and per-route metrics."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    token = logs.bind(request_id=request_id)
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[ROUTER].metrics.requests.labels(label, request.method, str(status)).inc()
        logs.unbind(token)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pier errors become `{"error": …}` (or bridgekit's shape on its routes); nothing leaks a traceback."""
    try:
        return await handler(request)
    except PierError as err:
        if err.http_status >= 500:
            log.warning("request failed", extra={"code": err.code, "why": err.message, "path": request.path})
        if compat.is_compat(request):
            return compat.error_response(err)
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        err = too_large(request.app[ROUTER].settings.max_body_bytes)
        return compat.error_response(err) if compat.is_compat(request) else error_response(err)
    except RedisError as exc:
        # Jobs, idempotency keys and events live in Redis: while it is away, say so and when to retry.
        request.app[ROUTER].metrics.redis_errors.labels("request").inc()
        log.warning("Redis unavailable", extra={"path": request.path, "error": str(exc)})
        err = PierError("STORE_UNAVAILABLE", "Pier's job store (Redis) is unreachable; retry", {"retry_after_s": 1})
        return compat.error_response(err) if compat.is_compat(request) else error_response(err)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error", extra={"path": request.path})
        return error_response(PierError("INTERNAL", "internal error; the request id is in the logs"))


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC or request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    router = request.app[ROUTER]
    request[PRINCIPAL] = router.keys.authenticate(
        presented_key(request), peer_subject(request), router.settings.cert_user_auth
    )
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    try:
        await asyncio.wait_for(router.redis.ping(), 2)
    except (RedisError, TimeoutError, OSError) as exc:
        return json_response({"ready": False, "redis": f"unavailable: {exc}"}, 503)
    return json_response({"ready": True, "redis": "ok", "backend": router.settings.backend})


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    try:
        router.metrics.queue_depth.set(await asyncio.wait_for(router.store.queue_depth(), 2))
    except (RedisError, TimeoutError, OSError):
        router.metrics.redis_errors.labels("metrics").inc()
    return web.Response(body=generate_latest(router.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_backend(router: Router) -> SessionBackend:
    if router.settings.backend == "kubernetes":
        from pier.router.backends.kubernetes import KubernetesBackend  # loads the kubernetes client

        return KubernetesBackend(router.settings, router.bridge, router.metrics, router.http)
    return LocalBackend(router.settings, router.bridge, router.metrics)


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    router.http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False
    )
    s = router.settings
    bridge_ssl = None
    if s.internal_tls_cert is not None:
        bridge_ssl = client_context(s.internal_tls_ca, s.internal_tls_cert, s.internal_tls_key)
    router.bridge = BridgeClient(router.http, bridge_ssl)
    router.redis = connect(router.settings.redis_url)
    router.store = JobStore(router.redis, router.settings.result_ttl_s)
    limits = {"app": s.rate_limit_app_per_min, "user": s.rate_limit_user_per_min, "open": s.rate_limit_open_per_min}
    router.limiter = RateLimiter(router.redis, limits, router.metrics)  # type: ignore[arg-type]
    router.backend = make_backend(router)
    token = s.policy_token.get_secret_value() if s.policy_token else None
    router.policer = Policer(
        router.http, PolicyMetrics(router.metrics.registry), token, s.policy_fail_open, s.policy_timeout_s
    )
    router.calls = CallService(s, router.backend, router.bridge, router.store, router.policer, router.metrics)
    try:
        await router.store.ensure_group()
    except RedisError as exc:
        log.warning("Redis is not reachable yet; jobs and rate limits wait for it", extra={"error": str(exc)})
    await router.backend.start()
    router.store.hub.start()
    reloader = None
    if router.ssl_context is not None and s.tls_cert is not None:
        reloader = CertReloader(router.ssl_context, s.tls_cert, s.tls_key or s.tls_cert, s.tls_reload_s)
        reloader.start()
    if router.keys.open:
        log.warning("NO API KEYS CONFIGURED: the router is open to anyone who can reach it")
    yield
    await router.calls.close()
    if reloader is not None:
        await reloader.stop()
    await router.store.hub.close()
    await router.backend.close()
    await router.http.close()
    await router.redis.aclose()


async def _end_streams(app: web.Application) -> None:
    app[ROUTER].end_streams()


def create_app(settings: RouterSettings, catalog: Catalog | None = None) -> web.Application:
    """The router app. `catalog` defaults to the one `settings` names."""
    catalog = catalog or Catalog.load(settings.profiles, settings.profiles_inline)
    keys = KeyRing.load([k.get_secret_value() for k in settings.app_keys], settings.user_keys, settings.keys_file)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe, errors, authenticate],
        # aiohttp's keep-alive timer also closes a connection still waiting for a whole request
        # head: slow-header clients are dropped after it, as are idle keep-alive connections.
        handler_args={"keepalive_timeout": settings.header_timeout_s},
    )
    app[ROUTER] = Router(settings, catalog, keys)
    if settings.tls_cert is not None:
        key = settings.tls_key or settings.tls_cert
        app[ROUTER].ssl_context = server_context(settings.tls_cert, key, settings.tls_client_ca)
    app.cleanup_ctx.append(_lifespan)
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    api.add_routes(app)
    relay.add_routes(app)
    websocket.add_routes(app)
    compat.add_routes(app)
    dashboard.add_routes(app)
    return app
