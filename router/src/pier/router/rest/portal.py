"""`/portal`: the signed-in user's own page, rendered by the router (no script): the servers they may use,
their connected accounts (connect, disconnect), their secrets (write-only), their MCP URLs with what to
paste into common MCP clients, a form to try a tool, their sessions and recent jobs.

Sign-in is the company's identity provider's (`auth.signin`). Every form posts to this router with the
session's CSRF token, and a post that does not come from the router's own pages is refused (`same_origin`),
so another site cannot make a signed-in browser act. No token, secret value or key is ever on the page:
secrets are set through password fields and listed by name only.
"""

from __future__ import annotations

import datetime as dt
import hmac
import html
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web
from redis.exceptions import RedisError

from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import MAX_DEPTH, TooDeep, parse
from pier.router.accounts.flows import BROWSER_COOKIE
from pier.router.accounts.service import SUBJECT_TOKEN
from pier.router.auth.ingress import PRINCIPAL, groups_of
from pier.router.auth.signin import (
    SESSION_COOKIE,
    PortalSession,
    browser_cookie,
    local_path,
    same_origin,
    set_cookie,
)
from pier.router.middleware import RECEIVED
from pier.router.processes import steer
from pier.router.shared import base_url
from pier.router.state import router_of
from pier.router.usersecrets import check_values

log = logging.getLogger("pier.router.rest.portal")

_CSS = resources.files("pier.router.rest").joinpath("static/portal.css")
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
_DONE = {  # what a form did, shown after its redirect (by code: nothing a caller writes is reflected)
    "disconnected": "Account disconnected.", "secrets": "Secrets saved.", "deleted": "Secret deleted.",
}  # fmt: skip
_TRY_TIMEOUT_S = 20.0
Handler = Callable[[web.Request, PortalSession], Awaitable[web.StreamResponse]]


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "—"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{e(title)}</title><link rel='stylesheet' href='/portal/static/portal.css'></head>"
        f"<body>{body}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html", headers=_HEADERS)


def _error(err: PierError) -> web.Response:
    body = f"<main><div class='notice error' id='error'>{e(err.message)}</div><p><a href='/portal'>Back</a></p></main>"
    return _page("Pier", body, err.http_status)


# -- who is signed in ----------------------------------------------------------------------------------


async def _session(request: web.Request) -> PortalSession | None:
    portal = router_of(request).ingress.portal
    if portal is None:
        return None
    session = await portal.get(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        request[PRINCIPAL] = session.principal()  # the ingress pipeline's caller, as a token of theirs would be
        if session.subject_token is not None:
            SUBJECT_TOKEN.set((session.issuer, session.subject_token))
    return session


def _form_action(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A form's post: signed in, from this router's own pages, with the session's CSRF token."""

    async def post(request: web.Request) -> web.StreamResponse:
        session = await _session(request)
        if session is None:
            return _error(PierError("UNAUTHENTICATED", "sign in first"))
        await _to_owner(request, session)
        if not same_origin(request, base_url(request)):
            return _error(PierError("FORBIDDEN", "this form was not sent from Pier's own page"))
        form = await request.post()
        token = form.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(token, session.csrf):
            return _error(PierError("FORBIDDEN", "this form has expired: reload the page"))
        try:
            return await handler(request, session)
        except PierError as err:
            return _error(err)
        except RedisError:
            return _error(PierError("STORE_UNAVAILABLE", "Pier's store (Redis) is unreachable; try again shortly"))

    return post


async def _to_owner(request: web.Request, session: PortalSession) -> None:
    """With several router processes, the page of a user's sessions is served by the process holding them
    (the connection handed over before the form is read)."""
    peers = router_of(request).peers
    if peers is not None:
        await steer(request, peers, session.user)


# -- pages ---------------------------------------------------------------------------------------------


async def css(request: web.Request) -> web.Response:
    return web.Response(body=_CSS.read_bytes(), content_type="text/css", headers={"Cache-Control": "max-age=300"})


async def home(request: web.Request) -> web.Response:
    if router_of(request).signin is None:
        return _page(
            "Pier", "<main><p>The portal needs sign-in: set PIER_OIDC_ISSUER and PIER_OIDC_CLIENT_ID.</p></main>", 404
        )
    session = await _session(request)
    if session is None:
        return _page("Pier: sign in", _signin_box())
    await _to_owner(request, session)
    return _page("Pier", await _portal(request, session, notice(request.query, router_of(request).catalog.profiles)))


def notice(query: Mapping[str, str], servers: Collection[str]) -> str:
    """What a form or a connection did, shown after its redirect: by code, or a server of the catalog by
    name; nothing else a link carries is put on the page."""
    connected = query.get("connected")
    if connected is not None and connected in servers:
        return f"Account connected for {connected}."
    return _DONE.get(query.get("done", ""), "")


def _signin_box() -> str:
    return (
        "<div class='signin'><h1>Pier</h1><p>Your MCP servers, your accounts, your sessions.</p>"
        "<p><a class='button' id='signin' href='/portal/login'>Sign in</a></p></div>"
    )


async def _portal(request: web.Request, session: PortalSession, notice: str, extra: str = "") -> str:
    router = router_of(request)
    groups = groups_of(session.principal())
    profiles = [p for p in router.catalog.profiles.values() if p.usable_by(groups)]
    servers = [await _server(request, session, p) for p in profiles]
    base = base_url(request)
    parts = [
        f"<header><h1>Pier</h1><div><span class='who'>Signed in as <b id='user'>{e(session.user)}</b></span> "
        f"<form class='inline' method='post' action='/portal/logout'>{_csrf(session)}"
        "<button class='secondary' id='signout'>Sign out</button></form></div></header><main>",
        f"<div class='notice' id='notice'>{e(notice)}</div>" if notice else "",
        extra,
        "<h2>Your servers</h2>",
        "".join(servers) or "<p class='empty'>No server is offered to you.</p>",
        "<h2>All your servers at one URL</h2>",
        f"<p>One MCP endpoint lists every server above, tools named <code>server__tool</code>: "
        f"<code id='all-servers-url'>{e(base)}/v1/me/mcp</code></p>",
        await _sessions(request, session),
        await _jobs(request, session, profiles),
        "</main>",
    ]
    return "".join(parts)


def _csrf(session: PortalSession) -> str:
    return f"<input type='hidden' name='csrf' value='{e(session.csrf)}'>"


async def _server(request: web.Request, session: PortalSession, profile: Profile) -> str:
    name = profile.name
    rows = [await _connection_row(request, session, profile)]
    if profile.user_secrets:
        rows.append(await _secrets_row(request, session, profile))
    url = f"{base_url(request)}/v1/me/servers/{name}/mcp"
    rows.append(f"<div class='row'><span class='label'>MCP URL</span><code id='url-{e(name)}'>{e(url)}</code></div>")
    rows.append(_snippets(name, url))
    rows.append(
        f"<details><summary>Try a tool</summary><form method='post' action='/portal/servers/{e(name)}/call' "
        f"id='try-{e(name)}'>{_csrf(session)}<div class='row'><span class='label'>Tool</span>"
        "<input type='text' name='tool' required maxlength='128'></div><div class='row'><span class='label'>"
        "Arguments (JSON)</span></div><textarea name='arguments'>{}</textarea><p><button>Call</button></p></form>"
        "</details>"
    )
    return (
        f"<article class='server' id='server-{e(name)}'><h3>{e(name)}</h3>"
        f"<p class='description'>{e(profile.description)}</p>{''.join(rows)}</article>"
    )


async def _connection_row(request: web.Request, session: PortalSession, profile: Profile) -> str:
    router, name = router_of(request), profile.name
    if profile.token_exchange is not None:
        return ("<div class='row'><span class='label'>Account</span><span class='status connected' "
                f"id='connection-{e(name)}'>uses your sign-in (token exchange)</span></div>")  # fmt: skip
    if profile.upstream_oauth is None or router.accounts is None:
        return ""
    view = await router.accounts.view(session.user, profile)
    state = view["status"] if view["status"] != "connected" else "connected"
    shown = {"connected": "Connected", "broken": "Needs reconnecting", "not_connected": "Not connected"}[state]
    detail = ""
    if state == "connected":
        scopes = " ".join(view.get("scopes") or []) or "—"
        detail = (
            f" <span class='muted'>scopes <code>{e(scopes)}</code>, token until {e(_when(view['expires_at']))}</span>"
        )
    elif state == "broken":
        detail = f" <span class='muted'>{e(view.get('reason') or '')}</span>"
    connect = f"/v1/me/servers/{quote(name)}/connect?next=/portal"
    action = (
        f"<form class='inline' method='post' action='/portal/servers/{e(name)}/disconnect'>{_csrf(session)}"
        f"<button class='danger' id='disconnect-{e(name)}'>Disconnect</button></form>"
        if state == "connected"
        else f"<a class='button' id='connect-{e(name)}' href='{e(connect)}'>Connect</a>"
    )
    return (
        f"<div class='row'><span class='label'>Account</span><span class='status {e(state)}' "
        f"id='connection-{e(name)}'>{e(shown)}</span>{detail} {action}</div>"
    )


async def _secrets_row(request: web.Request, session: PortalSession, profile: Profile) -> str:
    store = router_of(request).backend.secrets
    listing = (
        {item["name"]: item["set_at"] for item in await store.listing(session.user, profile.name)} if store else {}
    )
    fields, deletes = [], []
    for secret, spec in sorted(profile.user_secrets.items()):
        state = f"set {_when(listing[secret])}" if secret in listing else ("required" if spec.required else "optional")
        fields.append(
            f"<div class='row'><span class='label'><code>{e(secret)}</code></span>"
            f"<input type='password' name='secret.{e(secret)}' autocomplete='off' placeholder='{e(spec.description)}'>"
            f"<span class='muted' id='secret-{e(profile.name)}-{e(secret)}'>{e(state)}</span></div>"
        )
        if secret in listing:
            action = f"/portal/servers/{e(profile.name)}/secrets/{e(secret)}/delete"
            deletes.append(
                f"<form class='inline' method='post' action='{action}'>"
                f"{_csrf(session)}<button class='danger'>Forget {e(secret)}</button></form>"
            )
    return (
        f"<details><summary>Secrets</summary><form method='post' action='/portal/servers/{e(profile.name)}/secrets'>"
        f"{_csrf(session)}{''.join(fields)}<p><button>Save</button></p></form>{' '.join(deletes)}</details>"
    )


def _snippets(name: str, url: str) -> str:
    """What to paste into common MCP clients (the URL is the user's own: they sign in from the client)."""
    key = f"pier-{name}"
    vscode = {"servers": {key: {"type": "http", "url": url}}}
    cursor = {"mcpServers": {key: {"url": url}}}
    claude = {"mcpServers": {key: {"command": "pier", "args": ["connect", url],
                                   "env": {"PIER_CONNECT_TOKEN": "<your Pier user key>"}}}}  # fmt: skip
    blocks = [
        ("VS Code", ".vscode/mcp.json", vscode),
        ("Cursor", "~/.cursor/mcp.json", cursor),
        ("Claude Desktop (through pier connect)", "claude_desktop_config.json", claude),
    ]
    items = "".join(
        f"<p>{e(client)} — <code>{e(path)}</code></p><pre>{e(json.dumps(config, indent=2))}</pre>"
        for client, path, config in blocks
    )
    return f"<details><summary>Client configuration</summary>{items}</details>"


async def _sessions(request: web.Request, session: PortalSession) -> str:
    sessions = router_of(request).backend.list(session.user)
    if not sessions:
        return "<h2>Your sessions</h2><p class='empty' id='sessions'>No session is running.</p>"
    rows = "".join(
        f"<tr><td>{e(v['server'])}</td><td>{e(v['state'])}</td><td>{e(v['age_s'])} s</td><td>{e(v['idle_s'])} s</td>"
        f"<td>{e(v['in_flight'])}</td><td>{e(v['restarts'])}</td></tr>"
        for v in (s.view() for s in sessions)
    )
    return (
        "<h2>Your sessions</h2><table id='sessions'><tr><th>server</th><th>state</th><th>age</th><th>idle</th>"
        f"<th>in flight</th><th>restarts</th></tr>{rows}</table>"
    )


async def _jobs(request: web.Request, session: PortalSession, profiles: list[Profile]) -> str:
    store = router_of(request).store
    ids: list[str] = []
    for profile in profiles:
        ids += await store.user_jobs(session.user, profile.name, 0, 10)
    records = [r for r in await store.get_many(ids) if r is not None] if ids else []
    records.sort(key=lambda r: r.created_at, reverse=True)
    if not records:
        return "<h2>Recent jobs</h2><p class='empty' id='jobs'>No job yet.</p>"
    rows = "".join(
        f"<tr><td><code>{e(r.job_id)}</code></td><td>{e(r.server)}</td><td>{e(r.tool)}</td><td>{e(r.status)}</td>"
        f"<td>{e(_when(r.created_at))}</td></tr>"
        for r in records[:20]
    )
    return ("<h2>Recent jobs</h2><table id='jobs'><tr><th>job</th><th>server</th><th>tool</th><th>status</th>"
            f"<th>created</th></tr>{rows}</table>")  # fmt: skip


# -- sign-in and out -----------------------------------------------------------------------------------


async def login(request: web.Request) -> web.StreamResponse:
    signin = router_of(request).signin
    if signin is None:
        raise web.HTTPNotFound()
    after = local_path(request.query.get("next"), "/portal")
    response = web.Response(status=302, headers={"Cache-Control": "no-store"})
    try:
        base = base_url(request)
        response.headers["Location"] = await signin.begin(base, browser_cookie(request, response, base), after)
    except PierError as err:
        return _error(err)
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    signin = router_of(request).signin
    if signin is None:
        raise web.HTTPNotFound()
    query = {k: v for k, v in request.query.items() if isinstance(v, str)}
    try:
        cookie, flow = await signin.complete(query, request.cookies.get(BROWSER_COOKIE), base_url(request))
    except PierError as err:
        log.info("portal sign-in refused", extra={"why": err.details.get("reason") or err.code})
        return _error(err)
    headers = {
        "Location": local_path(flow.next, "/portal"),
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    response = web.Response(status=303, headers=headers)
    set_cookie(response, request, SESSION_COOKIE, cookie, signin.settings.portal_session_ttl_s, base_url(request))
    return response


async def _logout(request: web.Request, session: PortalSession) -> web.StreamResponse:
    portal = router_of(request).ingress.portal
    assert portal is not None
    await portal.end(request.cookies.get(SESSION_COOKIE))
    response = web.Response(status=303, headers={"Location": "/portal"})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# -- actions -------------------------------------------------------------------------------------------


async def _admit(request: web.Request, session: PortalSession) -> Profile:
    _, profile = await router_of(request).ingress.admit(request, session.user, request.match_info["server"], "portal")
    return profile


async def _disconnect(request: web.Request, session: PortalSession) -> web.StreamResponse:
    router, profile = router_of(request), await _admit(request, session)
    if router.accounts is None or not await router.accounts.disconnect(session.user, profile):
        raise PierError("NOT_FOUND", f"no account is connected for {profile.name}")
    await router.backend.end(session.user, profile.name)
    raise web.HTTPSeeOther("/portal?done=disconnected")


async def _set_secrets(request: web.Request, session: PortalSession) -> web.StreamResponse:
    router, profile = router_of(request), await _admit(request, session)
    form = await request.post()
    values = {
        k.removeprefix("secret."): v for k, v in form.items() if k.startswith("secret.") and isinstance(v, str) and v
    }
    if router.backend.secrets is None or not profile.user_secrets:
        raise PierError("NOT_FOUND", f"{profile.name} takes no users' secrets")
    if values:
        await router.backend.secrets.put(session.user, profile.name, check_values(profile, values))
        await router.backend.end(session.user, profile.name)  # its next session takes them
        log.info("user secrets set", extra={"user": session.user, "profile": profile.name, "names": sorted(values)})
    raise web.HTTPSeeOther("/portal?done=secrets")


async def _delete_secret(request: web.Request, session: PortalSession) -> web.StreamResponse:
    router, profile = router_of(request), await _admit(request, session)
    store = router.backend.secrets
    if store is None or not await store.delete(session.user, profile.name, request.match_info["name"]):
        raise PierError("NOT_FOUND", "that secret is not set")
    await router.backend.end(session.user, profile.name)
    raise web.HTTPSeeOther("/portal?done=deleted")


async def _try(request: web.Request, session: PortalSession) -> web.StreamResponse:
    """Call a tool in the user's own session, as any of their calls (rules, policy, audit), and show the answer."""
    router = router_of(request)
    caller, profile = await router.ingress.admit(request, session.user, request.match_info["server"], "portal")
    form = await request.post()
    tool, raw = str(form.get("tool") or ""), str(form.get("arguments") or "{}")
    try:
        arguments = parse(raw or "{}")
    except TooDeep:
        raise PierError("INVALID_ARGUMENTS", f"the arguments nest more than {MAX_DEPTH} levels") from None
    except ValueError:
        raise PierError("INVALID_ARGUMENTS", "the arguments are not JSON") from None
    if not isinstance(arguments, dict):
        raise PierError("INVALID_ARGUMENTS", "the arguments are a JSON object")
    try:
        result = await router.calls.call(
            caller, profile, tool, arguments, _TRY_TIMEOUT_S, received_at=request[RECEIVED]
        )
        shown, state = result.body, ("queued" if result.status == 202 else "completed")
    except PierError as err:
        if err.code == "CONNECTION_REQUIRED":
            err.details["connect_url"] = f"/v1/me/servers/{profile.name}/connect?next=/portal"
        shown, state = {"error": err.to_dict()}, "error"
    box = (
        f"<h2>{e(profile.name)}: {e(tool)}</h2><div class='notice{' error' if state == 'error' else ''}' "
        f"id='result' data-state='{e(state)}'><pre>{e(json.dumps(shown, indent=2, ensure_ascii=False))}</pre></div>"
    )
    return _page("Pier", await _portal(request, session, "", box))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/portal", home)
    r.add_get("/portal/static/portal.css", css)
    r.add_get("/portal/login", login)
    r.add_get("/portal/callback", callback)
    r.add_post("/portal/logout", _form_action(_logout))
    r.add_post("/portal/servers/{server}/disconnect", _form_action(_disconnect))
    r.add_post("/portal/servers/{server}/secrets", _form_action(_set_secrets))
    r.add_post("/portal/servers/{server}/secrets/{name}/delete", _form_action(_delete_secret))
    r.add_post("/portal/servers/{server}/call", _form_action(_try))
