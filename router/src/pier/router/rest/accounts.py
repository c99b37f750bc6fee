"""Connected accounts over HTTP: connect (a browser is sent to the provider; an app gets the URL), the
provider's callback, the connection's state (never a token), and disconnecting.

| route | who |
|---|---|
| `GET /v1/me/servers/{server}/connect` | the user's browser (portal cookie, token or user key): 302 to the provider |
| `GET /v1/users/{user}/servers/{server}/connect` | an app (or the user): `{"authorization_url"}` to send the user to |
| `GET /v1/oauth/callback` | the provider sends the browser back here |
| `GET /v1/…/servers/{server}/connection` | `{"connected", "scopes", "expires_at", …}` |
| `DELETE /v1/…/servers/{server}/connection` | revoke at the provider, forget (204) |
"""

from __future__ import annotations

import html
import logging
from typing import Any

from aiohttp import web

from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.web import json_response
from pier.router.accounts.flows import BROWSER_COOKIE
from pier.router.accounts.service import Accounts
from pier.router.auth.ingress import PORTAL_SESSION
from pier.router.auth.signin import SESSION_COOKIE, browser_cookie, local_path
from pier.router.middleware import COOKIE, OPEN, access
from pier.router.processes import steer
from pier.router.shared import USERS, base_url, user_of
from pier.router.state import router_of

log = logging.getLogger("pier.router.rest.accounts")

CALLBACK = "/v1/oauth/callback"
# The callback's URL holds an authorization code: never cached, never sent on as a Referer.
_PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _accounts(request: web.Request) -> Accounts:
    accounts = router_of(request).accounts
    if accounts is None:
        raise PierError("NOT_FOUND", "no server here connects users' accounts")
    return accounts


async def _admitted(request: web.Request) -> tuple[str, Profile, Accounts]:
    user = user_of(request)
    _, profile = await router_of(request).ingress.admit(request, user, request.match_info["server"], "rest")
    return user, profile, _accounts(request)


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


@access(COOKIE)
async def connect(request: web.Request) -> web.StreamResponse:
    """A browser is sent to the provider; the authorization is bound to this user, profile and browser."""
    user, profile, accounts = await _admitted(request)
    after = local_path(request.query.get("next"), "/portal" if router_of(request).ingress.portal else "")
    redirect_uri = base_url(request) + CALLBACK
    if _wants_json(request) and request.match_info.get("user") is None and PORTAL_SESSION not in request:
        # A client of its own (a token or a user key) that shows its user the link itself.
        url = await accounts.begin(user, profile, redirect_uri, None, after or None)
        return json_response({"authorization_url": url, "expires_in": router_of(request).settings.oauth_flow_ttl_s})
    response = web.Response(status=302, headers={"Cache-Control": "no-store"})
    response.headers["Location"] = await accounts.begin(
        user, profile, redirect_uri, browser_cookie(request, response, base_url(request)), after or None
    )
    return response


async def authorization_url(request: web.Request) -> web.Response:
    """For apps with their own UI: the URL to send the user to (not bound to a browser: the app must give
    it to that user alone)."""
    user, profile, accounts = await _admitted(request)
    after = local_path(request.query.get("next"), "") or None
    url = await accounts.begin(user, profile, base_url(request) + CALLBACK, None, after)
    return json_response({"authorization_url": url, "expires_in": router_of(request).settings.oauth_flow_ttl_s})


@access(OPEN)
async def callback(request: web.Request) -> web.StreamResponse:
    """The provider's redirect back: the account is connected (or nothing changes), then the browser goes on."""
    router = router_of(request)
    accounts = _accounts(request)
    signed_in = None
    if router.ingress.portal is not None:
        session = await router.ingress.portal.get(request.cookies.get(SESSION_COOKIE))
        signed_in = session.user if session is not None else None
    query = {k: v for k, v in request.query.items() if isinstance(v, str)}
    if router.peers is not None:  # the user's process ends their session below: it answers
        await steer(request, router.peers, await accounts.flows.user_of(query.get("state")))
    try:
        flow, _ = await accounts.complete(query, request.cookies.get(BROWSER_COOKIE), signed_in)
    except PierError as err:
        log.info("account connection refused", extra={"code": err.code, "why": err.details.get("reason")})
        return _page(request, err.http_status, "Not connected", err.message, err.to_dict())
    assert flow.user is not None
    assert flow.profile is not None
    await router.backend.end(flow.user, flow.profile)  # its next session starts with the new token
    if flow.next:
        after = local_path(flow.next, "/")
        location = f"{after}{'&' if '?' in after else '?'}connected={flow.profile}"
        return web.Response(status=303, headers={"Location": location, **_PRIVATE})
    message = f"Your account for {flow.profile} is connected. You can close this window and retry."
    return _page(request, 200, "Connected", message, {"connected": True, "server": flow.profile})


def _page(request: web.Request, status: int, title: str, message: str, data: dict[str, Any]) -> web.Response:
    """The callback's answer: a small page for the browser (JSON for a client that asks for it)."""
    if _wants_json(request):
        return json_response(data if status == 200 else {"error": data}, status, _PRIVATE)
    title, message = html.escape(title), html.escape(message)
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Pier: {title}</title></head>"
        f"<body style='font-family:system-ui;margin:3em'><h1>{title}</h1><p id='message'>{message}</p></body></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html", headers=_PRIVATE)


@access(COOKIE)
async def connection(request: web.Request) -> web.Response:
    user, profile, accounts = await _admitted(request)
    return json_response({"server": profile.name, **await accounts.view(user, profile)})


@access(COOKIE)
async def disconnect(request: web.Request) -> web.Response:
    """Revoke the user's tokens at the provider (RFC 7009, where it can), forget them, end their session."""
    user, profile, accounts = await _admitted(request)
    if not await accounts.disconnect(user, profile):
        raise PierError("NOT_FOUND", f"{user} has not connected an account for {profile.name}")
    await router_of(request).backend.end(user, profile.name)
    return web.Response(status=204)


def add_routes(v1: web.Application) -> None:
    r = v1.router
    r.add_get("/me/servers/{server}/connect", connect)
    r.add_get("/users/{user}/servers/{server}/connect", authorization_url)
    r.add_get("/oauth/callback", callback)
    for user in USERS:
        r.add_get(f"{user}/servers/{{server}}/connection", connection)
        r.add_delete(f"{user}/servers/{{server}}/connection", disconnect)
