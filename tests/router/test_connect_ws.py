"""`pier connect` (stdio for desktop agents) and the WebSocket endpoint, with real clients."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import aiohttp
import pytest
from mcp import Client, StdioServerParameters

from pier.cli.redis_server import free_port
from tests.hooks import PolicyServer
from tests.servers import router_app, text_of

KEY = "connect-app-key"


async def test_pier_connect_serves_a_remote_session_and_survives_a_router_restart(redis_server):
    port = free_port()
    routers = contextlib.AsyncExitStack()
    running = await routers.enter_async_context(router_app(redis_server.url, port=port, app_keys=[KEY]))
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "pier.cli", "connect", f"{running.user_url('alice')}/mcp"],
        env={**os.environ, "PIER_CONNECT_TOKEN": KEY},  # the key stays out of the process arguments
    )
    try:
        async with Client(server, mode="legacy") as client:
            tools = await client.list_tools()
            assert {t.name for t in tools.tools} >= {"echo", "counter"}
            assert text_of(await client.call_tool("echo", {"message": "one"})) == "Echo: one"
            seen: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen.append(progress)

            await client.call_tool("slow", {"seconds": 0.2}, progress_callback=on_progress)
            assert seen == [1.0, 2.0]

            # The router goes away, its sessions with it, and comes back on the same address.
            await routers.aclose()
            async with router_app(redis_server.url, port=port, app_keys=[KEY]):
                result = await client.call_tool("echo", {"message": "after the restart"})
                assert text_of(result) == "Echo: after the restart"
    finally:
        await routers.aclose()


async def test_websocket_round_trips_tools_call(http, redis_server):
    async with (
        PolicyServer() as policy,
        router_app(redis_server.url, app_keys=[KEY], policy_url=policy.url) as running,
    ):
        url = running.user_url("alice").replace("http://", "ws://") + "/ws"
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:

            async def ask(message: dict) -> dict:
                await ws.send_str(json.dumps(message))
                while True:
                    answer = json.loads((await ws.receive()).data)
                    if answer.get("id") == message["id"]:
                        return answer

            init = await ask(
                {
                    "jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "ws"}},
                }
            )  # fmt: skip
            assert init["result"]["serverInfo"]["name"] == "pier-demo"
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            call = {"name": "echo", "arguments": {"message": "over a websocket"}}
            echoed = await ask({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
            assert echoed["result"]["content"][0]["text"] == "Echo: over a websocket"
            denied = await ask({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "counter"}})
            assert denied["error"]["data"]["code"] == "POLICY_DENIED"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(url):  # no key
                pass
        assert refused.value.status == 401
