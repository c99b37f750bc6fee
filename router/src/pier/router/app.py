"""The router's aiohttp application.

Shape: a root app (request ids and metrics for everything; probes, `/metrics`, the dashboard page)
with the v1 API as a sub-application at `/v1` (Pier's error shape, identity first: `rest.v1`,
`mcp.relay`, `mcp.websocket`, `mcp.aggregate`, `rest.dashboard`), and bridgekit's routes at the root
(its own error shape: `rest.bridgekit`).

Each resource the router holds is opened by one cleanup context, in dependency order, so a start
that fails half-way closes exactly what it had opened, and shutdown closes them in reverse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError

from pier.core import tracing
from pier.core.catalog import Catalog
from pier.core.errors import ConfigError
from pier.core.jobstore import JobStore, connect
from pier.core.policy import Gate, Policer, PolicyMetrics
from pier.core.tls import CertReloader, client_context, server_context
from pier.core.web import error_response, json_response
from pier.router.accounts.service import Accounts
from pier.router.accounts.store import RedisConnectionStore
from pier.router.auth import protected_resource
from pier.router.auth.ingress import PRINCIPAL, Ingress
from pier.router.auth.keys import KeyRing
from pier.router.auth.oidc import TokenVerifier
from pier.router.auth.ratelimit import RateLimiter
from pier.router.auth.signin import PortalSessions, SignIn, signin_configured
from pier.router.backends.base import SessionBackend
from pier.router.calls import CallService
from pier.router.config import RouterSettings
from pier.router.mcp import aggregate, relay, websocket
from pier.router.mcp.sessions import McpSessions
from pier.router.middleware import ACCESS_LOG, authenticate, errors, observe
from pier.router.processes import Peers, steering
from pier.router.rest import accounts, bridgekit, dashboard, portal, registry
from pier.router.rest import v1 as rest_v1
from pier.router.state import ROUTER, Router
from pier.router.usersecrets import RedisSecretStore, Sealer
from pier.router.wanted import SessionFinder

log = logging.getLogger("pier.router")


# -- probes and metrics ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    try:
        await asyncio.wait_for(router.redis.ping(), 2)
    except (RedisError, TimeoutError, OSError) as exc:
        router.metrics.ready.set(0)
        return json_response({"ready": False, "redis": f"unavailable: {exc}"}, 503)
    router.metrics.ready.set(1)
    return json_response({"ready": True, "redis": "ok", "backend": router.settings.backend})


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    m = router.metrics
    up = 0
    try:
        async with asyncio.timeout(2):
            stats = await router.store.queue_stats()
            dead = await router.store.dead_letter_count()
    except (RedisError, TimeoutError, OSError):
        m.redis_errors.labels("metrics").inc()
    else:
        up = 1
        m.queue_depth.set(stats.length)
        m.queue_lag.set(stats.queued)
        m.oldest_queued.set(stats.oldest_queued_s)
        m.dead_letters.set(dead)
    m.redis_up.set(up)
    m.ready.set(up)  # ready is Redis answering, as /readyz says
    registry = m.registry
    if router.peers is not None:  # every process's metrics, added up (their files in the run directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def caller_user(request: web.Request) -> str | None:
    """The identified caller's own user, for steering: None on an open route (the OAuth callback), where
    nobody is identified and the user is known only once the state is taken."""
    principal = request.get(PRINCIPAL)
    return principal.user_id if principal is not None else None


# -- resources, one cleanup context each ----------------------------------------------------------


async def traces(app: web.Application) -> AsyncIterator[None]:
    """Spans exported over OTLP when the `OTEL_*` variables name an endpoint (first in, last out: every
    other resource's work is traced); what is queued is exported at shutdown, within a bound."""
    tracing.start("pier-router")
    yield
    await asyncio.to_thread(tracing.stop)


async def http_client(app: web.Application) -> AsyncIterator[None]:
    """The connection pool to bridges and the policy hook (with internal mTLS when configured)."""
    router, s = app[ROUTER], app[ROUTER].settings
    if s.internal_tls_cert is not None:
        router.bridge_ssl = client_context(s.internal_tls_ca, s.internal_tls_cert, s.internal_tls_key)
    router.http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False
    )
    yield
    await router.http.close()


async def job_store(app: web.Application) -> AsyncIterator[None]:
    """Redis: job records, the stream, job events (one subscription for the process), rate limits, MCP
    client sessions."""
    router = app[ROUTER]
    router.redis = connect(router.settings.redis_url)
    router.store = JobStore(router.redis, router.settings.result_ttl_s)
    router.mcp_sessions = McpSessions(router.redis, router.settings.mcp_session_ttl_s, router.metrics)
    try:
        await router.store.ensure_group()
    except RedisError as exc:
        log.warning("Redis is not reachable yet; jobs and rate limits wait for it", extra={"error": str(exc)})
    router.store.hub.start()
    yield
    await router.store.hub.close()
    await router.redis.aclose()


async def session_backend(app: web.Application) -> AsyncIterator[None]:
    """Local sessions (processes, or bridges in this process) or Kubernetes MCPSessions; and users'
    connected accounts, whose tokens those sessions take."""
    router = app[ROUTER]
    router.accounts = make_accounts(router)
    router.backend = make_backend(router)
    await router.backend.start()
    if router.accounts is not None and router.backend.connections is not None:
        router.accounts.store = router.backend.connections  # (Kubernetes: Secrets, reachable once started)
    yield
    await router.backend.close()


def _sealer(router: Router, why: str) -> Sealer:
    key = router.settings.secrets_key
    if key is None:
        raise ConfigError(f"{why}: set PIER_SECRETS_KEY (base64 of 32 random bytes)")
    try:
        return Sealer(key.get_secret_value())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_accounts(router: Router) -> Accounts | None:
    """Connected accounts and exchanged tokens, when a profile has them or the portal signs users in."""
    s, profiles = router.settings, list(router.catalog.profiles.values())
    named = [p.name for p in profiles if p.token_delivery is not None]
    if not named and not signin_configured(s):
        return None
    why = f"profiles {', '.join(named)} keep users' tokens" if named else "the portal keeps signed-in sessions"
    sealer = _sealer(router, why)
    if any(p.token_exchange for p in profiles) and not (s.oidc_client_id and s.issuers()):
        raise ConfigError(
            "token exchange needs the router's client at the identity provider: "
            "set PIER_OIDC_ISSUER and PIER_OIDC_CLIENT_ID"
        )
    store = RedisConnectionStore(router.redis, sealer)  # (Kubernetes: replaced by its Secrets once started)
    return Accounts(s, router.catalog, router.http, router.redis, sealer, store, router.metrics)


def make_backend(router: Router) -> SessionBackend:
    s = router.settings
    if s.backend == "kubernetes":
        from pier.router.backends.kubernetes import KubernetesBackend  # loads the kubernetes client

        return KubernetesBackend(s, router.metrics, router.http, router.bridge_ssl, router.accounts)
    profiles = list(router.catalog.profiles.values())
    if router.peers is not None:  # each process holds its share of the sessions, and of every warm pool
        n = router.peers.count
        s = s.model_copy(update={"max_sessions": -(-s.max_sessions // n)})
        profiles = [p.model_copy(update={"warm_pool": -(-p.warm_pool // n)}) for p in profiles]
    secrets = None
    if s.secrets_key is not None:
        secrets = RedisSecretStore(router.redis, _sealer(router, "users' secrets"))
    elif any(p.user_secrets for p in profiles):
        names = ", ".join(p.name for p in profiles if p.user_secrets)
        raise ConfigError(f"profiles {names} take users' secrets: set PIER_SECRETS_KEY (base64 of 32 random bytes)")
    from pier.router.backends.local import LocalBackend
    from pier.router.backends.local.isolation import Isolation
    from pier.router.backends.local.runtimes import InProcessRuntime, ProcessRuntime, Runtime

    runtime: Runtime
    if s.local_bridges == "inprocess":
        runtime = InProcessRuntime(s, Isolation(s))
    else:
        runtime = ProcessRuntime(s, Isolation(s), router.http, router.bridge_ssl)
    # Connected accounts' client secrets are the router's alone: no server inherits them.
    runtime.private_env = frozenset(
        p.upstream_oauth.client_secret_env for p in profiles if p.upstream_oauth and p.upstream_oauth.client_secret_env
    )
    return LocalBackend(s, runtime, router.metrics, profiles, secrets, router.accounts)


async def pipeline(app: web.Application) -> AsyncIterator[None]:
    """The ingress pipeline (identity → rules and policy → audit and accounting) and the call service."""
    router, s = app[ROUTER], app[ROUTER].settings
    limits = {"app": s.rate_limit_app_per_min, "user": s.rate_limit_user_per_min, "open": s.rate_limit_open_per_min}
    token = s.policy_token.get_secret_value() if s.policy_token else None
    policy_metrics = PolicyMetrics(router.metrics.registry)
    policer = Policer(router.http, policy_metrics, token, s.policy_fail_open, s.policy_timeout_s)
    issuers = s.issuers()
    verifier = TokenVerifier(issuers, router.http, s.public_url) if issuers else None
    router.ingress = Ingress(
        s, router.catalog, router.keys, RateLimiter(router.redis, limits, router.metrics),  # type: ignore[arg-type]
        Gate(policer, s.audit_log), router.metrics, verifier,
    )  # fmt: skip
    router.calls = CallService(s, router.backend, router.store, router.ingress, router.metrics)
    if router.accounts is not None and verifier is not None and signin_configured(s):
        sessions = PortalSessions(router.redis, router.accounts.sealer, s.portal_session_ttl_s)
        router.ingress.portal = sessions
        router.signin = SignIn(s, router.accounts, verifier, sessions)
    if router.keys.open:
        log.warning("NO API KEYS CONFIGURED: the router is open to anyone who can reach it")
    yield
    await router.calls.close()


async def wanted_sessions(app: web.Application) -> AsyncIterator[None]:
    """Sessions the job pool wants found again (re-runs of jobs whose session moved): any replica serves them."""
    finder = SessionFinder(app[ROUTER])
    finder.start()
    yield
    await finder.close()


async def certificates(app: web.Application) -> AsyncIterator[None]:
    """HTTPS certificates, reloaded in place when their files change."""
    router, s = app[ROUTER], app[ROUTER].settings
    if router.ssl_context is None or s.tls_cert is None:
        yield
        return
    reloader = CertReloader(router.ssl_context, s.tls_cert, s.tls_key or s.tls_cert, s.tls_reload_s)
    reloader.start()
    yield
    await reloader.stop()


async def _end_streams(app: web.Application) -> None:
    app[ROUTER].end_streams()


# -- the app ------------------------------------------------------------------------------------


def create_app(settings: RouterSettings, catalog: Catalog | None = None, peers: Peers | None = None) -> web.Application:
    """The router app. `catalog` defaults to the one `settings` names; `peers`: the router's other
    processes, when it runs several (`processes`)."""
    catalog = catalog or Catalog.load(settings.profiles, settings.profiles_inline)
    app_keys = [k.get_secret_value() for k in settings.app_keys]
    keys = KeyRing.load(app_keys, settings.user_keys, settings.keys_file, closed=bool(settings.issuers()))
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe],
        # aiohttp's keep-alive timer also closes a connection still waiting for a whole request
        # head: slow-header clients are dropped after it, as are idle keep-alive connections.
        handler_args={"keepalive_timeout": settings.header_timeout_s, "access_log_class": ACCESS_LOG},
    )
    app[ROUTER] = Router(settings, catalog, keys, peers=peers)
    app[ROUTER].metrics.registry.register(tracing.span_metrics())
    app[ROUTER].metrics.known_profiles(catalog.profiles)
    if settings.tls_cert is not None:
        key = settings.tls_key or settings.tls_cert
        app[ROUTER].ssl_context = server_context(settings.tls_cert, key, settings.tls_client_ca)
    app.cleanup_ctx.extend([traces, http_client, job_store, session_backend, pipeline, wanted_sessions, certificates])
    app.on_shutdown.append(_end_streams)

    # Open to anyone: probes, metrics, the dashboard page (its data needs an app key).
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    dashboard.add_page(app)
    portal.add_routes(app)  # (its own sign-in: the cookie, CSRF tokens on every form)
    protected_resource.add_routes(app)

    render = errors(lambda request, err: error_response(err))
    middlewares = [render, authenticate]
    if peers is not None:  # after identity: `/v1/me/…` names its user by the caller's token or key
        middlewares.append(steering(peers, caller_user))
    v1 = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    rest_v1.add_routes(v1)
    accounts.add_routes(v1)
    relay.add_routes(v1)
    websocket.add_routes(v1, settings)
    aggregate.add_routes(v1)
    dashboard.add_routes(v1)
    app.add_subapp("/v1", v1)
    # The MCP registry API (v0.1): the catalog as server.json documents, for whoever may use them.
    v0 = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[errors(registry.render_error), authenticate]
    )
    registry.add_routes(v0)
    app.add_subapp("/v0.1", v0)

    bridgekit.add_routes(app)
    return app
