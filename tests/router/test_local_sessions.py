"""The router with local sessions, against real Redis and real MCP servers."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from mcp import Client

from pier.core.catalog import Catalog, demo_profile
from pier.router.app import create_app
from pier.router.backends.local.runtimes import LocalSession, ProcessSession
from pier.router.config import RouterSettings
from pier.router.state import ROUTER
from tests.servers import get_json, router_app, scrape, text_of, wait_until


async def _call(http, url: str, tool: str, headers: dict | None = None, **arguments) -> tuple[int, dict]:
    async with http.post(f"{url}/tools/{tool}/call", json={"arguments": arguments}, headers=headers or {}) as r:
        return r.status, await r.json()


def _count(body: dict) -> int:
    return body["result"]["structuredContent"]["result"]


@pytest.mark.slow  # a load test
async def test_fifty_users_twenty_calls_each_then_all_reaped(http, redis_server):
    # A TTL longer than any pause between a user's calls on a loaded machine; shortened once all are done.
    # The deadline counts from each request's arrival, fifty server starts included: on two busy cores
    # the default 25 s can pass and hand calls off (202), which this test of isolation does not look at.
    async with router_app(redis_server.url, session_ttl_s=300, reap_interval_s=0.25, call_timeout_s=120) as running:
        router = running.router

        async def user(n: int) -> list[int]:
            url = running.user_url(f"user-{n}")
            results = await asyncio.gather(*(_call(http, url, "counter") for _ in range(20)))
            assert all(status == 200 for status, _ in results), results
            _, count = await _call(http, url, "count")
            return [*sorted(_count(body) for _, body in results), _count(count)]

        counts = await asyncio.gather(*(user(n) for n in range(50)))
        for per_user in counts:
            # Each user's own server saw exactly its own 20 executions: 1..20, then count() == 20.
            assert per_user == [*range(1, 21), 20]
        assert (await scrape(http, running.url)).value("pier_router_sessions_started_total", profile="demo") == 50
        router.settings.session_ttl_s = 1
        await wait_until(lambda: not router.backend.list(), timeout=60)
        reaped = (await scrape(http, running.url)).value("pier_router_sessions_reaped_total", reason="idle")
        assert reaped == 50


async def test_concurrent_first_requests_start_one_session(http, redis_server):
    async with router_app(redis_server.url) as running:
        url = running.user_url("newcomer")
        results = await asyncio.gather(*(_call(http, url, "echo", message=str(i)) for i in range(20)))
        assert [body["result"]["content"][0]["text"] for _, body in results] == [f"Echo: {i}" for i in range(20)]
        assert (await scrape(http, running.url)).value("pier_router_sessions_started_total", profile="demo") == 1
        assert len(running.router.backend.list("newcomer")) == 1


async def test_keys_tenants_and_rate_limits(http, redis_server):
    async with router_app(
        redis_server.url,
        app_keys=["app-secret"],
        user_keys={"alice-secret": "alice"},
        rate_limit_user_per_min=3,
    ) as running:
        alice = running.user_url("alice")
        bob = running.user_url("bob")
        assert (await _call(http, alice, "echo", message="x"))[0] == 401
        status, body = await _call(http, alice, "echo", {"Authorization": "Bearer wrong"}, message="x")
        assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")
        status, body = await _call(http, bob, "echo", {"Authorization": "Bearer alice-secret"}, message="x")
        assert (status, body["error"]["code"]) == (403, "FORBIDDEN")
        async with http.get(f"{running.url}/v1/users/bob/sessions", headers={"X-API-Key": "alice-secret"}) as r:
            assert r.status == 403
        # The app key may act for anyone.
        assert (await _call(http, bob, "echo", {"X-API-Key": "app-secret"}, message="x"))[0] == 200
        assert not running.router.backend.list("alice")  # nothing was started for refused calls

        # Seven requests against a limit of three a minute: even across a minute boundary one is refused.
        refused = None
        for _ in range(7):
            async with http.post(
                f"{alice}/tools/echo/call", json={"arguments": {"message": "x"}}, headers={"X-API-Key": "alice-secret"}
            ) as r:
                if r.status == 429:
                    refused = (int(r.headers["Retry-After"]), (await r.json())["error"]["code"])
        assert refused is not None
        assert 1 <= refused[0] <= 60
        assert refused[1] == "RATE_LIMITED"


async def test_bad_requests_get_documented_errors_and_the_router_keeps_serving(http, redis_server):
    async with router_app(redis_server.url, max_body_bytes=4096) as running:
        alice = running.user_url("alice")
        cases = [
            ("POST", f"{running.url}/v1/users/alice/servers/nope/tools/echo/call", {"arguments": {}}, 404,
             "UNKNOWN_SERVER"),
            ("POST", f"{alice}/tools/nope/call", {"arguments": {}}, 404, "UNKNOWN_TOOL"),
            ("POST", f"{alice}/tools/echo/call", {"arguments": {"message": 5}}, 422, "INVALID_ARGUMENTS"),
            ("POST", f"{alice}/tools/echo/call", {"arguments": "not an object"}, 422, "INVALID_ARGUMENTS"),
            ("POST", f"{alice}/tools/echo/call", {"arguments": {"message": "x" * 5000}}, 413, "PAYLOAD_TOO_LARGE"),
            ("POST", f"{running.url}/v1/users/bad%20user/servers/demo/tools/echo/call", {}, 400, "BAD_REQUEST"),
            ("GET", f"{running.url}/v1/jobs/nope", None, 404, "JOB_NOT_FOUND"),
        ]  # fmt: skip
        for method, url, body, status, code in cases:
            async with http.request(method, url, json=body) as r:
                got = await r.json()
                assert (r.status, got["error"]["code"]) == (status, code), url
        async with http.post(
            f"{alice}/tools/echo/call", data=b"{oops", headers={"Content-Type": "application/json"}
        ) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "BAD_REQUEST")
        status, body = await _call(http, alice, "echo", message="still fine")
        assert (status, body["result"]["content"][0]["text"]) == (200, "Echo: still fine")
        status, body = await _call(http, alice, "fail", message="tool says no")
        assert (status, body["result"]["isError"]) == (200, True)


async def _bridge_status(http, running, user: str) -> dict:
    [session] = running.router.backend.list(user)
    async with http.get(f"{session.endpoint.url}/v1/status", headers=session.endpoint.headers()) as r:
        return await r.json()


async def _kill_server_mid_call(http, running, user: str) -> None:
    """SIGKILL the user's server once it is running a call (the bridge says so)."""

    async def running_a_call() -> bool:
        return (await _bridge_status(http, running, user))["in_flight"] == 1

    await wait_until(running_a_call)
    os.kill((await _bridge_status(http, running, user))["pid"], signal.SIGKILL)


# The bridge in its own process: a fault test (`slow`); in the router's process (the default): in the fast loop.
@pytest.mark.parametrize("bridges", ["inprocess", pytest.param("process", marks=pytest.mark.slow)])
async def test_killed_server_fails_unsafe_calls_and_retries_read_only_ones(http, redis_server, bridges):
    async with router_app(redis_server.url, local_bridges=bridges) as running:
        alice = running.user_url("alice")
        assert (await _call(http, alice, "count"))[0] == 200
        unsafe = asyncio.create_task(_call(http, alice, "counter", delay_s=30))
        await _kill_server_mid_call(http, running, "alice")
        status, body = await unsafe
        assert (status, body["error"]["code"]) == (502, "SERVER_EXITED")
        assert body["error"]["details"]["retried"] is False

        safe = asyncio.create_task(_call(http, alice, "slow", seconds=2))
        await _kill_server_mid_call(http, running, "alice")
        status, body = await safe
        assert (status, body["result"]["content"][0]["text"]) == (200, "Slept 2.0 seconds")
        assert (await scrape(http, running.url)).value("pier_router_call_retries_total", profile="demo") == 1


@pytest.mark.slow  # a fault test
async def test_a_dead_session_is_restarted_on_the_next_request(http, redis_server):
    # Process mode: the bridge process itself is killed.
    async with router_app(redis_server.url, local_bridges="process") as running:
        alice = running.user_url("alice")
        assert _count((await _call(http, alice, "counter"))[1]) == 1
        [session] = running.router.backend.list("alice")
        assert isinstance(session, ProcessSession)
        session.proc.kill()
        await session.proc.wait()
        status, body = await _call(http, alice, "counter")
        assert (status, _count(body)) == (200, 1)  # a fresh server
        assert (await scrape(http, running.url)).value("pier_router_sessions_started_total", profile="demo") == 2


@pytest.mark.parametrize("bridges", ["inprocess", pytest.param("process", marks=pytest.mark.slow)])  # as above
async def test_a_bridge_that_gave_up_is_replaced_on_the_next_request(http, redis_server, bridges):
    # A server that keeps crashing: its bridge gives up after one restart (a bridge setting in the profile).
    env = {"PIER_SIDECAR_MAX_RESTARTS": "1", "PIER_SIDECAR_RESTART_BACKOFF_INITIAL_S": "0.01"}
    catalog = Catalog([demo_profile().model_copy(update={"env": env})])
    async with router_app(redis_server.url, catalog, local_bridges=bridges, max_retries=0) as running:
        alice = running.user_url("alice")
        assert _count((await _call(http, alice, "counter"))[1]) == 1
        [session] = running.router.backend.list("alice")
        assert isinstance(session, LocalSession)
        for _ in range(2):
            status, body = await _call(http, alice, "crash")
            assert (status, body["error"]["code"]) == (502, "SERVER_EXITED")
        await wait_until(lambda: session.exited)
        status, body = await _call(http, alice, "counter")
        assert (status, _count(body)) == (200, 1)  # a fresh bridge, a fresh server
        assert (await scrape(http, running.url)).value("pier_router_sessions_started_total", profile="demo") == 2


async def test_pool_limit_evicts_the_least_recently_used_idle_session(http, redis_server):
    async with router_app(redis_server.url, max_sessions=2) as running:
        await _call(http, running.user_url("a"), "echo", message="a")
        await _call(http, running.user_url("b"), "echo", message="b")
        await _call(http, running.user_url("a"), "echo", message="a again")  # b is now the LRU
        assert (await _call(http, running.user_url("c"), "echo", message="c"))[0] == 200
        assert sorted(s.key.user for s in running.router.backend.list()) == ["a", "c"]

        busy = [asyncio.create_task(_call(http, running.user_url(u), "slow", seconds=3)) for u in ("a", "c")]
        await wait_until(lambda: all(s.in_flight for s in running.router.backend.list()))
        status, body = await _call(http, running.user_url("d"), "echo", message="d")
        assert (status, body["error"]["code"]) == (503, "SESSION_CAPACITY")
        await asyncio.gather(*busy)


async def test_sessions_can_be_listed_and_ended(http, redis_server):
    async with router_app(redis_server.url) as running:
        await _call(http, running.user_url("alice"), "echo", message="x")
        body = await get_json(http, f"{running.url}/v1/users/alice/sessions")
        assert [(s["user"], s["server"], s["state"]) for s in body["sessions"]] == [("alice", "demo", "ready")]
        async with http.delete(running.user_url("alice")) as r:
            assert r.status == 204
        async with http.delete(running.user_url("alice")) as r:
            assert r.status == 404
        assert (await get_json(http, f"{running.url}/v1/users/alice/sessions"))["sessions"] == []


async def test_idempotency_key_never_runs_a_call_twice(http, redis_server):
    async with router_app(redis_server.url) as running:
        alice = running.user_url("alice")
        headers = {"Idempotency-Key": "order-42"}
        first, again = await asyncio.gather(
            _call(http, alice, "counter", headers, delay_s=0.5), _call(http, alice, "counter", headers, delay_s=0.5)
        )
        assert first[0] == again[0] == 200
        assert _count(first[1]) == _count(again[1]) == 1
        assert _count((await _call(http, alice, "count"))[1]) == 1


async def test_mcp_relay_with_a_real_client(redis_server):
    async with router_app(redis_server.url) as running, Client(f"{running.user_url('alice')}/mcp") as client:
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} >= {"echo", "counter"}
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        result = await client.call_tool("slow", {"seconds": 0.3}, progress_callback=on_progress)
        assert text_of(result) == "Slept 0.3 seconds"
        assert seen == [1.0, 2.0, 3.0]


async def test_servers_health_and_metrics(http, redis_server):
    async with router_app(redis_server.url) as running:
        servers = await get_json(http, f"{running.url}/v1/servers")
        assert {s["name"] for s in servers["servers"]} == {"demo", "everything"}
        assert "command" not in servers["servers"][0]
        await _call(http, running.user_url("alice"), "echo", message="x")
        async with http.get(f"{running.url}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{running.url}/metrics") as r:
            text = await r.text()
        assert 'pier_router_calls_total{outcome="completed",profile="demo"} 1.0' in text
        assert 'pier_router_sessions_active{profile="demo"} 1.0' in text
        assert "pier_router_call_duration_seconds_bucket" in text


@pytest.mark.parametrize("bridges", ["inprocess", "process"])
async def test_a_server_gets_the_profile_environment_and_none_of_the_routers_settings(
    http, redis_server, bridges, monkeypatch
):
    monkeypatch.setenv("PIER_ROUTER_ONLY_SECRET", "router-secret")
    monkeypatch.setenv("HOST_VARIABLE", "kept")
    # The server prints its environment on stderr (the bridge keeps its tail), then runs the demo.
    command = ["sh", "-c", 'env >&2; exec "$@"', "sh", *demo_profile().command]
    profile = demo_profile().model_copy(update={"command": command, "env": {"FROM_PROFILE": "yes"}})
    async with router_app(redis_server.url, Catalog([profile]), local_bridges=bridges) as running:
        assert (await _call(http, running.user_url("alice"), "echo", message="x"))[0] == 200
        [session] = running.router.backend.list("alice")
        async with http.get(f"{session.endpoint.url}/v1/logs", headers=session.endpoint.headers()) as response:
            lines = (await response.json())["lines"]
    names = {line.split("=", 1)[0] for line in lines if "=" in line}
    assert {"FROM_PROFILE", "HOST_VARIABLE"} <= names
    assert not [name for name in names if name.startswith("PIER_")]  # neither the router's nor the bridge's


async def test_a_start_that_fails_half_way_closes_what_it_opened(redis_server, tmp_path):
    # The Kubernetes backend cannot start without its kubeconfig; the HTTP pool and Redis were open by then.
    settings = RouterSettings(redis_url=redis_server.url, backend="kubernetes", kubeconfig=tmp_path / "missing")
    app = create_app(settings, Catalog([demo_profile()]))
    runner = web.AppRunner(app)
    with pytest.raises(Exception, match="kube-config"):
        await runner.setup()
    await runner.cleanup()
    router = app[ROUTER]
    assert router.http.closed
    observer = aioredis.from_url(redis_server.url)
    try:
        # Only the observer's own connection is left: the router's pool and event subscription are closed.
        await wait_until(lambda: _clients(observer, 1))
    finally:
        await observer.aclose()


async def _clients(client: aioredis.Redis, count: int) -> bool:
    return len(await client.client_list()) == count
