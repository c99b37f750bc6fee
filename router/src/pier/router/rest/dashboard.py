"""`/dashboard`: a live HTML view of sessions, calls, errors, jobs and tools (polls `/v1/dashboard`)."""

from __future__ import annotations

import time
from importlib import resources

from aiohttp import web
from redis.exceptions import RedisError

from pier.core.errors import PierError
from pier.core.web import json_response
from pier.router.auth.ingress import principal_of
from pier.router.state import router_of

_PAGE = resources.files("pier.router.rest").joinpath("static/dashboard.html")


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE.read_bytes(), content_type="text/html", charset="utf-8")


async def state(request: web.Request) -> web.Response:
    """Everything the page shows. Every tenant is on it, so user keys may not read it."""
    if principal_of(request).key_class == "user":
        raise PierError("FORBIDDEN", "the dashboard needs an app key")
    router = router_of(request)
    sessions = router.backend.list()
    recent = list(router.ingress.recent)
    try:
        jobs = [job.view() for job in await router.store.recent_jobs(25)]
        queue_depth = await router.store.queue_depth()
        dead_letters = await router.store.dead_letter_count()
    except RedisError:
        jobs, queue_depth, dead_letters = [], None, None
    tools: dict[str, list[str]] = {}
    for session in sessions:
        tools.setdefault(session.key.profile, sorted(session.tools))
    return json_response(
        {
            "time": time.time(),
            "backend": router.settings.backend,
            "servers": sorted(router.catalog.profiles),
            "sessions": [s.view() for s in sorted(sessions, key=lambda s: s.created_at)],
            "calls": recent[:25],
            "errors": [c for c in recent if c["outcome"] not in ("completed", "queued", "replayed")][:25],
            "totals": {"calls": router.ingress.total, "errors": router.ingress.errors},
            "jobs": jobs,
            "queue_depth": queue_depth,
            "dead_letters": dead_letters,
            "tools": tools,
            "pools": router.backend.pool_views(),
        }
    )


def add_page(app: web.Application) -> None:
    app.router.add_get("/dashboard", page)


def add_routes(v1: web.Application) -> None:
    v1.router.add_get("/dashboard", state)
