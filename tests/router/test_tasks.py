"""MCP tasks backed by the job pool, through the router's relay: real Redis, the demo server, workers
in their own processes, raw MCP on the wire (the SDK client drives no tasks)."""

from __future__ import annotations

import json

import pytest

from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.protocol import TASKS_EXTENSION
from pier.router.backends.local.runtimes import InProcessSession
from tests.mcp_wire import ACCEPT, TASKS, modern_request, post
from tests.servers import FIXTURE, get_json, router_app, wait_until, worker_processes

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


# The conformance fixture's tools, run as the tasks scenarios expect (required: only as a task).
FIXTURE_TASKS: dict = {
    "slow_compute": "optional", "failing_job": "required", "confirm_delete": "optional",
    "test_input_required_result_elicitation": "optional",
}  # fmt: skip
ASKING = {**TASKS, "elicitation": {}}  # a caller that takes tasks and can be asked


def _fixture(env: dict[str, str]) -> Catalog:
    profile = Profile(name="fixture", command=FIXTURE, env=env, call_timeout_s=5, task_support=FIXTURE_TASKS)
    return Catalog([profile])


async def _until_status(http, url: str, task_id: str, wanted: str) -> dict:
    async def reached() -> dict | None:
        got = (await post(http, url, modern_request(90, "tasks/get", {"taskId": task_id}, TASKS)))[1]["result"]
        return got if got["status"] == wanted else None

    await wait_until(reached, timeout=30)
    found = await reached()
    assert found is not None
    return found


async def test_pier_tasks_wait_for_input_and_refuse_what_the_spec_refuses(http, redis_server):
    # A server that speaks only the handshake (the fixture kept to it): the tasks are Pier's own.
    catalog = _fixture({"PIER_SIDECAR_SERVER_ERA": "handshake"})
    async with router_app(redis_server.url, catalog) as running, worker_processes(redis_server.url):
        url = running.user_url("alice", "fixture") + "/mcp"
        await _started(http, url)
        [session] = running.router.backend.list("alice")
        assert isinstance(session, InProcessSession)
        forwarded = session.app_bridge.upstream.mux.forwarded

        # A tool the profile runs as a task: a task at once, its CreateTaskResult the Task alone.
        call = modern_request(1, "tools/call", {"name": "confirm_delete", "arguments": {"filename": "a.txt"}}, ASKING)
        created = (await post(http, url, call))[1]["result"]
        assert created["resultType"] == "task"
        assert set(created) <= {"resultType", "taskId", "status", "createdAt", "lastUpdatedAt", "ttlMs",
                                "pollIntervalMs", "statusMessage", "_meta"}  # fmt: skip
        task_id = created["taskId"]
        # The server asks mid-call: the task waits for input, the question in its inputRequests.
        waiting = await _until_status(http, url, task_id, "input_required")
        [(key, asked)] = waiting["inputRequests"].items()
        assert asked["method"] == "elicitation/create"
        assert "a.txt" in asked["params"]["message"]

        # Another user's task is no task of theirs, whatever they ask of it (nothing reaches any server).
        bob = running.user_url("bob", "fixture") + "/mcp"
        for number, (method, params) in enumerate(
            [("tasks/get", {}), ("tasks/update", {"inputResponses": {key: {"action": "accept"}}}), ("tasks/cancel", {})]
        ):
            status, refused = await post(
                http, bob, modern_request(10 + number, method, {"taskId": task_id, **params}, TASKS)
            )
            assert (status, refused["error"]["code"]) == (400, -32602), method
        assert running.router.backend.list("bob") == []

        # A tool that only runs as a task, for a caller without the extension: -32021, nothing started.
        before = forwarded["tools/call"]
        plain = modern_request(20, "tools/call", {"name": "failing_job", "arguments": {}})
        status, refused = await post(http, url, plain)
        assert (status, refused["error"]["code"]) == (400, -32021)
        assert refused["error"]["data"]["requiredCapabilities"]["extensions"] == {TASKS_EXTENSION: {}}
        assert forwarded["tools/call"] == before

        # Input to a task that waits for none: -32602, and nothing reaches the call.
        slow = modern_request(21, "tools/call", {"name": "slow_compute", "arguments": {"seconds": 30}}, ASKING)
        slow_id = (await post(http, url, slow))[1]["result"]["taskId"]
        update = modern_request(22, "tasks/update", {"taskId": slow_id, "inputResponses": {"input-1": {}}}, TASKS)
        status, refused = await post(http, url, update)
        assert (status, refused["error"]["code"]) == (400, -32602)
        assert "not waiting for input" in refused["error"]["message"]

        # The answer, through another router replica: any replica hands it to the call, which goes on.
        async with router_app(redis_server.url, catalog) as replica:
            other = replica.user_url("alice", "fixture") + "/mcp"
            answer = {key: {"action": "accept", "content": {"confirm": True}}, "no-such-key": {"ignored": True}}
            update = modern_request(30, "tasks/update", {"taskId": task_id, "inputResponses": answer}, TASKS)
            ack = (await post(http, other, update))[1]
            assert ack["result"]["resultType"] == "complete"
            assert not {"taskId", "status", "inputRequests"} & ack["result"].keys()
            done = await _until_status(http, other, task_id, "completed")
        assert done["result"]["content"][0]["text"] == "deleted a.txt"
        assert "inputRequests" not in done
        await post(http, url, modern_request(31, "tasks/cancel", {"taskId": slow_id}, TASKS))


async def test_a_pier_task_takes_input_from_a_2026_server_that_asks_with_input_required_results(http, redis_server):
    # A dual-era server without tasks of its own: 2026-07-28 on stdio, Pier's tasks for its callers.
    catalog = _fixture({"FIXTURE_NO_TASKS": "1"})
    async with router_app(redis_server.url, catalog) as running, worker_processes(redis_server.url):
        url = running.user_url("alice", "fixture") + "/mcp"
        await _started(http, url)
        params = {"name": "test_input_required_result_elicitation", "arguments": {}}
        created = (await post(http, url, modern_request(1, "tools/call", params, ASKING)))[1]["result"]
        task_id = created["taskId"]
        waiting = await _until_status(http, url, task_id, "input_required")
        assert list(waiting["inputRequests"]) == ["user_name"]  # the server's own key
        answer = {"user_name": {"action": "accept", "content": {"name": "Alice"}}}
        await post(http, url, modern_request(2, "tasks/update", {"taskId": task_id, "inputResponses": answer}, TASKS))
        done = await _until_status(http, url, task_id, "completed")
        assert done["result"]["content"][0]["text"] == "Hello, Alice!"


async def test_a_server_with_tasks_of_its_own_decides_and_answers_them(http, redis_server):
    async with router_app(redis_server.url, _fixture({})) as running, worker_processes(redis_server.url):
        url = running.user_url("alice", "fixture") + "/mcp"
        await _started(http, url)
        call = modern_request(1, "tools/call", {"name": "slow_compute", "arguments": {"seconds": 0.2}}, TASKS)
        task_id = (await post(http, url, call))[1]["result"]["taskId"]
        # The server's task, not a job of Pier's: the relay passes tasks/get through to it.
        async with http.get(f"{running.url}/v1/jobs/{task_id}") as response:
            assert response.status == 404
        done = await _until_status(http, url, task_id, "completed")
        assert done["result"]["content"][0]["text"] == "computed  after 0.2s"
        # Its -32021 is its own, and so is its answer to an id that is none of its tasks.
        status, refused = await post(
            http, url, modern_request(2, "tools/call", {"name": "failing_job", "arguments": {}})
        )
        assert (status, refused["error"]["code"]) == (400, -32021)
        bob = running.user_url("bob", "fixture") + "/mcp"
        await _started(http, bob)
        status, refused = await post(http, bob, modern_request(3, "tasks/get", {"taskId": task_id}, TASKS))
        assert refused["error"]["code"] == -32602
