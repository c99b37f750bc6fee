"""`/dashboard`: a live HTML view of sessions, calls, errors, jobs and tools (polls `/v1/dashboard`)."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from pier.core.errors import PierError
from pier.core.web import json_response
from pier.router.auth.ingress import principal_of
from pier.router.processes import ask_peers
from pier.router.state import Router, router_of

_PAGE = resources.files("pier.router.rest").joinpath("static/dashboard.html")


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE.read_bytes(), content_type="text/html", charset="utf-8")


async def state(request: web.Request) -> web.Response:
    """Everything the page shows. Every tenant is on it, so user keys may not read it.

    With several router processes, the one asked adds up every other's (`?scope=process`: its own only).
    """
    if principal_of(request).key_class == "user":
        raise PierError("FORBIDDEN", "the dashboard needs an app key")
    router = router_of(request)
    view = await _process_view(router)
    peers = router.peers
    if peers is not None and request.query.get("scope") != "process":
        asked = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")}
        for other in await ask_peers(peers, "/v1/dashboard?scope=process", asked):
            _add(view, other)
    return json_response(view)


def _add(view: dict[str, Any], other: dict[str, Any]) -> None:
    """Another process's view into `view`: its sessions, calls, errors, tools and pools too."""
    view["sessions"] = sorted([*view["sessions"], *other["sessions"]], key=lambda s: s["created_at"])
    for key in ("calls", "errors"):
        view[key] = sorted([*view[key], *other[key]], key=lambda c: -c["at"])[:25]
    for key in ("calls", "errors"):
        view["totals"][key] += other["totals"][key]
    for profile, names in other["tools"].items():
        view["tools"].setdefault(profile, names)
    pools = {pool["server"]: pool for pool in view["pools"]}
    for pool in other["pools"]:
        mine = pools.setdefault(pool["server"], {**pool, **dict.fromkeys(_POOL_COUNTS, 0)})
        for count in _POOL_COUNTS:
            mine[count] += pool[count]
    view["pools"] = list(pools.values())


_POOL_COUNTS = ("size", "ready", "starting", "claims", "misses")


async def _process_view(router: Router) -> dict[str, Any]:
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
    return {
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


def add_page(app: web.Application) -> None:
    app.router.add_get("/dashboard", page)


def add_routes(v1: web.Application) -> None:
    v1.router.add_get("/dashboard", state)
