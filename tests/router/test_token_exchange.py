"""Token exchange (RFC 8693): a profile whose upstream trusts the company's identity provider gets, for each
user, the user's own token exchanged there for one aimed at the upstream (the grant is the test provider's
own: oidc-provider has none), cached until it expires, renewed from the user's next token."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time

import httpx2
import jwt
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.cli.redis_server import free_port
from pier.core import redis_keys
from pier.core.catalog import Catalog, Profile, demo_profile
from tests.identity import EXCHANGE_GRANT, OpenIdProvider, digest, router_client, signed_in_client, unseal
from tests.servers import get_json, router_app

SECRETS_KEY = base64.b64encode(os.urandom(32)).decode()
PARTNER = "https://api.partner.test"


async def test_each_users_token_is_exchanged_for_the_upstream_and_cached(http, redis_server, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secret = secrets.token_urlsafe(24)
    profile = Profile.model_validate(
        {**demo_profile().model_dump(), "token_exchange": {"audience": PARTNER, "scope": "mcp", "env": "PARTNER_TOKEN"}}
    )
    async with (
        OpenIdProvider(
            tmp_path / "idp", clients=[router_client(base, secret, "refresh_token", EXCHANGE_GRANT)], exchange_ttl=16
        ) as idp,
        router_app(
            redis_server.url, Catalog([profile]), port=port, public_url=base, oidc_issuer=idp.issuer,
            oidc_scopes=["mcp"], oidc_client_id="pier-router", oidc_client_secret=secret, secrets_key=SECRETS_KEY,
            app_keys=["app-key"], reap_interval_s=60,
        ) as running,
    ):  # fmt: skip
        url = f"{base}/v1/me/servers/demo/mcp"
        redis = running.router.redis

        async def exchanged(user: str) -> dict:
            key = redis_keys.exchanged(user, "demo")
            raw = await redis.get(key)
            assert raw is not None
            return unseal(raw, key, SECRETS_KEY)

        # Alice's MCP client signs in; its first call has her token exchanged for the partner's.
        auth, storage = signed_in_client(url, "alice")
        async with (
            httpx2.AsyncClient(auth=auth, timeout=60) as client,
            Client(streamable_http_client(url, http_client=client), mode="legacy") as mcp,
        ):
            answer = await mcp.call_tool("env_hash", {"name": "PARTNER_TOKEN"})
        assert storage.tokens is not None
        alice = await exchanged("alice")
        claims = jwt.decode(alice["token"], options={"verify_signature": False})
        assert (claims["sub"], claims["aud"], claims["scope"], claims["iss"]) == ("alice", PARTNER, "mcp", idp.issuer)
        assert answer.structured_content == {"result": digest(alice["token"])}
        assert (await idp.stats())["grants"][EXCHANGE_GRANT] == 1

        # Cached: her REST calls (her token) and an app's on her behalf use it; no new exchange.
        bearer = {"Authorization": f"Bearer {storage.tokens.access_token}"}

        async def held(user: str, headers: dict[str, str]) -> tuple[int, dict]:
            arguments = {"arguments": {"name": "PARTNER_TOKEN"}}
            call = f"{base}/v1/users/{user}/servers/demo/tools/env_hash/call"
            async with http.post(call, json=arguments, headers=headers) as response:
                return response.status, await response.json()

        for headers in (bearer, {"X-API-Key": "app-key"}):
            status, body = await held("alice", headers)
            assert (status, body["result"]["structuredContent"]["result"]) == (200, digest(alice["token"]))
        assert (await idp.stats())["grants"][EXCHANGE_GRANT] == 1
        view = await get_json(http, f"{base}/v1/me/servers/demo/connection", bearer)
        assert (view["connected"], view["status"]) == (True, "token_exchange")
        assert alice["token"] not in str(view)

        # Nobody's token to exchange: an app alone cannot act as carol there.
        status, body = await held("carol", {"X-API-Key": "app-key"})
        assert (status, body["error"]["details"]["reason"]) == (401, "subject_token_required")
        assert not running.router.backend.list("carol")

        # The exchanged token is due (16 s, from 8 s on: time enough for a loaded machine to get through what came
        # before): her next call exchanges her token again, and her session (the token in a variable) restarts.
        await asyncio.sleep(max(alice["expires_at"] - 8 - time.time(), 0) + 0.2)
        status, body = await held("alice", bearer)
        renewed = await exchanged("alice")
        assert renewed["token"] != alice["token"]
        assert (status, body["result"]["structuredContent"]["result"]) == (200, digest(renewed["token"]))
        assert (await idp.stats())["grants"][EXCHANGE_GRANT] == 2
