"""The MCP registry API (v0.1) over the router's own catalog (the `/v0.1` sub-application): each profile the
caller may use as a `server.json` whose remote is that caller's own endpoint, so a registry-aware MCP client
can find and add Pier's servers by itself.

`GET /v0.1/servers` (`cursor`, `limit`, `search`, `version`), `GET /v0.1/servers/{name}/versions` and
`GET /v0.1/servers/{name}/versions/{version}` (`latest`), in the registry's shapes (`ServerList`,
`ServerResponse`; errors `{"error": "…"}`). A profile a caller may not use is not listed, and is not found.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from aiohttp import web

from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.registry import ListMetadata, ServerList, ServerResponse, namespace_of, to_server_json
from pier.core.web import json_response
from pier.router.auth.ingress import groups_of, principal_of
from pier.router.shared import base_url
from pier.router.state import router_of

OFFICIAL = "io.modelcontextprotocol.registry/official"
_DEFAULT_LIMIT = 30
_MAX_LIMIT = 100
_STARTED = dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat().replace("+00:00", "Z")


def _usable(request: web.Request) -> list[Profile]:
    groups = groups_of(principal_of(request))
    router = router_of(request)
    return sorted((p for p in router.catalog.profiles.values() if p.usable_by(groups)), key=lambda p: p.name)


def _response(request: web.Request, profile: Profile) -> ServerResponse:
    router = router_of(request)
    base = base_url(request)
    namespace = router.settings.registry_namespace or namespace_of(base)
    keyed = router.ingress.verifier is None and not router.keys.open
    server = to_server_json(profile, base, namespace, keyed)
    meta = {OFFICIAL: {"status": "active", "publishedAt": _STARTED, "updatedAt": _STARTED, "isLatest": True}}
    return ServerResponse(server=server, _meta=meta)


def _body(model: ServerList | ServerResponse) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


async def list_servers(request: web.Request) -> web.Response:
    limit = _int(request.query.get("limit"), _DEFAULT_LIMIT)
    if not 1 <= limit <= _MAX_LIMIT:
        raise PierError("BAD_REQUEST", f"limit is 1 to {_MAX_LIMIT}")
    search = request.query.get("search", "").lower()
    version = request.query.get("version")
    cursor = request.query.get("cursor", "")
    items = [_response(request, p) for p in _usable(request)]
    items = [i for i in items if search in i.server.name.lower() and version in (None, "latest", i.server.version)]
    items = [i for i in items if i.server.name > cursor] if cursor else items
    page = items[:limit]
    next_cursor = page[-1].server.name if len(items) > limit else None
    listing = ServerList(servers=page, metadata=ListMetadata(nextCursor=next_cursor, count=len(page)))
    return json_response(_body(listing))


def _find(request: web.Request) -> ServerResponse:
    name = request.match_info["name"]
    for profile in _usable(request):
        found = _response(request, profile)
        if found.server.name == name:
            return found
    raise PierError("NOT_FOUND", "Server not found")


async def versions(request: web.Request) -> web.Response:
    found = _find(request)
    return json_response(_body(ServerList(servers=[found], metadata=ListMetadata(count=1))))


async def version(request: web.Request) -> web.Response:
    found = _find(request)
    wanted = request.match_info["version"]
    if wanted not in ("latest", found.server.version):
        raise PierError("NOT_FOUND", "Server version not found")
    return json_response(_body(found))


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        raise PierError("BAD_REQUEST", "limit is a number") from None


def add_routes(v0: web.Application) -> None:
    v0.router.add_get("/servers", list_servers)
    # A name is `namespace/server`: clients send its slash encoded (%2F), some do not.
    v0.router.add_get("/servers/{name:.+}/versions/{version}", version)
    v0.router.add_get("/servers/{name:.+}/versions", versions)


def render_error(request: web.Request, err: PierError) -> web.Response:
    """The registry's error shape: `{"error": "…"}`."""
    return json_response({"error": err.message}, err.http_status)
