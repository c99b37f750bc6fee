"""MCP tasks backed by the job pool, through the router's relay: real Redis, the demo server, workers
in their own processes, raw MCP on the wire (the SDK client drives no tasks)."""

from __future__ import annotations

import json

import pytest

from pier.core.catalog import Catalog, demo_profile
from pier.router.backends.local.runtimes import InProcessSession
from tests.mcp_wire import ACCEPT, TASKS, modern_request, post
from tests.servers import get_json, router_app, wait_until, worker_processes

# A short hand-off threshold: a call that takes longer becomes a task.
CATALOG = Catalog([demo_profile().model_copy(update={"call_timeout_s": 0.5})])


async def _started(http, mcp_url: str) -> None:
    """Start the user's session first: the profile's 0.5 s deadline is shorter than its server's start
    (a request that meets a starting session is tests/test_cold_start.py's subject)."""
    async with http.get(mcp_url.removesuffix("/mcp") + "/tools") as response:
        assert response.status == 200


async def _legacy(http, url: str) -> dict[str, str]:
    await _started(http, url)
    params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    async with http.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params},
                         headers=ACCEPT) as response:  # fmt: skip
        body = await response.json()
        # Pier tells handshake-era callers it takes tasks on tools/call.
        assert body["result"]["capabilities"]["tasks"]["requests"] == {"tools": {"call": {}}}
        return {**ACCEPT, "Mcp-Session-Id": response.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}


async def _rpc(http, url: str, headers: dict[str, str], request_id: int, method: str, params: dict) -> dict:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    async with http.post(url, json=message, headers=headers) as response:
        text = await response.text()
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        return next(json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {") and '"id"' in line)
    return json.loads(text)


async def _count(http, base: str) -> int:
    async with http.post(f"{base}/tools/count/call", json={}) as response:
        return (await response.json())["result"]["structuredContent"]["result"]


@pytest.mark.slow  # a fault test: the caller leaves, the router restarts
async def test_a_2025_task_outlives_its_caller_and_router_restarts(http, redis_server):
    async with router_app(redis_server.url, CATALOG) as owner, worker_processes(redis_server.url):
        url = owner.user_url("alice") + "/mcp"
        headers = await _legacy(http, url)
        created = await _rpc(http, url, headers, 1, "tools/call",
                             {"name": "counter", "arguments": {"delay_s": 2}, "task": {"ttl": 60000}})  # fmt: skip
        task = created["result"]["task"]
        assert task["status"] == "working"
        task_id = task["taskId"]
        # The caller goes away (its session too). The task is a job: REST sees it as one.
        async with http.delete(url, headers=headers):
            pass
        job = await get_json(http, f"{owner.url}/v1/jobs/{task_id}")
        assert job["status"] in ("queued", "running")

        # Another router replica, restarted once, answers from Redis (the session that runs the
        # call stays with the router that started it: local sessions live in their router).
        for _ in range(2):
            async with router_app(redis_server.url, CATALOG) as replica:
                other = replica.user_url("alice") + "/mcp"
                fresh = await _legacy(http, other)
                got = await _rpc(http, other, fresh, 2, "tasks/get", {"taskId": task_id})
                assert got["result"]["taskId"] == task_id
                listed = await _rpc(http, other, fresh, 3, "tasks/list", {})
                assert task_id in [t["taskId"] for t in listed["result"]["tasks"]]
        async with router_app(redis_server.url, CATALOG) as restarted:
            other = restarted.user_url("alice") + "/mcp"
            fresh = await _legacy(http, other)
            # Blocks until the task ends, then answers exactly what the call would have.
            result = await _rpc(http, other, fresh, 4, "tasks/result", {"taskId": task_id})
            assert result["result"]["structuredContent"] == {"result": 1}
            assert result["result"]["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task_id}
            # Someone else's task is nobody's business.
            strange = restarted.user_url("mallory") + "/mcp"
            refused = await _rpc(http, strange, await _legacy(http, strange), 5, "tasks/result", {"taskId": task_id})
            assert refused["error"]["code"] == -32602
        # It ran once.
        assert await _count(http, owner.user_url("alice")) == 1


async def test_a_2026_call_that_overruns_becomes_a_task_and_cancelling_it_reaches_the_tool(http, redis_server):
    async with router_app(redis_server.url, CATALOG) as running, worker_processes(redis_server.url):
        url = running.user_url("alice") + "/mcp"
        await _started(http, url)
        # Done within the timeout: a plain answer, even for a caller that takes tasks.
        quick = modern_request(1, "tools/call", {"name": "echo", "arguments": {"message": "hi"}}, TASKS)
        answer = (await post(http, url, quick))[1]["result"]
        assert (answer["resultType"], answer["content"][0]["text"]) == ("complete", "Echo: hi")

        slow = modern_request(2, "tools/call", {"name": "counter", "arguments": {"delay_s": 2}}, TASKS)
        created = (await post(http, url, slow))[1]["result"]
        assert created["resultType"] == "task"
        assert created["status"] == "working"
        task_id = created["taskId"]

        async def final() -> dict | None:
            got = (await post(http, url, modern_request(3, "tasks/get", {"taskId": task_id}, TASKS)))[1]
            return got["result"] if got["result"]["status"] == "completed" else None

        await wait_until(final, timeout=60)
        done = await final()
        assert done is not None
        assert done["result"]["structuredContent"] == {"result": 1}
        # Without the extension, tasks/get is refused (-32021).
        bare = modern_request(4, "tasks/get", {"taskId": task_id})
        status, refused = await post(http, url, bare)
        assert (status, refused["error"]["code"]) == (400, -32021)

        long = modern_request(5, "tools/call", {"name": "slow", "arguments": {"seconds": 60}}, TASKS)
        long_id = (await post(http, url, long))[1]["result"]["taskId"]
        job = await get_json(http, f"{running.url}/v1/jobs/{long_id}")
        assert job["tool"] == "slow"  # the task is a job: REST and MCP see one thing
        ack = (await post(http, url, modern_request(6, "tasks/cancel", {"taskId": long_id}, TASKS)))[1]
        assert ack["result"]["resultType"] == "complete"
        assert not {"taskId", "status", "result", "error"} & ack["result"].keys()  # an empty acknowledgement
        assert ack["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "pier"
        [session] = running.router.backend.list("alice")
        assert isinstance(session, InProcessSession)
        await wait_until(
            lambda: any("slow: cancelled" in line for line in session.app_bridge.upstream.transport.stderr_tail)  # type: ignore[union-attr]
        )
        got = (await post(http, url, modern_request(7, "tasks/get", {"taskId": long_id}, TASKS)))[1]["result"]
        assert got["status"] == "cancelled"
        assert (await get_json(http, f"{running.url}/v1/jobs/{long_id}"))["status"] == "cancelled"
        assert await _count(http, running.user_url("alice")) == 1
