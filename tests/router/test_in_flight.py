"""A session's in-flight count (`GET /v1/users/{user}/sessions`) is exact: a call that ends — answered,
cancelled, abandoned — leaves it at once, whoever looked at the session's bridge before. Read right after the
cancellation is acknowledged (its answer, or the bridge's own word), never after a wait."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.core.protocol import MODERN
from tests.servers import RunningRouter, get_json, router_app, text_of, wait_until

# No reaper round during a test: only what the test does looks at a bridge.
QUIET: dict[str, Any] = {"reap_interval_s": 3600.0}


async def _in_flight(http, running: RunningRouter, user: str = "alice") -> int:
    [session] = (await get_json(http, f"{running.url}/v1/users/{user}/sessions"))["sessions"]
    return int(session["in_flight"])


async def _bridge_in_flight(http, running: RunningRouter, user: str = "alice") -> int:
    """What the session's bridge itself says (its own `/v1/status`); 0 before the session is up."""
    sessions = running.router.backend.list(user)
    if not sessions:
        return 0
    [session] = sessions
    async with http.get(f"{session.endpoint.url}/v1/status", headers=session.endpoint.headers()) as response:
        status = await response.json()
    return int(status["in_flight"] + status["queued"])


async def test_a_cancelled_call_leaves_the_count_at_once_after_the_router_looked_at_its_bridge(http, redis_server):
    # The count once kept the router's last look at the bridge (a reaper round, an eviction's check) until
    # the next one, seconds later: here that look is bob's request for room, while alice's call runs.
    async with router_app(redis_server.url, max_sessions=1, **QUIET) as running:
        alice = running.user_url("alice")
        async with http.post(f"{alice}/tools/echo/call", json={"arguments": {"message": "hi"}}) as response:
            assert response.status == 200  # her session is up: the call below runs in it, handed off
        body = {"arguments": {"seconds": 60}, "timeout_s": 0.2}
        async with http.post(f"{alice}/tools/slow/call", json=body) as response:
            assert response.status == 202
            job = await response.json()
        async with http.post(f"{running.user_url('bob')}/tools/echo/call", json={"arguments": {}}) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (503, "SESSION_CAPACITY")
        assert await _in_flight(http, running) == 1
        async with http.delete(f"{running.url}/v1/jobs/{job['job_id']}") as response:
            assert (response.status, (await response.json())["status"]) == (200, "cancelled")
        assert await _in_flight(http, running) == 0


async def _cancel_a_running_call(http, running: RunningRouter, mcp: Client) -> None:
    """Start a long call, see it counted, then cancel it the SDK's way (at 2025-11-25 it sends
    `notifications/cancelled`; at 2026-07-28 it closes the call's response stream)."""
    call = asyncio.create_task(mcp.call_tool("slow", {"seconds": 60}))
    await wait_until(lambda: _bridge_in_flight(http, running))
    assert await _in_flight(http, running) == 1
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call


def _acknowledged(seen: list[int], http, running: RunningRouter):
    """An httpx response hook: the count, read the moment the router acknowledges a `notifications/cancelled`."""

    async def hook(response: httpx2.Response) -> None:
        if b'"notifications/cancelled"' in response.request.content:
            assert response.status_code == 202
            seen.append(await _in_flight(http, running))

    return hook


@pytest.mark.parametrize("bridges", ["inprocess", pytest.param("process", marks=pytest.mark.slow)])
async def test_an_sdk_client_s_cancelled_call_leaves_the_count_when_the_router_acknowledges_it(
    http, redis_server, bridges
):
    # The `mcp` SDK at 2025-11-25: a cancelled call sends `notifications/cancelled`; its 202 is the moment.
    async with router_app(redis_server.url, local_bridges=bridges, **QUIET) as running:
        seen: list[int] = []
        hooks: dict[str, Any] = {"response": [_acknowledged(seen, http, running)]}
        url = running.user_url("alice") + "/mcp"
        async with (
            httpx2.AsyncClient(event_hooks=hooks, timeout=60) as client,
            Client(streamable_http_client(url, http_client=client), mode="legacy") as mcp,
        ):
            for n in range(3):  # however the router looked at the bridge before
                await _cancel_a_running_call(http, running, mcp)
                await wait_until(lambda n=n: len(seen) == n + 1)
            assert seen == [0, 0, 0]
            assert text_of(await mcp.call_tool("echo", {"message": "after"})) == "Echo: after"


@pytest.mark.parametrize("bridges", ["inprocess", pytest.param("process", marks=pytest.mark.slow)])
async def test_an_abandoned_call_leaves_the_count_as_soon_as_its_bridge_lets_go(http, redis_server, bridges):
    # At 2026-07-28 the SDK abandons a call by closing its response stream: no acknowledgement comes back.
    # The router lets go of the call before it tells the bridge: once the bridge has let go, so has the count.
    async with router_app(redis_server.url, local_bridges=bridges, **QUIET) as running:
        url = running.user_url("alice") + "/mcp"
        async with Client(url, mode=MODERN) as mcp:
            for _ in range(3):
                await _cancel_a_running_call(http, running, mcp)

                async def let_go() -> bool:
                    return await _bridge_in_flight(http, running) == 0

                await wait_until(let_go)
                assert await _in_flight(http, running) == 0
