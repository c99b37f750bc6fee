"""mcp-bridgekit's request/response pairs (from its README's API section), unchanged, against Pier."""

from __future__ import annotations

import json
import sys

from tests.servers import DEMO, get_json, router_app, sse_events, wait_job, worker_processes


async def _chat(http, url: str, body: dict, headers: dict | None = None) -> tuple[int, str, dict]:
    async with http.post(f"{url}/chat", json=body, headers=headers or {}) as response:
        text = await response.text()
        if response.content_type == "text/event-stream":
            [frame] = [line for line in text.splitlines() if line.startswith("data: ")]
            return response.status, response.content_type, json.loads(frame[6:])
        return response.status, response.content_type, json.loads(text)


async def test_chat_tools_session_health(http, redis_server):
    async with router_app(redis_server.url) as running:
        # README: POST /chat {user_id, messages, tool_name, tool_args} → an SSE stream with the result.
        status, kind, frame = await _chat(
            http,
            running.url,
            {
                "user_id": "user-123",
                "messages": [{"role": "user", "content": "say hi"}],
                "tool_name": "echo",
                "tool_args": {"message": "hi"},
            },
        )
        assert (status, kind) == (200, "text/event-stream")
        assert frame["status"] == "completed"
        assert frame["result"]["content"][0]["text"] == "Echo: hi"

        # GET /tools/{user_id}: live discovery.
        tools = await get_json(http, f"{running.url}/tools/user-123")
        assert {t["name"] for t in tools["tools"]} >= {"echo", "counter"}

        # GET /health: stats.
        health = await get_json(http, f"{running.url}/health")
        assert health["active_sessions"] == 1
        assert health["total_requests"] == 1
        assert "echo" in health["known_tools"]

        # DELETE /session/{user_id}.
        async with http.delete(f"{running.url}/session/user-123") as response:
            assert (await response.json())["status"] == "closed"
        assert (await get_json(http, f"{running.url}/health"))["active_sessions"] == 0


async def test_chat_timeout_becomes_a_job_polled_and_pushed(http, redis_server):
    async with router_app(redis_server.url, call_timeout_s=0.5) as running, worker_processes(redis_server.url):
        status, _, frame = await _chat(
            http, running.url, {"user_id": "u1", "tool_name": "counter", "tool_args": {"delay_s": 1.5}}
        )
        # README: {"status": "queued", "error_code": "TOOL_TIMED_OUT", "job_id": "..."}
        assert (status, frame["status"], frame["error_code"]) == (200, "queued", "TOOL_TIMED_OUT")
        job_id = frame["job_id"]
        [(_, event)] = await sse_events(http, f"{running.url}/mcp/events/{job_id}")
        # README's event payload: job_id, status, result, user_id, completed_at.
        assert {"job_id", "status", "result", "user_id", "completed_at"} <= event.keys()
        assert (event["status"], event["user_id"]) == ("completed", "u1")
        polled = await get_json(http, f"{running.url}/job/{job_id}")
        assert (polled["status"], polled["result"]) == ("completed", event["result"])
        await wait_job(http, running.url, job_id)


async def test_api_key_errors_and_rate_limit_use_bridgekit_codes(http, redis_server):
    async with router_app(redis_server.url, app_keys=["your-secret-key"], rate_limit_app_per_min=2) as running:
        body = {"user_id": "u1", "tool_name": "echo", "tool_args": {"message": "x"}}
        status, _, missing = await _chat(http, running.url, body)
        assert (status, missing["status"], missing["error_code"]) == (401, "error", "MISSING_API_KEY")
        status, _, invalid = await _chat(http, running.url, body, {"X-API-Key": "nope"})
        assert (status, invalid["error_code"]) == (401, "INVALID_API_KEY")
        # Five requests against a limit of two a minute: even across a minute boundary one is refused.
        answers = [await _chat(http, running.url, body, {"X-API-Key": "your-secret-key"}) for _ in range(5)]
        assert answers[0][0] == 200
        assert next(a[2]["error_code"] for a in answers if a[0] == 429) == "RATE_LIMITED"
        # Metrics and health stay public, as in bridgekit.
        async with http.get(f"{running.url}/health") as response:
            assert response.status == 200


async def test_caller_chosen_commands_are_refused_unless_allowed(http, redis_server):
    body = {
        "user_id": "u1",
        "tool_name": "echo",
        "tool_args": {"message": "x"},
        "mcp_config": {"command": sys.executable, "args": DEMO[1:]},
    }
    async with router_app(redis_server.url) as running:
        status, _, refused = await _chat(http, running.url, body)
        assert (status, refused["error_code"]) == (403, "INLINE_COMMANDS_DISABLED")
        assert not running.router.backend.list()
    async with router_app(redis_server.url, allow_inline_commands=True) as running:
        status, _, frame = await _chat(http, running.url, body)
        assert (status, frame["result"]["content"][0]["text"]) == (200, "Echo: x")


async def test_tool_failures_map_to_tool_call_failed(http, redis_server):
    async with router_app(redis_server.url) as running:
        status, _, failed = await _chat(http, running.url, {"user_id": "u1", "tool_name": "nope"})
        assert (status, failed["error_code"]) == (404, "TOOL_CALL_FAILED")
        status, _, missing = await _chat(http, running.url, {"user_id": "u1"})
        assert (status, missing["status"]) == (422, "error")
        status, _, unknown = await _chat(http, running.url, {"user_id": "u1", "tool_name": "echo", "server": "x"})
        assert (status, unknown["error_code"]) == (404, "UNKNOWN_SERVER")
