"""A client's MCP session (2025-03-26 … 2025-11-25) outlives the user's server session: reaped, evicted,
deleted, its bridge process killed, the router restarted, another replica answering — the next request
recreates it under the same `Mcp-Session-Id` and is answered. Real clients: the `mcp` SDK and the
TypeScript SDK (`sdk_client.mjs`). 404 only for ids never issued, expired, or ended by the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis

from pier.cli.redis_server import free_port
from pier.core import redis_keys
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.router.backends.local.runtimes import ProcessSession
from tests.mcp_clients import PyClient, TsClient, connect, counted
from tests.servers import EVERYTHING, PIER, ROOT, RunningRouter, get_json, router_app, scrape, wait_until

INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
JSON_AND_SSE = {"Accept": "application/json, text/event-stream"}


async def _post(http, url: str, message: dict, session: str | None = None) -> tuple[int, dict, dict[str, str]]:
    headers = {**JSON_AND_SSE, "MCP-Protocol-Version": "2025-11-25", **({"Mcp-Session-Id": session} if session else {})}
    async with http.post(url, json=message, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body, dict(response.headers)


async def _sessions_of(http, running: RunningRouter, user: str) -> list[dict]:
    sessions: list[dict] = (await get_json(http, f"{running.url}/v1/users/{user}/sessions"))["sessions"]
    return sessions


async def _gone(http, running: RunningRouter, user: str) -> bool:
    return not await _sessions_of(http, running, user)


Event = Callable[[aiohttp.ClientSession, RunningRouter], Awaitable[None]]


async def _reaped(http, running: RunningRouter) -> None:
    running.router.settings.session_ttl_s = 0.01  # idle now: the next reaper round ends it
    await wait_until(lambda: _gone(http, running, "alice"))
    running.router.settings.session_ttl_s = 3600


async def _evicted(http, running: RunningRouter) -> None:
    # One session at most: bob's first call needs alice's idle one's room.
    async with http.post(f"{running.user_url('bob')}/tools/echo/call", json={"arguments": {"message": "b"}}) as r:
        assert r.status == 200
    assert await _gone(http, running, "alice")


async def _deleted(http, running: RunningRouter) -> None:
    async with http.delete(running.user_url("alice")) as response:
        assert response.status == 204


async def _bridge_killed(http, running: RunningRouter) -> None:
    [session] = running.router.backend.list("alice")
    assert isinstance(session, ProcessSession)
    session.proc.kill()
    await session.proc.wait()


async def _walk(http, running: RunningRouter, client: TsClient | PyClient, events: list[Event]) -> None:
    """After each event the next call starts a fresh server under the same MCP session (its counter at 1)."""
    assert counted(await client.call("counter")) == 1
    assert counted(await client.call("counter")) == 2
    for event in events:
        await event(http, running)
        assert counted(await client.call("counter")) == 1, event.__name__
        assert await client.call("echo", message=event.__name__) == f"Echo: {event.__name__}"
    resumed = (await scrape(http, running.url)).value("pier_router_mcp_sessions_resumed_total", profile="demo")
    assert resumed == len(events)


CLIENTS = ["python", "typescript"]
# The TypeScript SDK's runs are a node process each: in the full run (`slow`), the mcp SDK's in the inner loop too.
FAST_CLIENTS = ["python", pytest.param("typescript", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", FAST_CLIENTS)
async def test_an_mcp_session_outlives_reaping_eviction_and_deletion_of_its_server_session(http, redis_server, kind):
    async with router_app(redis_server.url, max_sessions=1, reap_interval_s=0.05) as running:
        url = running.user_url("alice") + "/mcp"
        async with connect(kind, url) as client:
            await _walk(http, running, client, [_reaped, _evicted, _deleted])
            session = client.session
        # Its client ended it (a DELETE): gone for good.
        status, body, _ = await _post(http, url, {"jsonrpc": "2.0", "id": 1, "method": "ping"}, session)
        assert (status, body["error"]["message"]) == (404, "Session not found: initialize a new session")
        async with redis_client(redis_server.url) as redis:
            assert not await redis.exists(redis_keys.mcp_session(session))


@pytest.mark.slow  # a fault test: the bridge in its own process, killed
@pytest.mark.parametrize("kind", CLIENTS)
async def test_an_mcp_session_outlives_its_killed_bridge_process(http, redis_server, kind):
    async with (
        router_app(redis_server.url, local_bridges="process") as running,
        connect(kind, running.user_url("alice") + "/mcp") as client,
    ):
        await _walk(http, running, client, [_bridge_killed, _deleted])


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def router_process(redis_url: str, port: int) -> AsyncIterator[str]:
    """`pier router` as a process of its own on `port` (local sessions, the demo profile); yields its URL."""
    demo = demo_profile()
    env = {
        **os.environ, "PIER_PORT": str(port), "PIER_REDIS_URL": redis_url,
        "PIER_PROFILES_INLINE": json.dumps({"profiles": {"demo": {"command": demo.command}}}),
        "PIER_LOCAL_SANDBOX_PATHS": json.dumps([str(ROOT)]),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*PIER, "router", env=env, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    return (await get_json(http, f"{url}/healthz"))["status"] == "ok"
                return False

            await wait_until(up, timeout=60)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@pytest.mark.slow  # router processes, restarted
async def test_an_mcp_session_outlives_a_router_restart_and_any_replica_serves_it(http, redis_server):
    port = free_port()

    def mcp_url(base: str, user: str) -> str:
        return f"{base}/v1/users/{user}/servers/demo/mcp"

    async with contextlib.AsyncExitStack() as clients:
        async with router_process(redis_server.url, port) as first:
            py = await clients.enter_async_context(PyClient.connect(mcp_url(first, "alice")))
            ts = await clients.enter_async_context(TsClient.connect(mcp_url(first, "bob")))
            for client in (py, ts):
                assert counted(await client.call("counter")) == 1
                assert counted(await client.call("counter")) == 2
        # The router is restarted (a new process at the same address); its sessions ended with the old one.
        async with (
            router_process(redis_server.url, port),
            router_process(redis_server.url, free_port()) as other,
        ):
            for client in (py, ts):
                assert counted(await client.call("counter")) == 1  # a fresh server, the same MCP session
            # Another replica on the same Redis serves bob's session too: the SDK joins it there by its id.
            async with TsClient.connect(mcp_url(other, "bob"), ts.session) as elsewhere:
                assert await elsewhere.call("echo", message="replica") == "Echo: replica"
            assert await ts.call("echo", message="back") == "Echo: back"
            assert await py.call("echo", message="still") == "Echo: still"
            resumed = (await scrape(http, other)).value("pier_router_mcp_sessions_resumed_total", profile="demo")
            assert resumed == 1
        assert py.session  # one MCP session all along (it raises if there were two)


async def _initialize(http, url: str, version: str = "2025-11-25") -> str:
    params = {**INIT, "protocolVersion": version}
    status, body, headers = await _post(
        http, url, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    )
    assert status == 200
    assert "result" in body, body
    return str(headers["Mcp-Session-Id"])


async def _ping(http, url: str, session: str) -> int:
    status, body, _ = await _post(http, url, {"jsonrpc": "2.0", "id": 7, "method": "ping"}, session)
    if status == 404:
        assert body == {
            "jsonrpc": "2.0",
            "id": 7,
            "error": {"code": -32600, "message": "Session not found: initialize a new session"},
        }
    return status


async def test_only_ids_never_issued_someone_elses_or_ended_by_their_client_get_404(http, redis_server):
    catalog = Catalog([demo_profile(), demo_profile().model_copy(update={"name": "other"})])
    async with router_app(redis_server.url, catalog) as running:
        alice = running.user_url("alice") + "/mcp"
        session = await _initialize(http, alice, "2024-11-05")  # answered with a revision Pier serves
        async with redis_client(redis_server.url) as redis:
            record = await redis.hgetall(redis_keys.mcp_session(session))
        assert (record[b"user"], record[b"profile"]) == (b"alice", b"demo")
        assert json.loads(record[b"init"]) == {**INIT, "protocolVersion": "2025-11-25"}  # what it speaks
        assert await _ping(http, alice, session) == 200
        for stranger in ("0" * 32, "not a session id", "x" * 129, "../pier:job:1"):
            assert await _ping(http, alice, stranger) == 404, stranger
        # Bound to its user and profile, wherever the server session is.
        await _deleted(http, running)
        assert await _ping(http, running.user_url("bob") + "/mcp", session) == 404
        assert await _ping(http, running.user_url("alice", "other") + "/mcp", session) == 404
        assert await _ping(http, alice, session) == 200  # still alice's
        # Her client ends it while her server session is gone: no session is started just to say so.
        await _deleted(http, running)
        headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        async with http.delete(alice, headers=headers) as response:
            assert response.status == 204
        assert "demo" not in [s["server"] for s in await _sessions_of(http, running, "alice")]
        async with http.delete(alice, headers=headers) as response:
            assert response.status == 404
        assert await _ping(http, alice, session) == 404
        # Ended on a running session: the bridge forgets it too.
        session = await _initialize(http, alice)
        async with http.delete(alice, headers={**headers, "Mcp-Session-Id": session}) as response:
            assert response.status == 204
        assert await _ping(http, alice, session) == 404


async def test_an_idle_mcp_session_expires_by_its_own_ttl(http, redis_server):
    async with router_app(redis_server.url, mcp_session_ttl_s=1) as running, redis_client(redis_server.url) as redis:
        alice = running.user_url("alice") + "/mcp"
        session = await _initialize(http, alice)
        assert await redis.ttl(redis_keys.mcp_session(session)) == 1
        await wait_until(lambda: _expired(redis, session))
        assert await _ping(http, alice, session) == 200  # its bridge still has it: nothing to recreate
        await _deleted(http, running)
        assert await _ping(http, alice, session) == 404  # nothing to recreate it from


async def _expired(redis: aioredis.Redis, session: str) -> bool:
    return not await redis.exists(redis_keys.mcp_session(session))


@pytest.mark.slow  # server-everything and the TypeScript SDK, each a node process
async def test_a_recreated_mcp_session_gets_its_subscriptions_and_log_level_back(http, redis_server):
    # The TypeScript SDK subscribes to a resource of server-everything and sets its log level; its server
    # session ends; the new one is told both again before it answers, as the client told the first.
    uri = "demo://resource/static/document/features.md"
    catalog = Catalog([Profile(name="everything", command=EVERYTHING)])
    async with (
        router_app(redis_server.url, catalog) as running,
        TsClient.connect(running.user_url("alice", "everything") + "/mcp") as ts,
    ):
        assert (await ts.do("subscribe", uri=uri))["ok"]
        assert (await ts.do("level", level="error"))["ok"]
        for op in ("subscribe", "unsubscribe"):
            assert (await ts.do(op, uri="demo://resource/static/document/architecture.md"))["ok"]
        async with http.delete(running.user_url("alice", "everything")) as response:
            assert response.status == 204
        # The new server session sends updates for what it was told this session subscribed to.
        assert "Started simulated resource updated" in await ts.call("toggle-subscriber-updates")

        async def updated() -> bool:
            return uri in (await ts.do("updates"))["updates"]

        await wait_until(updated, timeout=30)
        [session] = running.router.backend.list("alice")
        metrics = await scrape(http, session.endpoint.url)
        assert metrics.value("pier_bridge_requests_total", method="logging/setLevel", outcome="ok") == 1
        assert metrics.value("pier_bridge_requests_total", method="resources/subscribe", outcome="ok") == 1
        assert metrics.value("pier_bridge_requests_total", method="resources/unsubscribe") == 0
