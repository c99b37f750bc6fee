"""Connected accounts: each user connects their own account at a real OAuth provider (a second instance of
the identity tests' oidc-provider, with refresh tokens, short-lived access tokens and revocation); their
session gets their token, refreshed before it expires by one replica, revoked when they disconnect. And
what must change nothing: forged, replayed, expired or other people's authorizations, a provider that
answers garbage or nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.cli.redis_server import free_port
from pier.core import redis_keys
from pier.core.catalog import Catalog, Profile, demo_profile
from tests.identity import (
    UPSTREAM_SECRET_ENV,
    OpenIdProvider,
    authorize,
    digest,
    unseal,
    upstream_client,
    upstream_oauth,
    walk,
)
from tests.mcp_wire import ACCEPT, modern_headers, modern_request, post
from tests.servers import PEEK, RunningRouter, get_json, router_app, scrape, wait_until

SECRETS_KEY = base64.b64encode(os.urandom(32)).decode()
APP = {"X-API-Key": "app-key"}
USERS = {"alice": "alice-key", "bob": "bob-key"}
HTML = {"Accept": "text/html"}


def key_of(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {USERS[user]}"}


@dataclass
class World:
    upstream: OpenIdProvider
    running: RunningRouter
    client_secret: str

    @property
    def url(self) -> str:
        return self.running.url

    async def age(self, user: str, seconds: float, profile: str = "demo") -> None:
        """Make the user's stored connection `seconds` older (as if its token had been obtained then)."""
        from pier.router.usersecrets import Sealer

        key = redis_keys.connection(user, profile)
        stored = await self.connection(user, profile)
        stored["obtained_at"] -= seconds
        stored["expires_at"] -= seconds
        await self.running.router.redis.set(key, Sealer(SECRETS_KEY).seal(json.dumps(stored), key))

    async def connection(self, user: str, profile: str = "demo") -> dict[str, Any]:
        """What the router stored for the user (unsealed with the test's key: the tokens)."""
        key = redis_keys.connection(user, profile)
        raw = await self.running.router.redis.get(key)
        assert raw is not None, f"{user} has no stored connection"
        return unseal(raw, key, SECRETS_KEY)


def demo_with(**fields: Any) -> Profile:
    return Profile.model_validate({**demo_profile().model_dump(), **fields})


def demo_connected(issuer: str) -> Profile:
    """The demo server, each user's upstream token in its UPSTREAM_TOKEN."""
    return demo_with(upstream_oauth=upstream_oauth(issuer, env="UPSTREAM_TOKEN"))


@contextlib.asynccontextmanager
async def world(
    tmp_path, redis_url: str, monkeypatch, access_ttl: int = 600,
    profile: Callable[[str], Profile] = demo_connected, **settings: Any,
) -> AsyncIterator[World]:  # fmt: skip
    """The upstream provider, and a router whose `demo` profile connects accounts there (`profile`: made
    from the provider's issuer)."""
    port = free_port()
    secret = secrets.token_urlsafe(24)
    monkeypatch.setenv(UPSTREAM_SECRET_ENV, secret)
    client = upstream_client(f"http://127.0.0.1:{port}/v1/oauth/callback", secret)
    users = {key: user for user, key in USERS.items()}
    async with OpenIdProvider(tmp_path / "upstream", clients=[client], access_ttl=access_ttl) as upstream:
        catalog = Catalog([profile(upstream.issuer)])
        async with router_app(
            redis_url, catalog, port=port, public_url=f"http://127.0.0.1:{port}", secrets_key=SECRETS_KEY,
            app_keys=["app-key"], user_keys=users, **settings,
        ) as running:  # fmt: skip
            yield World(upstream, running, secret)


async def call(http, base: str, user: str, tool: str = "env_hash", **arguments: Any) -> tuple[int, dict]:
    arguments = arguments or {"name": "UPSTREAM_TOKEN"}
    async with http.post(
        f"{base}/v1/users/{user}/servers/demo/tools/{tool}/call", json={"arguments": arguments}, headers=APP
    ) as response:
        return response.status, await response.json()


async def held_digest(http, base: str, user: str) -> str:
    status, body = await call(http, base, user)
    assert status == 200, body
    return str(body["result"]["structuredContent"]["result"])


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A user's browser: its own cookie jar (127.0.0.1 allowed)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


async def connect(w: World, user: str, account: str) -> aiohttp.ClientResponse:
    """The user's browser connects their account: the router's connect route, the provider's screens, back."""
    async with browser() as http:
        headers = {**key_of(user), **HTML}
        return await authorize(http, f"{w.url}/v1/me/servers/demo/connect", account, headers)


async def to_callback(http: aiohttp.ClientSession, url: str, account: str, headers: dict | None = None) -> str:
    """An authorization followed up to the provider's redirect to the router's callback: that URL, unvisited."""
    callback, _ = await walk(http, url, account, headers, until=lambda next_url: "/v1/oauth/callback" in next_url)
    assert "/v1/oauth/callback" in callback, callback
    return callback


# -- the flow ------------------------------------------------------------------------------------------


async def test_each_user_connects_their_own_account_and_their_session_holds_their_token(
    http, redis_server, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    async with world(tmp_path, redis_server.url, monkeypatch) as w:
        # Before connecting: a way to connect, not a dead end; nothing started.
        status, refused = await call(http, w.url, "alice")
        assert (status, refused["error"]["code"]) == (409, "CONNECTION_REQUIRED")
        assert refused["error"]["details"]["connect_url"] == f"{w.url}/v1/me/servers/demo/connect"
        assert refused["error"]["details"]["reason"] == "not_connected"
        assert not w.running.router.backend.list()
        view = await get_json(http, f"{w.url}/v1/me/servers/demo/connection", key_of("alice"))
        assert (view["connected"], view["status"]) == (False, "not_connected")

        # A browser opening the connect URL unsigned (no portal here) is refused, not sent anywhere.
        async with http.get(f"{w.url}/v1/me/servers/demo/connect", headers=HTML, allow_redirects=False) as response:
            assert response.status == 401

        # Alice connects her account: PKCE S256 and a state in the authorization request.
        async with browser() as http_alice, http_alice.get(
            f"{w.url}/v1/me/servers/demo/connect", headers={**key_of("alice"), **HTML}, allow_redirects=False
        ) as response:  # fmt: skip
            assert response.status == 302
            query = parse_qs(urlsplit(response.headers["Location"]).query)
        assert query["code_challenge_method"] == ["S256"]
        assert len(query["code_challenge"][0]) == 43
        assert len(query["state"][0]) >= 43
        assert query["resource"] == ["https://api.upstream.test"]
        assert query["scope"] == ["mcp offline_access"]

        done = await connect(w, "alice", "alice-gh")
        assert done.status == 200
        view = await get_json(http, f"{w.url}/v1/me/servers/demo/connection", key_of("alice"))
        assert (view["connected"], view["refreshable"]) == (True, True)
        assert set(view["scopes"]) >= {"mcp"}
        assert view["expires_at"] > time.time()
        alice = await w.connection("alice")
        assert alice["access_token"] not in json.dumps(view)
        assert alice["refresh_token"] not in json.dumps(view)
        # Her upstream token is hers (the provider's JWT for the upstream API, her account's).
        claims = jwt.decode(alice["access_token"], options={"verify_signature": False})
        assert (claims["sub"], claims["aud"]) == ("alice-gh", "https://api.upstream.test")
        assert await held_digest(http, w.url, "alice") == digest(alice["access_token"])

        # Bob is still refused; once connected, his session holds his own token, and alice's keeps hers.
        assert (await call(http, w.url, "bob"))[0] == 409
        assert (await connect(w, "bob", "bob-gh")).status == 200
        bob = await w.connection("bob")
        assert await held_digest(http, w.url, "bob") == digest(bob["access_token"])
        assert await held_digest(http, w.url, "alice") == digest(alice["access_token"])
        assert alice["access_token"] != bob["access_token"]

        # A user key acts for its own user only.
        async with http.get(f"{w.url}/v1/users/bob/servers/demo/connection", headers=key_of("alice")) as response:
            assert response.status == 403

        # The app-key route: the URL for an app to show its user; the user's browser completes it.
        body = await get_json(http, f"{w.url}/v1/users/carol/servers/demo/connect", APP)
        assert body["authorization_url"].startswith(w.upstream.issuer)
        async with browser() as http_carol:
            assert (await authorize(http_carol, body["authorization_url"], "carol-gh")).status == 200
        assert (await get_json(http, f"{w.url}/v1/users/carol/servers/demo/connection", APP))["connected"]

        # Every name written to Redis is one of Pier's (`redis_keys.NAMES`).
        async for key in w.running.router.redis.scan_iter("*"):
            assert redis_keys.name_of(key.decode()) is not None, key

        # No token is in the logs, the metrics, the dashboard.
        dashboard = json.dumps(await get_json(http, f"{w.url}/v1/dashboard", APP))
        metrics = repr((await scrape(http, w.url)).samples)
        for token in (alice["access_token"], alice["refresh_token"], bob["access_token"], w.client_secret):
            assert token not in caplog.text + dashboard + metrics


async def test_disconnecting_revokes_at_the_provider_and_forgets(http, redis_server, tmp_path, monkeypatch):
    async with world(tmp_path, redis_server.url, monkeypatch) as w:
        await connect(w, "alice", "alice-gh")
        alice = await w.connection("alice")
        assert await held_digest(http, w.url, "alice") == digest(alice["access_token"])
        async with http.delete(f"{w.url}/v1/me/servers/demo/connection", headers=key_of("alice")) as response:
            assert response.status == 204
        assert (await w.upstream.stats())["revocations"] >= 1
        # The provider no longer honours the refresh token; the router forgot everything; her session ended.
        status, answer = await refresh_at_provider(w, alice["refresh_token"])
        assert (status, answer.get("error")) == (400, "invalid_grant")
        assert await w.running.router.redis.get(redis_keys.connection("alice", "demo")) is None
        assert not w.running.router.backend.list("alice")
        assert (await call(http, w.url, "alice"))[0] == 409
        async with http.delete(f"{w.url}/v1/me/servers/demo/connection", headers=key_of("alice")) as response:
            assert response.status == 404


async def refresh_at_provider(w: World, refresh_token: str) -> tuple[int, dict]:
    """What the provider answers a refresh with `refresh_token` (as the router's client)."""
    async with aiohttp.ClientSession() as http, http.post(
        f"{w.upstream.issuer}/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers={"Authorization": aiohttp.encode_basic_auth("pier", w.client_secret)},
    ) as response:  # fmt: skip
        return response.status, await response.json()


# -- refresh --------------------------------------------------------------------------------------------


async def test_a_token_is_refreshed_once_across_replicas(http, redis_server, tmp_path, monkeypatch):
    async with (
        world(tmp_path, redis_server.url, monkeypatch) as w,
        router_app(redis_server.url, w.running.router.catalog, secrets_key=SECRETS_KEY, app_keys=["app-key"]) as second,
    ):  # fmt: skip
        await connect(w, "alice", "alice-gh")
        first = await w.connection("alice")
        before = (await w.upstream.stats())["grants"].get("refresh_token", 0)
        await w.age("alice", 590)  # the token (600 s) is due for its refresh now

        # Both replicas at once, many calls each: one refresh at the provider, every answer with its token.
        answers = await asyncio.gather(
            *(held_digest(http, base, "alice") for base in (w.url, second.url) for _ in range(6))
        )
        assert (await w.upstream.stats())["grants"]["refresh_token"] == before + 1
        refreshed = await w.connection("alice")
        assert refreshed["access_token"] != first["access_token"]
        assert set(answers) == {digest(refreshed["access_token"])}


async def test_a_session_holding_its_token_in_a_variable_restarts_for_a_refreshed_one(
    http, redis_server, tmp_path, monkeypatch
):
    # Tokens live 4 s (due from 2 s on); the reaper is slow here, so the call finds its session's token due.
    async with world(tmp_path, redis_server.url, monkeypatch, access_ttl=4, reap_interval_s=60) as w:
        await connect(w, "alice", "alice-gh")
        first = await w.connection("alice")
        assert await held_digest(http, w.url, "alice") == digest(first["access_token"])
        [session] = w.running.router.backend.list("alice")
        await asyncio.sleep(max(first["expires_at"] - 2 - time.time(), 0) + 0.2)
        answered = await held_digest(http, w.url, "alice")
        refreshed = await w.connection("alice")
        assert refreshed["access_token"] != first["access_token"]
        assert answered == digest(refreshed["access_token"])
        [restarted] = w.running.router.backend.list("alice")
        assert restarted is not session  # idle, so restarted at once to take the new token


def peek_with_a_file(issuer: str) -> Profile:
    """The peek server (it reads files for the test), each user's upstream token in a file."""
    return Profile(name="demo", command=PEEK, upstream_oauth=upstream_oauth(issuer, file="/run/pier/upstream/token"))


async def test_a_token_file_is_rewritten_in_place_by_the_background_refresh(http, redis_server, tmp_path, monkeypatch):
    async with world(
        tmp_path, redis_server.url, monkeypatch, access_ttl=4, reap_interval_s=0.5, profile=peek_with_a_file
    ) as w:
        await connect(w, "alice", "alice-gh")
        first = await w.connection("alice")

        async def token_file() -> dict:
            status, body = await call(http, w.url, "alice", "read", path="/run/pier/upstream/token")
            assert status == 200, body
            return dict(body["result"]["structuredContent"])

        assert await token_file() == {"ok": True, "value": first["access_token"]}
        pid = (await call(http, w.url, "alice", "whoami"))[1]["result"]["structuredContent"]["value"]["pid"]

        # Nobody calls: the router refreshes before expiry and rewrites the file under the running server.
        await wait_until(lambda: _changed(w, first["access_token"]), timeout=30)
        refreshed = await w.connection("alice")
        await wait_until(lambda: _reads(token_file, refreshed["access_token"]), timeout=30)
        whoami = (await call(http, w.url, "alice", "whoami"))[1]["result"]["structuredContent"]["value"]
        assert whoami["pid"] == pid  # the same server: only its file changed
        # The file's directory is the router's, shown read-only: the server cannot replace it.
        written = await call(http, w.url, "alice", "write", path="/run/pier/upstream/token", text="forged")
        assert not written[1]["result"]["structuredContent"]["ok"]


async def _changed(w: World, old: str) -> bool:
    return (await w.connection("alice"))["access_token"] != old


async def _reads(token_file: Any, token: str) -> bool:
    return bool(await token_file() == {"ok": True, "value": token})


# -- what must change nothing ----------------------------------------------------------------------------


async def test_forged_replayed_expired_and_other_peoples_states_change_nothing(
    http, redis_server, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    async with world(tmp_path, redis_server.url, monkeypatch) as w:
        await connect(w, "bob", "bob-gh")
        bob = await w.connection("bob")
        redis = w.running.router.redis
        callback = f"{w.url}/v1/oauth/callback"
        bodies: list[str] = []

        async def refused(url: str, jar: aiohttp.ClientSession | None = None) -> str:
            async with (jar or http).get(url, headers={"Accept": "application/json"}) as response:
                body = await response.text()
            assert response.status == 400, body
            bodies.append(body)
            return str(json.loads(body)["error"]["details"]["reason"])

        # Forged: a state the router never made (well-formed or not), with a code or an error.
        assert "unknown" in await refused(f"{callback}?state={'A' * 43}&code=anything")
        assert "malformed" in await refused(f"{callback}?state=x&code=anything")
        assert "malformed" in await refused(f"{callback}?code=anything")

        # Replayed: the provider's real redirect, delivered twice by alice's own browser.
        async with browser() as alice_browser:
            url = await to_callback(alice_browser, f"{w.url}/v1/me/servers/demo/connect", "alice-gh",
                                    {**key_of("alice"), **HTML})  # fmt: skip
            async with alice_browser.get(url) as response:
                assert response.status == 200
            connected = await w.connection("alice")
            assert "unknown" in await refused(url, alice_browser)
        assert (await w.connection("alice"))["access_token"] == connected["access_token"]

        # Expired: the same, but the state outlived its time in Redis before the browser came back.
        async with browser() as alice_browser:
            url = await to_callback(alice_browser, f"{w.url}/v1/me/servers/demo/connect", "alice-gh-2",
                                    {**key_of("alice"), **HTML})  # fmt: skip
            state = parse_qs(urlsplit(url).query)["state"][0]
            assert await redis.pexpire(redis_keys.oauth_flow(state), 1)
            await asyncio.sleep(0.05)
            assert "unknown" in await refused(url, alice_browser)
        assert (await w.connection("alice"))["access_token"] == connected["access_token"]

        # Another user's flow: alice's authorization link, opened (and consented) in bob's browser with
        # bob's account: refused, and neither alice's connection nor bob's changes.
        async with browser() as alice_browser, browser() as bob_browser:
            async with alice_browser.get(
                f"{w.url}/v1/me/servers/demo/connect", headers={**key_of("alice"), **HTML}, allow_redirects=False
            ) as response:  # fmt: skip
                phishing_link = response.headers["Location"]
            url = await to_callback(bob_browser, phishing_link, "bob-gh")
            assert "another browser" in await refused(url, bob_browser)
        assert (await w.connection("alice"))["access_token"] == connected["access_token"]
        assert (await w.connection("bob"))["access_token"] == bob["access_token"]
        assert await held_digest(http, w.url, "bob") == digest(bob["access_token"])

        # The provider said no (the user declined): nothing stored, a clear answer.
        async with browser() as carol_browser:
            async with carol_browser.get(
                f"{w.url}/v1/users/carol/servers/demo/connect", headers=APP
            ) as response:  # fmt: skip
                link = (await response.json())["authorization_url"]
            state = parse_qs(urlsplit(link).query)["state"][0]
            async with carol_browser.get(
                f"{callback}?state={state}&error=access_denied", headers={"Accept": "application/json"}
            ) as response:  # fmt: skip
                assert response.status == 400
                assert "did not authorize" in (await response.json())["error"]["message"]
        assert await redis.get(redis_keys.connection("carol", "demo")) is None

        # None of it leaked a token or a code.
        code = parse_qs(urlsplit(url).query)["code"][0]
        for secret in (connected["access_token"], connected["refresh_token"], bob["access_token"], code):
            assert secret not in caplog.text
            assert all(secret not in body for body in bodies)


@pytest.mark.parametrize("fault", ["garbage", "hang"])
async def test_a_broken_provider_is_a_clear_error_and_the_connection_is_kept(
    http, redis_server, tmp_path, monkeypatch, fault
):
    async with world(tmp_path, redis_server.url, monkeypatch, oauth_timeout_s=1) as w:
        await connect(w, "alice", "alice-gh")
        before = await w.connection("alice")
        await w.upstream.fault(fault)
        try:
            # Reconnecting while the provider's token endpoint is broken: 502 with what happened.
            async with browser() as alice_browser:
                url = await to_callback(alice_browser, f"{w.url}/v1/me/servers/demo/connect", "alice-gh",
                                        {**key_of("alice"), **HTML})  # fmt: skip
                async with alice_browser.get(url, headers={"Accept": "application/json"}) as response:
                    body = await response.json()
            assert response.status == 502
            assert body["error"]["code"] == "CONNECTION_FAILED"
            why = "did not answer within 1 s" if fault == "hang" else "without a usable access token"
            assert why in body["error"]["message"]
            # The old connection is kept, and her session still works with it.
            assert (await w.connection("alice"))["access_token"] == before["access_token"]
            assert await held_digest(http, w.url, "alice") == digest(before["access_token"])
        finally:
            await w.upstream.fault("off")


async def test_a_refresh_the_provider_refuses_breaks_the_connection(http, redis_server, tmp_path, monkeypatch):
    async with world(tmp_path, redis_server.url, monkeypatch, access_ttl=4, reap_interval_s=60) as w:
        await connect(w, "alice", "alice-gh")
        first = await w.connection("alice")
        assert await held_digest(http, w.url, "alice") == digest(first["access_token"])
        # The user revokes the grant at the provider (as from their account's settings there).
        async with aiohttp.ClientSession() as raw, raw.post(
            f"{w.upstream.issuer}/token/revocation", data={"token": first["refresh_token"]},
            headers={"Authorization": aiohttp.encode_basic_auth("pier", w.client_secret)},
        ) as response:  # fmt: skip
            assert response.status == 200
        await asyncio.sleep(max(first["expires_at"] - 2 - time.time(), 0) + 0.2)  # now the token is due

        status, body = await call(http, w.url, "alice")
        assert (status, body["error"]["code"], body["error"]["details"]["reason"]) == (
            409,
            "CONNECTION_REQUIRED",
            "broken",
        )
        view = await get_json(http, f"{w.url}/v1/me/servers/demo/connection", key_of("alice"))
        assert (view["connected"], view["status"]) == (False, "broken")
        assert "invalid_grant" in view["reason"]
        assert not w.running.router.backend.list("alice")  # her session (and its dead token) ended

        # Connecting again mends it.
        await connect(w, "alice", "alice-gh")
        again = await w.connection("alice")
        assert again["status"] == "connected"
        assert await held_digest(http, w.url, "alice") == digest(again["access_token"])


# -- MCP clients ------------------------------------------------------------------------------------------


async def test_mcp_clients_are_shown_the_way_to_connect_and_their_retry_succeeds(
    http, redis_server, tmp_path, monkeypatch
):
    async with world(tmp_path, redis_server.url, monkeypatch) as w:
        url = f"{w.url}/v1/me/servers/demo/mcp"
        connect_url = f"{w.url}/v1/me/servers/demo/connect"
        alice = {**key_of("alice"), **ACCEPT}

        # 2025-11-25: the URL-elicitation-required error (-32042), naming the connect URL.
        initialize: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {"elicitation": {"url": {}}},
            "clientInfo": {"name": "test", "version": "1"}}}  # fmt: skip
        async with http.post(url, json=initialize, headers=alice) as response:
            answer = await response.json()
        assert answer["error"]["code"] == -32042
        [elicitation] = answer["error"]["data"]["elicitations"]
        assert (elicitation["mode"], elicitation["url"]) == ("url", connect_url)
        assert elicitation["elicitationId"]
        assert "demo" in elicitation["message"]
        # An earlier revision gets Pier's error with the same URL.
        old = {**initialize, "params": {**initialize["params"], "protocolVersion": "2025-06-18"}}
        async with http.post(url, json=old, headers=alice) as response:
            answer = await response.json()
        assert (answer["error"]["code"], answer["error"]["data"]["code"]) == (-32000, "CONNECTION_REQUIRED")
        assert answer["error"]["data"]["connect_url"] == connect_url

        # 2026-07-28, a client that takes URL-mode elicitation: input_required, asking it to open the URL.
        call = modern_request(7, "tools/call", {"name": "env_hash", "arguments": {"name": "UPSTREAM_TOKEN"}},
                              {"elicitation": {"url": {}}})  # fmt: skip
        status, answer = await post(http, url, call, {**modern_headers(call), **key_of("alice")})
        assert status == 200
        result = answer["result"]
        assert result["resultType"] == "input_required"
        asked = result["inputRequests"]["connect"]
        assert (asked["method"], asked["params"]["mode"], asked["params"]["url"]) == (
            "elicitation/create", "url", connect_url,
        )  # fmt: skip
        # …and one that does not: Pier's error, HTTP 409.
        plain = modern_request(8, "tools/call", {"name": "env_hash", "arguments": {"name": "UPSTREAM_TOKEN"}})
        status, answer = await post(http, url, plain, {**modern_headers(plain), **key_of("alice")})
        assert (status, answer["error"]["data"]["code"]) == (409, "CONNECTION_REQUIRED")

        # The one endpoint for all servers says the same to a 2025-11-25 client.
        aggregate_call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                          "params": {"name": "demo__env_hash", "arguments": {"name": "UPSTREAM_TOKEN"}}}  # fmt: skip
        headers = {**alice, "MCP-Protocol-Version": "2025-11-25"}
        async with http.post(f"{w.url}/v1/me/mcp", json=aggregate_call, headers=headers) as response:
            assert (await response.json())["error"]["code"] == -32042

        # The user opens the URL and connects; the clients' retries succeed.
        await connect(w, "alice", "alice-gh")
        token = (await w.connection("alice"))["access_token"]
        retry = {**call, "params": {**call["params"], "inputResponses": {"connect": {"action": "accept"}},
                                    "requestState": result["requestState"]}}  # fmt: skip
        status, answer = await post(http, url, retry, {**modern_headers(retry), **key_of("alice")})
        assert (status, answer["result"]["structuredContent"]["result"]) == (200, digest(token)), answer
        keyed = httpx2.AsyncClient(headers=key_of("alice"), timeout=60)
        async with keyed, Client(streamable_http_client(url, http_client=keyed), mode="legacy") as mcp:
            answered = await mcp.call_tool("env_hash", {"name": "UPSTREAM_TOKEN"})
        assert answered.structured_content == {"result": digest(token)}


# -- what a router refuses to start with -------------------------------------------------------------------


async def test_a_router_refuses_profiles_it_could_not_keep_tokens_of_safely(redis_server, monkeypatch):
    from pier.core.errors import ConfigError

    oauth = upstream_oauth("https://auth.example.com", env="UPSTREAM_TOKEN")
    connected = Catalog([demo_with(upstream_oauth=oauth)])
    monkeypatch.delenv(UPSTREAM_SECRET_ENV, raising=False)
    refusals: list[tuple[Catalog, dict[str, Any], str]] = [
        (connected, {"secrets_key": SECRETS_KEY}, f"router's environment variable {UPSTREAM_SECRET_ENV}$"),
        (connected, {}, "PIER_SECRETS_KEY"),
        (Catalog([demo_with(token_exchange={"audience": "https://api", "env": "T"})]), {"secrets_key": SECRETS_KEY},
         "PIER_OIDC_CLIENT_ID"),
    ]  # fmt: skip
    for catalog, settings, why in refusals:
        with pytest.raises(ConfigError, match=why):
            async with router_app(redis_server.url, catalog, **settings):
                pass
    monkeypatch.setenv(UPSTREAM_SECRET_ENV, "a-secret")
    # Sessions that cannot be kept apart may not hold users' tokens; a token file needs the sandbox.
    with pytest.raises(ConfigError, match=r"refusing to start.*demo"):
        async with router_app(redis_server.url, connected, secrets_key=SECRETS_KEY, local_isolation="none"):
            pass
    if os.geteuid() == 0:
        filed = Catalog([demo_with(upstream_oauth={**oauth, "file": "/run/pier/token"})])
        with pytest.raises(ConfigError, match="as files, which local sessions get only in a sandbox"):
            async with router_app(redis_server.url, filed, secrets_key=SECRETS_KEY, local_isolation="uid"):
                pass
