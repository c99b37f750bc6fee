"""Real MCP clients through the router's relay (issue #26), each as a new user would use it: pydantic-ai's
MCP toolset with `use_task=True` (tasks through FastMCP's tasks client), FastMCP's own client and its
task handle, and the `mcp` SDK's client — all of which negotiate 2026-07-28 by default."""

from __future__ import annotations

import fastmcp
from fastmcp_tasks.client import call_tool_task
from mcp import Client
from pydantic_ai.mcp import MCPToolset

from pier.core.catalog import Catalog, demo_profile
from tests.servers import router_app, worker_processes


async def test_real_clients_run_tools_and_tasks_through_the_relay(http, redis_server):
    # The demo profile runs `slow` as a task for a caller that takes tasks (task_support).
    async with router_app(redis_server.url, Catalog([demo_profile()])) as running, worker_processes(redis_server.url):
        url = running.user_url("alice") + "/mcp"

        toolset = MCPToolset(url)
        async with toolset:
            # use_task=True asks for a task and waits for its result (it refuses a plain result).
            assert await toolset.direct_call_tool("slow", {"seconds": 0.2}, use_task=True) == "Slept 0.2 seconds"
            assert await toolset.direct_call_tool("echo", {"message": "plain"}) == "Echo: plain"

        async with fastmcp.Client(url) as client:
            task = await call_tool_task(client, "slow", {"seconds": 0.2})
            # The task is a job of Pier's: REST sees it too.
            async with http.get(f"{running.url}/v1/jobs/{task.task_id}") as response:
                assert (await response.json())["tool"] == "slow"
            result = await task.result()
            assert result.content[0].text == "Slept 0.2 seconds"  # type: ignore[union-attr]
            # An ordinary call of a tool run as a task: the client polls the task to its end by itself.
            transparent = await client.call_tool("slow", {"seconds": 0.1})
            assert transparent.content[0].text == "Slept 0.1 seconds"

        async with Client(url) as sdk:
            echoed = await sdk.call_tool("echo", {"message": "sdk"})
            assert echoed.content[0].text == "Echo: sdk"  # type: ignore[union-attr]
