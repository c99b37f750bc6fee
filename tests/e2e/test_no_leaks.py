"""Keys and tokens never reach logs, metric labels, the dashboard, exported spans, the portal's pages or error
answers — checked by grepping everything (the spans as the collector received them, bytes and all)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets

import aiohttp
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from yarl import URL

from pier.cli.redis_server import free_port
from pier.core import redis_keys, tracing
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.logs import JsonFormatter
from tests.hooks import Collector, PolicyServer, Receiver
from tests.identity import (
    EXCHANGE_GRANT,
    UPSTREAM_SECRET_ENV,
    OpenIdProvider,
    router_client,
    unseal,
    upstream_client,
    upstream_oauth,
    walk,
)
from tests.servers import router_app, wait_until, worker_processes

APP_KEY = "app-key-0f9a8b7c6d5e"
USER_KEY = "user-key-1a2b3c4d5e6f"
WRONG_KEY = "wrong-key-9z8y7x6w5v"
POLICY_TOKEN = "policy-token-5k4j3h2g1f"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-secret-never-logged-xyz").decode()
SECRETS_KEY = base64.b64encode(os.urandom(32)).decode()


async def test_no_key_or_token_appears_in_logs_metrics_dashboard_or_spans(
    http, redis_server, caplog, capfd, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    async with (
        Collector() as collector,
        PolicyServer() as policy,
        Receiver() as receiver,
        traced(monkeypatch, collector),
        router_app(
            redis_server.url, app_keys=[APP_KEY], user_keys={USER_KEY: "alice"}, policy_url=policy.url,
            policy_token=POLICY_TOKEN, webhook_url=receiver.url, log_level="DEBUG", sidecar_log_level="DEBUG",
        ) as running,
        worker_processes(
            redis_server.url, PIER_WEBHOOK_SECRET=WEBHOOK_SECRET, PIER_POLICY_TOKEN=POLICY_TOKEN, PIER_LOG_LEVEL="DEBUG"
        ),
    ):  # fmt: skip
        alice = running.user_url("alice")
        for key in (USER_KEY, WRONG_KEY, APP_KEY):
            async with http.post(
                f"{alice}/tools/echo/call",
                json={"arguments": {"message": "x"}},
                headers={"Authorization": f"Bearer {key}"},
            ):
                pass
        async with http.post(
            f"{alice}/tools/slow/call",
            json={"arguments": {"seconds": 0.5}, "timeout_s": 0.1},
            headers={"X-API-Key": USER_KEY},
        ) as response:
            job_id = (await response.json())["job_id"]
        keyed = httpx2.AsyncClient(headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60)
        async with keyed, Client(streamable_http_client(f"{alice}/mcp", http_client=keyed)) as client:
            await client.call_tool("echo", {"message": "relayed"})
        await wait_until(lambda: receiver.received)  # the job finished and its webhook went out
        await wait_until(lambda: collector.named("process pier:jobs"))  # the worker's spans too
        async with http.get(f"{running.url}/v1/jobs/{job_id}", headers={"X-API-Key": USER_KEY}) as response:
            assert (await response.json())["status"] == "completed"
        [session] = running.router.backend.list("alice")
        tokens = [session.endpoint.token]
        dashboard = await get_json_with(http, f"{running.url}/v1/dashboard", APP_KEY)
        async with http.get(f"{running.url}/metrics") as response:
            metrics = await response.text()
        await asyncio.to_thread(tracing.flush)

    secrets = [
        APP_KEY,
        USER_KEY,
        WRONG_KEY,
        POLICY_TOKEN,
        WEBHOOK_SECRET,
        WEBHOOK_SECRET[6:],
        redis_server.password,
        *tokens,
    ]
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    out, err = capfd.readouterr()
    spans = b"".join(collector.bodies).decode("latin-1")  # every exported byte: names, attributes, events, status
    everything = {
        "logs": logged, "stderr": err, "stdout": out, "metrics": metrics, "dashboard": str(dashboard), "spans": spans
    }  # fmt: skip
    assert len(logged) > 1000  # the scenario did log plenty
    assert len(collector.spans) > 50  # and traced plenty: the router's and the worker's spans
    for where, text in everything.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"


@contextlib.asynccontextmanager
async def traced(monkeypatch, collector: Collector):
    """Tracing on for what starts inside (this process's router, the workers' processes)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield


async def get_json_with(http, url: str, key: str) -> dict:
    async with http.get(url, headers={"X-API-Key": key}) as response:
        return await response.json()


async def test_no_upstream_token_appears_in_logs_metrics_pages_redis_or_errors(
    http, redis_server, tmp_path, monkeypatch, caplog, capfd
):
    """A user signs in to the portal, connects an account, uses tools (one through token exchange), the token
    is refreshed, things fail, they disconnect: no token, code, client secret or cookie is anywhere but
    where it must be."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    idp_secret, upstream_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    monkeypatch.setenv(UPSTREAM_SECRET_ENV, upstream_secret)
    upstream_app = upstream_client(f"{base}/v1/oauth/callback", upstream_secret)
    async with (
        OpenIdProvider(tmp_path / "idp", clients=[router_client(base, idp_secret, EXCHANGE_GRANT)]) as idp,
        OpenIdProvider(tmp_path / "upstream", clients=[upstream_app]) as upstream,
    ):
        oauth = upstream_oauth(upstream.issuer, env="UPSTREAM_TOKEN")
        connected = Profile.model_validate({**demo_profile().model_dump(), "upstream_oauth": oauth})
        partner = Profile(name="partner", command=demo_profile().command,
                          token_exchange={"audience": "https://partner.test", "env": "PARTNER_TOKEN"})  # fmt: skip
        async with (
            router_app(
                redis_server.url, Catalog([connected, partner]), port=port, public_url=base, oidc_issuer=idp.issuer,
                oidc_scopes=["mcp"], oidc_client_id="pier-router", oidc_client_secret=idp_secret,
                secrets_key=SECRETS_KEY, app_keys=[APP_KEY], log_level="DEBUG", sidecar_log_level="DEBUG",
            ) as running,
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser,
        ):  # fmt: skip
            seen, csrf = await _sign_in_connect_and_use(browser, base)
            redis = running.router.redis
            first = await _unsealed(redis, redis_keys.connection("alice", "demo"))
            exchanged = await _unsealed(redis, redis_keys.exchanged("alice", "partner"))
            cookie = browser.cookie_jar.filter_cookies(URL(base))["pier_session"].value
            await _age(redis, redis_keys.connection("alice", "demo"), first)
            seen += await _refresh_and_fail(http, browser, base, upstream)
            refreshed = await _unsealed(redis, redis_keys.connection("alice", "demo"))
            assert refreshed["access_token"] != first["access_token"]
            dashboard = await get_json_with(http, f"{base}/v1/dashboard", APP_KEY)
            async with http.get(f"{base}/metrics") as response:
                metrics = await response.text()
            stored = await _stored(redis)
            async with browser.post(
                f"{base}/portal/servers/demo/disconnect", data={"csrf": csrf}, headers={"Origin": base}
            ) as response:  # fmt: skip
                seen.append(await response.text())
            assert await redis.get(redis_keys.connection("alice", "demo")) is None

    never = {
        "access token": first["access_token"], "refresh token": first["refresh_token"],
        "refreshed token": refreshed["access_token"], "exchanged token": exchanged["token"],
        "identity provider client secret": idp_secret, "upstream client secret": upstream_secret,
        "portal cookie": cookie,
    }  # fmt: skip
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    out, err = capfd.readouterr()
    places = {"logs": logged, "stderr": err, "stdout": out, "metrics": metrics, "dashboard": str(dashboard),
              "pages and answers": "\n".join(seen), "Redis": stored}  # fmt: skip
    assert "account connected" in logged  # the scenario logged what it did
    for where, text in places.items():
        for what, secret in never.items():
            assert secret not in text, f"the {what} leaked into {where}"


async def _sign_in_connect_and_use(browser: aiohttp.ClientSession, base: str) -> tuple[list[str], str]:
    """Alice signs in to the portal, connects (the portal's cookie identifies her on the connect route), uses
    both servers' `env_hash` from the portal: the pages she saw, and her forms' CSRF token."""
    seen = []
    for url, account in (
        (f"{base}/portal/login", "alice"),
        (f"{base}/v1/me/servers/demo/connect?next=/portal", "alice-gh"),
    ):
        _, page = await walk(browser, url, account)
        assert page is not None
        seen.append(await page.text())
    assert "id='connection-demo'>Connected" in seen[-1]
    csrf = re.search(r"name='csrf' value='([^']+)'", seen[-1])
    assert csrf is not None
    for server, variable in (("demo", "UPSTREAM_TOKEN"), ("partner", "PARTNER_TOKEN")):
        form = {"csrf": csrf.group(1), "tool": "env_hash", "arguments": json.dumps({"name": variable})}
        async with browser.post(f"{base}/portal/servers/{server}/call", data=form, headers={"Origin": base}) as answer:
            seen.append(await answer.text())
            assert answer.status == 200
            assert "data-state='completed'" in seen[-1]
    return seen, csrf.group(1)


async def _refresh_and_fail(
    http: aiohttp.ClientSession, browser: aiohttp.ClientSession, base: str, upstream: OpenIdProvider
) -> list[str]:
    """A call that refreshes her (aged) token; a reconnection while the provider answers garbage; a forged
    callback; an app's view of her connection: what each answered."""
    seen = []
    # Her running session knows its own token's age: ended, the next call starts one from the aged record.
    async with http.delete(f"{base}/v1/users/alice/servers/demo", headers={"X-API-Key": APP_KEY}) as r:
        assert r.status in (200, 204), await r.text()
    call = f"{base}/v1/users/alice/servers/demo/tools/env_hash/call"
    async with http.post(call, json={"arguments": {"name": "UPSTREAM_TOKEN"}}, headers={"X-API-Key": APP_KEY}) as r:
        seen.append(await r.text())
    await upstream.fault("garbage")
    try:
        _, page = await walk(browser, f"{base}/v1/me/servers/demo/connect?next=/portal", "alice-gh")
        assert page is not None
        assert page.status == 502
        seen.append(await page.text())
    finally:
        await upstream.fault("off")
    async with http.get(f"{base}/v1/oauth/callback?state={'x' * 43}&code=abc") as response:
        seen.append(await response.text())
    async with http.get(f"{base}/v1/users/alice/servers/demo/connection", headers={"X-API-Key": APP_KEY}) as r:
        seen.append(await r.text())
    async with browser.get(f"{base}/portal") as response:
        seen.append(await response.text())
    return seen


async def _stored(redis) -> str:
    """Every string Pier keeps in Redis, as text (sealed values stay sealed)."""
    stored = []
    async for key in redis.scan_iter("*"):
        if await redis.type(key) == b"string":
            value = await redis.get(key)
            stored.append(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return "\n".join(stored)


async def _unsealed(redis, key: str) -> dict:
    raw = await redis.get(key)
    assert raw is not None, key
    return unseal(raw, key, SECRETS_KEY)


async def _age(redis, key: str, stored: dict) -> None:
    """Make a stored connection 590 s older: its token is due for a refresh."""
    from pier.router.usersecrets import Sealer

    stored = {**stored, "obtained_at": stored["obtained_at"] - 590, "expires_at": stored["expires_at"] - 590}
    await redis.set(key, Sealer(SECRETS_KEY).seal(json.dumps(stored), key))
