"""`/portal` in a real browser (headless Chromium over CDP): a user signs in with the company's identity
provider, connects their account at a second provider, sees it connected, sets a secret, uses a tool
(the demo server's `env_hash` shows whose token the session holds), disconnects. Another site cannot make
the signed-in browser post a form, and no token or secret is ever on the page. Screenshots in
tests/artifacts/."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from pier.cli.redis_server import free_port
from pier.core import redis_keys
from pier.core.catalog import Catalog, Profile, demo_profile
from tests.browser import Page, chromium
from tests.identity import (
    UPSTREAM_SECRET_ENV,
    OpenIdProvider,
    digest,
    router_client,
    unseal,
    upstream_client,
    upstream_oauth,
)
from tests.servers import ROOT, RunningRouter, router_app

ARTIFACTS = ROOT / "tests" / "artifacts"
SECRETS_KEY = base64.b64encode(os.urandom(32)).decode()


@dataclass
class Portal:
    idp: OpenIdProvider
    upstream: OpenIdProvider
    running: RunningRouter
    client_secrets: list[str]

    @property
    def url(self) -> str:
        return self.running.url

    async def connection(self, user: str) -> dict | None:
        key = redis_keys.connection(user, "demo")
        raw = await self.running.router.redis.get(key)
        return unseal(raw, key, SECRETS_KEY) if raw is not None else None


@contextlib.asynccontextmanager
async def portal(tmp_path, redis_url: str, monkeypatch) -> AsyncIterator[Portal]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    idp_secret, upstream_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    monkeypatch.setenv(UPSTREAM_SECRET_ENV, upstream_secret)
    upstream = upstream_client(f"{base}/v1/oauth/callback", upstream_secret)
    async with (
        OpenIdProvider(tmp_path / "idp", clients=[router_client(base, idp_secret)]) as idp,
        OpenIdProvider(tmp_path / "upstream", clients=[upstream]) as provider,
    ):
        demo = Profile.model_validate({
            **demo_profile().model_dump(), "description": "The demo server, with your own upstream account",
            "upstream_oauth": upstream_oauth(provider.issuer, env="UPSTREAM_TOKEN"),
            "user_secrets": {"DEMO_NOTE": {"description": "anything of yours", "required": False}},
        })  # fmt: skip
        admins = Profile(name="admin-tools", command=demo_profile().command, allowed_groups=["admins"])
        async with router_app(
            redis_url, Catalog([demo, admins]), port=port, public_url=base, oidc_issuer=idp.issuer,
            oidc_scopes=["mcp"], oidc_client_id="pier-router", oidc_client_secret=idp_secret,
            secrets_key=SECRETS_KEY,
        ) as running:  # fmt: skip
            yield Portal(idp, provider, running, [idp_secret, upstream_secret])


async def sign_in_at_provider(page: Page, account: str) -> None:
    """The provider's own screens: its login form (any name signs in), then consent."""
    await page.loaded("input[name=login]")
    await page.fill("input[name=login]", account)
    await page.fill("input[name=password]", "any")
    await page.click("button[type=submit]")
    await page.loaded("input[name=prompt][value=consent]")
    await page.click("button[type=submit]")


async def test_a_user_signs_in_connects_uses_a_tool_and_disconnects(http, redis_server, tmp_path, monkeypatch):
    ARTIFACTS.mkdir(exist_ok=True)
    async with portal(tmp_path, redis_server.url, monkeypatch) as p, chromium(tmp_path / "profile") as page:
        # Not signed in: the sign-in page.
        await page.navigate(f"{p.url}/portal")
        await page.loaded("#signin")
        await page.screenshot(ARTIFACTS / "portal-1-sign-in.png")
        await page.click("#signin")
        await sign_in_at_provider(page, "alice")
        await page.loaded("#user")
        assert await page.text("#user") == "alice"
        # Her servers: the demo (not connected), not the admins' one (she is staff).
        assert await page.text("#connection-demo") == "Not connected"
        assert not await page.evaluate("!!document.querySelector('#server-admin-tools')")
        assert (await page.text("#url-demo")).endswith("/v1/me/servers/demo/mcp")
        await page.screenshot(ARTIFACTS / "portal-2-signed-in.png")

        # Connect her account at the upstream provider (as "alice-gh" there), and back.
        await page.click("#connect-demo")
        await sign_in_at_provider(page, "alice-gh")
        await page.loaded("#notice")
        assert "connected" in await page.text("#notice")
        assert await page.text("#connection-demo") == "Connected"
        connected = await p.connection("alice")
        assert connected is not None
        await page.screenshot(ARTIFACTS / "portal-3-connected.png")

        # A secret of hers (write-only), then a tool: her session holds her own upstream token.
        await page.evaluate("document.querySelector('#server-demo details').open = true")
        await page.fill("input[name='secret.DEMO_NOTE']", "alice-note-" + secrets.token_hex(6))
        note = await page.evaluate("document.querySelector(\"input[name='secret.DEMO_NOTE']\").value")
        await page.click("#server-demo form[action$='/secrets'] button")
        # (the page before had a notice too: wait for the new one, not for the old page still showing)
        saved = "(document.querySelector('#notice')?.innerText ?? '').toLowerCase().includes('saved')"
        await page.wait_for(f"document.readyState === 'complete' && {saved}", 30)
        # The reloaded page shows it once she opens the server's sections (text in closed ones is hidden).
        await page.evaluate("document.querySelectorAll('#server-demo details').forEach(d => d.open = true)")
        assert (await page.text("#secret-demo-DEMO_NOTE")).startswith("set ")

        await page.fill("#try-demo input[name=tool]", "env_hash")
        await page.fill("#try-demo textarea[name=arguments]", json.dumps({"name": "UPSTREAM_TOKEN"}))
        await page.click("#try-demo button")
        await page.loaded("#result")
        result = json.loads(await page.text("#result pre"))
        assert result["result"]["structuredContent"]["result"] == digest(connected["access_token"])
        assert "demo" in await page.text("#sessions")
        await page.screenshot(ARTIFACTS / "portal-4-tool.png")

        # Nothing secret is on any page of hers.
        html = await page.html()
        for secret in (connected["access_token"], connected["refresh_token"], note, *p.client_secrets):
            assert secret not in html

        # Disconnect: revoked at the provider, forgotten.
        await page.navigate(f"{p.url}/portal")
        await page.loaded("#disconnect-demo")
        await page.click("#disconnect-demo")
        await page.loaded("#notice")
        assert await page.text("#connection-demo") == "Not connected"
        assert await p.connection("alice") is None
        assert (await p.upstream.stats())["revocations"] >= 1
        await page.screenshot(ARTIFACTS / "portal-5-disconnected.png")

        # Signing out ends the session: the page asks to sign in again.
        await page.click("#signout")
        await page.loaded("#signin")
    for step in ("1-sign-in", "2-signed-in", "3-connected", "4-tool", "5-disconnected"):
        assert (ARTIFACTS / f"portal-{step}.png").stat().st_size > 10_000


@contextlib.asynccontextmanager
async def attacker_site(target: str) -> AsyncIterator[str]:
    """Another site (another origin on this machine) whose page posts a form to `target` as soon as it loads."""
    page = (
        f"<!doctype html><html><body><form method='post' action='{target}'>"
        "<input name='csrf' value='guessed'></form><script>document.forms[0].submit()</script></body></html>"
    )

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("action", ["disconnect", "logout"])
async def test_another_site_cannot_make_a_signed_in_browser_post_a_form(
    http, redis_server, tmp_path, monkeypatch, action
):
    async with portal(tmp_path, redis_server.url, monkeypatch) as p, chromium(tmp_path / "profile") as page:
        await page.navigate(f"{p.url}/portal")
        await page.loaded("#signin")
        await page.click("#signin")
        await sign_in_at_provider(page, "alice")
        await page.loaded("#connect-demo")
        await page.click("#connect-demo")
        await sign_in_at_provider(page, "alice-gh")
        await page.loaded("#disconnect-demo")
        before = await p.connection("alice")

        target = f"{p.url}/portal/servers/demo/disconnect" if action == "disconnect" else f"{p.url}/portal/logout"
        async with attacker_site(target) as evil:
            await page.navigate(evil)
            await page.wait_for(f"location.href.startsWith({json.dumps(target)}) && !!document.querySelector('#error')")
            assert "not sent from Pier's own page" in await page.text("#error")
        # Nothing changed: still connected, still signed in.
        assert await p.connection("alice") == before
        await page.navigate(f"{p.url}/portal")
        await page.loaded("#user")
        assert await page.text("#connection-demo") == "Connected"
