"""Identity: sign-in with a real OpenID provider, tokens the router refuses, per-user secrets, and one
MCP endpoint for all of a user's servers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.cli.redis_server import free_port
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.errors import ConfigError
from tests.identity import OpenIdProvider, new_key, signed_in_client
from tests.servers import EVERYTHING, get_json, router_app, scrape, text_of

SECRETS_KEY = base64.b64encode(os.urandom(32)).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@contextlib.asynccontextmanager
async def oidc_router(redis_url: str, provider: OpenIdProvider, catalog=None, **settings):
    port = free_port()
    async with router_app(
        redis_url, catalog, port=port, public_url=f"http://127.0.0.1:{port}", oidc_issuer=provider.issuer,
        oidc_scopes=["mcp"], **settings,
    ) as running:  # fmt: skip
        yield running


async def test_an_mcp_client_signs_in_with_the_provider_and_uses_its_own_session(http, redis_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with (
        OpenIdProvider(tmp_path / "provider") as provider,
        oidc_router(redis_server.url, provider, app_keys=["app-key"]) as running,
    ):
        url = f"{running.url}/v1/me/servers/demo/mcp"
        # What the client sees first: a 401 that points at the resource's metadata, which names the provider.
        async with http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
        metadata_url = f"{running.url}/.well-known/oauth-protected-resource/v1/me/servers/demo/mcp"
        assert f'resource_metadata="{metadata_url}"' in challenge
        assert 'scope="mcp"' in challenge
        metadata = await get_json(http, metadata_url)
        assert metadata["resource"] == url
        assert metadata["authorization_servers"] == [provider.issuer]

        auth, storage = signed_in_client(url, "alice")
        async with (
            httpx2.AsyncClient(auth=auth, timeout=60) as client,
            Client(streamable_http_client(url, http_client=client), mode="legacy") as mcp,
        ):
            tools = await mcp.list_tools()
            assert "counter" in {t.name for t in tools.tools}
            assert (await mcp.call_tool("counter", {})).structured_content == {"result": 1}
        assert storage.tokens is not None
        assert [s.key.user for s in running.router.backend.list()] == ["alice"]  # her own session, nobody else's

        # The token acts for alice and for nobody else, on every route.
        token = {"Authorization": f"Bearer {storage.tokens.access_token}"}
        async with http.get(f"{running.url}/v1/users/alice/sessions", headers=token) as response:
            assert response.status == 200
        for path in ("users/bob/sessions", "users/bob/servers/demo/tools", "users/bob/servers/demo/secrets"):
            async with http.get(f"{running.url}/v1/{path}", headers=token) as response:
                assert response.status == 403, path
        async with http.post(
            f"{running.url}/v1/users/bob/servers/demo/tools/echo/call", json={"arguments": {}}, headers=token
        ) as response:
            assert response.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{running.url}/v1/users/bob/servers/demo/ws", headers=token)
        assert refused.value.status == 403
        # Bob's job (made with the app key): its record, events and cancellation are not alice's.
        async with http.post(
            f"{running.url}/v1/users/bob/servers/demo/tools/counter/call",
            json={"arguments": {"delay_s": 3}, "timeout_s": 0.2}, headers={"X-API-Key": "app-key"},
        ) as response:  # fmt: skip
            assert response.status == 202
            job = (await response.json())["job_id"]
        for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
            async with http.request(method, f"{running.url}/v1/jobs/{job}{path}", headers=token) as response:
                assert response.status == 403, (method, path)
        # The token is in no log line, metric or dashboard field.
        dashboard = json.dumps(await get_json(http, f"{running.url}/v1/dashboard", headers={"X-API-Key": "app-key"}))
        metrics = (await scrape(http, running.url)).samples
        assert storage.tokens.access_token not in dashboard + repr(metrics) + caplog.text


# The real provider's refusals and key rotation end to end; each claim check is a unit test (test_oidc.py).
@pytest.mark.slow
async def test_tokens_the_router_refuses(http, redis_server, tmp_path, monkeypatch):
    # The router refetches an issuer's keys at most every 10 s; this test rotates sooner than that.
    monkeypatch.setattr("pier.router.auth.oidc._REFRESH_AT_MOST_EVERY_S", 0.0)
    async with (
        OpenIdProvider(tmp_path / "provider") as provider,
        OpenIdProvider(tmp_path / "stranger") as stranger,
        oidc_router(redis_server.url, provider) as running,
    ):
        url = f"{running.url}/v1/me/servers/demo/tools"
        audience = f"{running.url}/v1/me/servers/demo/mcp"
        good = {"sub": "alice", "aud": audience, "scope": "mcp"}
        header, body, _ = provider.sign(good).split(".")
        forged_key = {**new_key("k1")}  # the right kid, another key

        async def status_of(token: str) -> tuple[int, str]:
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status, response.headers.get("WWW-Authenticate", "")

        assert (await status_of(provider.sign(good)))[0] == 200
        refused = {
            "another audience": provider.sign({**good, "aud": "https://elsewhere.example"}),
            "another issuer": stranger.sign(good),
            "expired": provider.sign({**good, "exp": 1_000_000, "iat": 999_000}),
            "not yet valid": provider.sign({**good, "nbf": 4_000_000_000}),
            "alg none": _b64(b'{"alg":"none","typ":"JWT"}') + f".{body}.",
            "forged signature": provider.sign(good, forged_key),
            "tampered": f"{header}.{_b64(json.dumps({**good, 'sub': 'bob'}).encode())}.{_}",
            "bad user id": provider.sign({**good, "sub": "alice\nroot"}),
        }
        for why, token in refused.items():
            status, challenge = await status_of(token)
            assert status == 401, why
            assert 'error="invalid_token"' in challenge, why
        status, challenge = await status_of(provider.sign({**good, "scope": "openid"}))
        assert status == 403
        assert 'error="insufficient_scope"' in challenge

        # Key rotation: the provider now signs with k2 only. Its first k2 token makes the router
        # fetch the keys again and is accepted; a token signed by the removed k1 is not.
        old_key = provider.keys[0]
        await provider.restart([new_key("k2")])
        assert (await status_of(provider.sign(good)))[0] == 200
        assert (await status_of(provider.sign(good, old_key)))[0] == 401


def secret_profile() -> Profile:
    secrets = {"DEMO_TOKEN": {"description": "the user's own token", "required": True}}
    return Profile.model_validate({**demo_profile().model_dump(), "user_secrets": secrets})


async def test_each_user_gets_only_their_own_secrets(http, redis_server, caplog):
    caplog.set_level(logging.DEBUG)
    alice_value, bob_value = "alice-" + os.urandom(8).hex(), "bob-" + os.urandom(8).hex()
    async with router_app(
        redis_server.url, Catalog([secret_profile()]), secrets_key=SECRETS_KEY, app_keys=["app-key"]
    ) as running:
        app = {"X-API-Key": "app-key"}

        async def call(user: str, tool: str, **arguments) -> tuple[int, dict]:
            async with http.post(
                f"{running.url}/v1/users/{user}/servers/demo/tools/{tool}/call", json={"arguments": arguments},
                headers=app,
            ) as response:  # fmt: skip
                return response.status, await response.json()

        status, refused = await call("alice", "env_hash", name="DEMO_TOKEN")
        assert (status, refused["error"]["code"], refused["error"]["details"]["missing"]) == (
            409, "SECRETS_REQUIRED", ["DEMO_TOKEN"],
        )  # fmt: skip
        assert not running.router.backend.list()  # nothing started without them

        async def put(user: str, value: str) -> None:
            url = f"{running.url}/v1/users/{user}/servers/demo/secrets"
            async with http.put(url, json={"DEMO_TOKEN": value}, headers=app) as response:
                assert response.status == 204

        await put("alice", alice_value)
        await put("bob", bob_value)

        def digest(value: str) -> str:
            return hashlib.sha256(value.encode()).hexdigest()[:16]

        for user, value in (("alice", alice_value), ("bob", bob_value)):
            status, body = await call(user, "env_hash", name="DEMO_TOKEN")
            assert (status, body["result"]["structuredContent"]["result"]) == (200, digest(value))
        listing = await get_json(http, f"{running.url}/v1/users/alice/servers/demo/secrets", headers=app)
        assert [item["name"] for item in listing["secrets"]] == ["DEMO_TOKEN"]
        assert alice_value not in json.dumps(listing)

        # Rotating alice's secret restarts her session only.
        sessions = {s.key.user: s for s in running.router.backend.list()}
        await put("alice", alice_value + "-2")
        status, body = await call("alice", "env_hash", name="DEMO_TOKEN")
        assert body["result"]["structuredContent"]["result"] == digest(alice_value + "-2")
        after = {s.key.user: s for s in running.router.backend.list()}
        assert after["alice"] is not sessions["alice"]
        assert after["bob"] is sessions["bob"]

        # The values are nowhere but in the servers: not in the logs, the dashboard, the metrics, Redis in clear.
        dashboard = json.dumps(await get_json(http, f"{running.url}/v1/dashboard", headers=app))
        metrics = repr((await scrape(http, running.url)).samples)
        stored = b""
        async for key in running.router.redis.scan_iter("*"):
            kind = await running.router.redis.type(key)
            if kind == b"hash":
                stored += repr(await running.router.redis.hgetall(key)).encode()
            elif kind == b"string":
                raw = await running.router.redis.get(key)
                stored += raw if isinstance(raw, bytes) else b""
        for value in (alice_value, bob_value, alice_value + "-2"):
            assert value not in caplog.text
            assert value not in dashboard + metrics
            assert value.encode() not in stored


async def test_a_router_with_secret_profiles_and_no_key_refuses_to_start(redis_server):
    with pytest.raises(ConfigError, match="PIER_SECRETS_KEY"):
        async with router_app(redis_server.url, Catalog([secret_profile()])):
            pass


async def test_one_mcp_endpoint_for_all_of_a_users_servers(redis_server):
    catalog = Catalog([demo_profile(), Profile(name="everything", command=EVERYTHING)])
    async with router_app(redis_server.url, catalog, user_keys={"alice-key": "alice", "bob-key": "bob"}) as running:
        url = f"{running.url}/v1/me/mcp"
        alice = httpx2.AsyncClient(headers={"Authorization": "Bearer alice-key"}, timeout=60)
        async with alice, Client(streamable_http_client(url, http_client=alice), mode="legacy") as mcp:
            names = {t.name for t in (await mcp.list_tools()).tools}
            assert {"demo__echo", "demo__counter", "everything__echo"} <= names
            assert not running.router.backend.list("alice")  # listing started none of her sessions

            assert (await mcp.call_tool("demo__counter", {})).structured_content == {"result": 1}
            assert [s.key.profile for s in running.router.backend.list("alice")] == ["demo"]
            echoed = await mcp.call_tool("everything__echo", {"message": "hi"})
            assert "hi" in text_of(echoed)
            assert sorted(s.key.profile for s in running.router.backend.list("alice")) == ["demo", "everything"]
            prompts = {p.name for p in (await mcp.list_prompts()).prompts}
            assert any(name.startswith("everything__") for name in prompts)
        assert not running.router.backend.list("bob")  # alice's aggregate never reached bob
