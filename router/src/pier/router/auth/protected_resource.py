"""This router as an OAuth 2.0 protected resource (RFC 9728), as MCP clients expect of a server.

`/.well-known/oauth-protected-resource` describes the router (its resource identifier, the trusted
authorization servers, the scopes it requires), and `/.well-known/oauth-protected-resource<path>`
each of its endpoints, the resource being that endpoint's URL. A 401 tells the client where to
look (`WWW-Authenticate: Bearer resource_metadata="…"`), and a 403 for a missing scope says which
(`error="insufficient_scope", scope="…"`), so an MCP client can discover the provider and sign in.
"""

from __future__ import annotations

from aiohttp import web

from pier.core.errors import PierError
from pier.core.web import json_response
from pier.router.auth.oidc import router_url
from pier.router.state import router_of

METADATA_PATH = "/.well-known/oauth-protected-resource"


def base_url(request: web.Request) -> str:
    return router_url(request, router_of(request).settings.public_url)


def challenge(request: web.Request, err: PierError) -> str | None:
    """The `WWW-Authenticate` value for a refused request, when tokens are accepted at all."""
    verifier = router_of(request).ingress.verifier
    if verifier is None:
        return None
    parts = [f'resource_metadata="{base_url(request)}{METADATA_PATH}{request.path}"']
    reason = err.details.get("reason")
    if reason == "insufficient_scope":
        parts.append('error="insufficient_scope"')
    elif reason == "invalid_token":
        parts.append('error="invalid_token"')
    scopes = verifier.scopes()
    if scopes:
        parts.append(f'scope="{" ".join(scopes)}"')
    return "Bearer " + ", ".join(parts)


async def metadata(request: web.Request) -> web.Response:
    """Protected Resource Metadata of the router, or (with a path) of one of its endpoints."""
    verifier = router_of(request).ingress.verifier
    if verifier is None:
        raise web.HTTPNotFound(text="no identity provider is configured")
    path = request.match_info.get("path", "")
    body: dict[str, object] = {
        "resource": base_url(request) + (f"/{path}" if path else ""),
        "authorization_servers": verifier.authorization_servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Pier",
    }
    scopes = verifier.scopes()
    if scopes:
        body["scopes_supported"] = scopes
    return json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get(METADATA_PATH, metadata)
    app.router.add_get(METADATA_PATH + "/{path:.+}", metadata)


def with_challenge(request: web.Request, err: PierError, response: web.Response) -> web.Response:
    """`response` (an error), with the challenge when it is a 401 or a missing scope."""
    if err.code == "UNAUTHENTICATED" or err.details.get("reason") == "insufficient_scope":
        value = challenge(request, err)
        if value is not None:
            response.headers["WWW-Authenticate"] = value
    return response
