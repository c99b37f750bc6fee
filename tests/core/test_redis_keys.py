"""Every name Pier writes to Redis is one of `pier.core.redis_keys.NAMES`: a full run — keyed, rate-limited,
handed-off, cancelled and streamed calls, users' secrets, an MCP session, a dead-lettered webhook — and a run
of the account flows — a portal sign-in, a connected account refreshed, a token exchange — against a real
redis-server, with Redis's own MONITOR listing every command, and Redis itself (`COMMAND GETKEYS`) saying
which arguments of each are keys. Between them, the two runs use every name."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pier.cli.redis_server import free_port
from pier.core import redis_keys
from pier.core.catalog import Catalog, Profile, demo_profile
from tests.hooks import Receiver
from tests.identity import (
    EXCHANGE_GRANT,
    UPSTREAM_SECRET_ENV,
    OpenIdProvider,
    authorize,
    router_client,
    upstream_client,
    upstream_oauth,
)
from tests.servers import get_json, router_app, sse_events, wait_until, worker_processes

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"pier-test-webhook-secret-32bytes").decode()
# Commands that name no key: Redis cannot say which of their arguments are keys, and none are.
KEYLESS = frozenset(
    {b"ping", b"info", b"hello", b"client", b"select", b"multi", b"exec", b"discard", b"command", b"config",
     b"echo", b"auth", b"quit", b"reset", b"psubscribe", b"punsubscribe", b"subscribe", b"unsubscribe",
     b"publish", b"script", b"time", b"dbsize", b"scan", b"unwatch"}
)  # fmt: skip
# The names only the account flows write (the second run).
ACCOUNT_NAMES = frozenset(n for n in redis_keys.NAMES if n.template.startswith(("pier:oauth:", "pier:portal:")))
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b'"': b'"', b"\\": b"\\"}


def _unquote(quoted: bytes) -> bytes:
    """One argument as MONITOR quotes it (sdscatrepr: \\" \\\\ \\n … and \\xHH)."""
    out, i = bytearray(), 0
    while i < len(quoted):
        if quoted[i : i + 1] == b"\\":
            if quoted[i + 1 : i + 2] == b"x":
                out += bytes([int(quoted[i + 2 : i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES[quoted[i + 1 : i + 2]]
            i += 2
            continue
        out += quoted[i : i + 1]
        i += 1
    return bytes(out)


@contextlib.asynccontextmanager
async def monitored(url: str) -> AsyncIterator[list[list[bytes]]]:
    """Every command Redis runs meanwhile (Lua's own calls included), as its arguments."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=2**24)  # long lines
    if parts.password:
        writer.write(f"AUTH {parts.password}\r\n".encode())
        assert await reader.readline() == b"+OK\r\n"
    writer.write(b"MONITOR\r\n")
    await writer.drain()
    assert await reader.readline() == b"+OK\r\n"
    commands: list[list[bytes]] = []

    async def read() -> None:
        while line := await reader.readline():
            _, _, args = line.rstrip(b"\r\n").partition(b"] ")
            commands.append([_unquote(a) for a in _ARG.findall(args)])

    task = asyncio.create_task(read())
    try:
        yield commands
    finally:
        await asyncio.sleep(0.2)  # the last commands' lines
        writer.close()
        await asyncio.gather(task, return_exceptions=True)


async def _names_in(client: aioredis.Redis, commands: list[list[bytes]]) -> tuple[set[str], set[str], set[str]]:
    """The keys the commands named, the channels they published to, the patterns they subscribed."""
    keys: set[str] = set()
    channels: set[str] = set()
    patterns: set[str] = set()
    for command in commands:
        name = command[0].lower()
        if name == b"publish":
            channels.add(command[1].decode())
        elif name == b"psubscribe":
            patterns.update(a.decode() for a in command[1:])
        try:
            found: Any = await client.command_getkeys(*command)
        except ResponseError:
            assert name in KEYLESS, f"Redis found no keys in {command!r}"
            continue
        keys.update(k.decode() if isinstance(k, bytes) else k for k in found)
    return keys, channels, patterns


async def _checked(redis_url: str, commands: list[list[bytes]]) -> tuple[set[Any], set[str], set[str]]:
    """The names a run used (every key it wrote one of Pier's, and nothing left in Redis unseen); its
    channels and patterns."""
    client = aioredis.from_url(redis_url)
    try:
        keys, channels, patterns = await _names_in(client, commands)
        stored = {k.decode() async for k in client.scan_iter(count=1000)}
    finally:
        await client.aclose()
    assert stored <= keys  # what is left in Redis was written while MONITOR looked
    unknown = sorted(k for k in keys if redis_keys.name_of(k) is None)
    assert not unknown, f"keys that are no name of Pier's: {unknown}"
    return {redis_keys.name_of(k) for k in keys | channels}, channels, patterns


async def test_every_key_a_full_run_writes_is_one_of_pier_s_names(http, redis_server):
    secrets = {"VAULT_TOKEN": {"description": "the user's token", "required": True}}
    vault = Profile.model_validate({**demo_profile().model_dump(), "name": "vault", "user_secrets": secrets})
    # No keys: an open router, whose callers are rate-limited per user as "open" ones.
    settings: dict[str, Any] = {
        "rate_limit_open_per_min": 1000,
        "secrets_key": base64.b64encode(os.urandom(32)).decode(),
    }
    webhooks = {"PIER_WEBHOOK_SECRET": WEBHOOK_SECRET, "PIER_WEBHOOK_ATTEMPTS": "1", "PIER_WEBHOOK_BACKOFF_S": "0"}
    async with (
        Receiver(fail_with=500) as hook,
        monitored(redis_server.url) as commands,
        router_app(redis_server.url, Catalog([demo_profile(), vault]), **settings) as running,
        worker_processes(redis_server.url, 1, PIER_WEBHOOK_URL=hook.url, **webhooks),
    ):
        base = running.user_url("alice")

        async def call(tool: str, timeout_s: float | None = None, key: str | None = None, **arguments: Any) -> dict:
            body: dict[str, Any] = {"arguments": arguments} | ({"timeout_s": timeout_s} if timeout_s else {})
            headers = {"Idempotency-Key": key} if key else {}
            async with http.post(f"{base}/tools/{tool}/call", json=body, headers=headers) as response:
                assert response.status in (200, 202), await response.text()
                return await response.json()

        assert (await call("echo", message="hi"))["status"] == "completed"
        assert (await call("echo", key="retry me: once", message="hi"))["status"] == "completed"
        # Handed off (a job, its stream entry, its indexes), followed to the end by an SSE client and a
        # worker, whose webhook fails and is dead-lettered.
        handed = await call("slow", timeout_s=0.2, seconds=1)
        events = await sse_events(http, running.url + handed["events_url"])
        assert events[-1][0] == "completed"
        cancelled = await call("slow", timeout_s=0.2, seconds=30)
        async with http.delete(f"{running.url}/v1/jobs/{cancelled['job_id']}") as response:
            assert response.status == 200
        # An MCP client session (its record outlives the server session).
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "keys", "version": "0"}}
        message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}
        async with http.post(f"{base}/mcp", json=message, headers={"Accept": "application/json"}) as response:
            assert response.status == 200
            assert "Mcp-Session-Id" in response.headers
        secret = {"VAULT_TOKEN": "t0k3n"}
        async with http.put(f"{running.url}/v1/users/alice/servers/vault/secrets", json=secret) as response:
            assert response.status == 204
        assert (await get_json(http, f"{running.url}/v1/jobs/{handed['job_id']}"))["status"] == "completed"

        async def dead_lettered() -> bool:
            return bool(await running.router.store.dead_letter_count())

        await wait_until(dead_lettered, timeout=60)

    used, channels, patterns = await _checked(redis_server.url, commands)
    assert channels, "no job event was published"
    assert all(redis_keys.name_of(c) == redis_keys.name_of(redis_keys.job_events("x")) for c in channels), channels
    assert patterns == {redis_keys.JOB_EVENTS_PATTERN}
    # The run was representative: every name but the account flows' was used.
    wanted = set(redis_keys.NAMES) - ACCOUNT_NAMES
    assert used - ACCOUNT_NAMES == wanted, [n.template for n in wanted if n not in used]


async def test_every_key_the_account_flows_write_is_one_of_pier_s_names(http, redis_server, tmp_path, monkeypatch):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    idp_secret, upstream_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    monkeypatch.setenv(UPSTREAM_SECRET_ENV, upstream_secret)
    idp_client = router_client(base, idp_secret, "refresh_token", EXCHANGE_GRANT)
    async with (
        OpenIdProvider(tmp_path / "idp", clients=[idp_client]) as idp,
        # Upstream tokens live 4 s: due for a refresh from 2 s on.
        OpenIdProvider(tmp_path / "upstream", clients=[upstream_client(f"{base}/v1/oauth/callback", upstream_secret)],
                       access_ttl=4) as upstream,
    ):  # fmt: skip
        demo = demo_profile().model_dump()
        catalog = Catalog([
            Profile.model_validate({**demo, "upstream_oauth": upstream_oauth(upstream.issuer, env="UPSTREAM_TOKEN")}),
            Profile.model_validate({**demo, "name": "partner", "token_exchange": {"audience": "https://partner.test",
                                                                       "env": "PARTNER_TOKEN"}}),
        ])  # fmt: skip
        async with (
            monitored(redis_server.url) as commands,
            router_app(
                redis_server.url, catalog, port=port, public_url=base, oidc_issuer=idp.issuer, oidc_scopes=["mcp"],
                oidc_client_id="pier-router", oidc_client_secret=idp_secret, app_keys=["app-key"],
                secrets_key=base64.b64encode(os.urandom(32)).decode(), reap_interval_s=60,
            ),
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser,
        ):  # fmt: skip
            # Alice signs in to the portal (its session), and tries a partner tool there (her token exchanged).
            page = await authorize(browser, f"{base}/portal/login", "alice")
            assert page.status == 200
            assert page.url.path == "/portal"
            csrf = re.search(r"name='csrf' value='([^']+)'", await page.text())
            assert csrf is not None
            form = {"csrf": csrf.group(1), "tool": "echo", "arguments": '{"message": "hi"}'}
            async with browser.post(f"{base}/portal/servers/partner/call", data=form, headers={"Origin": base}) as r:
                assert r.status == 200
                assert "Echo: hi" in await r.text()
            # She connects her upstream account (an authorization in flight, then her connection) …
            page = await authorize(browser, f"{base}/v1/me/servers/demo/connect", "alice", {"Accept": "text/html"})
            assert page.status == 200
            # … whose token an app's call on her behalf finds due and refreshes (under its lock).
            await asyncio.sleep(2.5)
            call = f"{base}/v1/users/alice/servers/demo/tools/echo/call"
            async with http.post(call, json={"arguments": {"message": "hi"}}, headers={"X-API-Key": "app-key"}) as r:
                assert r.status == 200, await r.text()
            assert (await upstream.stats())["grants"].get("refresh_token") == 1

    used, _, _ = await _checked(redis_server.url, commands)
    assert used >= ACCOUNT_NAMES, [n.template for n in ACCOUNT_NAMES if n not in used]


@pytest.mark.unit
def test_each_name_is_written_as_its_template_says() -> None:
    written = {
        redis_keys.job("5f0c2a"): "pier:job:{job_id}",
        redis_keys.job_events("5f0c2a"): "pier:job:{job_id}:events",
        redis_keys.STREAM: "pier:jobs",
        redis_keys.RECENT_JOBS: "pier:jobs:recent",
        redis_keys.user_jobs("alice@example.com", "github"): "pier:jobs:user:{user}:{server}",
        redis_keys.idempotency("alice", "demo", "any key: even with colons"): "pier:idem:{user}:{server}:{key}",
        redis_keys.DEAD_LETTERS: "pier:webhooks:dead",
        redis_keys.SESSIONS_WANTED: "pier:sessions:wanted",
        redis_keys.rate_limit("alice", 29_000_000): "pier:rl:{user}:{minute}",
        redis_keys.user_secrets("alice", "github"): "pier:secrets:{user}:{profile}",
        redis_keys.mcp_session("9b1f0c2e4d6a8b0c"): "pier:mcp:{session_id}",
        redis_keys.oauth_flow("Zr2_Q8tA-7xvP0qLmN3bC5dE9fG1hJ4kW6sYuT0oIaB"): "pier:oauth:flow:{state}",
        redis_keys.connection("alice", "github"): "pier:oauth:conn:{user}:{profile}",
        redis_keys.connection_lock("alice", "github"): "pier:oauth:lock:{user}:{profile}",
        redis_keys.exchanged("alice", "github"): "pier:oauth:exchanged:{user}:{profile}",
        redis_keys.portal_session("0" * 64): "pier:portal:{digest}",
    }
    for key, template in written.items():
        found = redis_keys.name_of(key)
        assert found is not None, key
        assert found.template == template, key
    assert {n.template for n in redis_keys.NAMES} == set(written.values())
    assert all(n.template.startswith(redis_keys.PREFIX) for n in redis_keys.NAMES)
    assert redis_keys.job_of_events(redis_keys.job_events("5f0c2a")) == "5f0c2a"
    for stranger in (
        "pier:job:", "pier:jobs:user:alice", "other:job:1", "pier:rl:alice:soon", "pier:secrets:a:B", "pier:mcp:a/b",
    ):  # fmt: skip
        assert redis_keys.name_of(stranger) is None, stranger
