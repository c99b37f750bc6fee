"""The server's era per caller (issue #26): a bridge asks its server `server/discover` first, speaks
2026-07-28 to one that answers it and the handshake to one that does not, and gives handshake-era
callers of a dual-era server (the `mcp` SDK 2.x, whose stdio takes one era per connection) a run of
their own — real servers, real clients, raw MCP on the wire where the wire is the point."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from mcp import Client
from mcp_types import CreateMessageRequestParams, CreateMessageResult, LoggingMessageNotificationParams, TextContent

from pier.core.protocol import SERVER_INFO_KEY, SUBSCRIPTION_ID_KEY
from tests.mcp_wire import ACCEPT, modern_headers, modern_request, post
from tests.servers import DEMO, EVERYTHING, FIXTURE, ROGUE, bridge_app, scrape, text_of, wait_until


def _forwarded(running) -> int:
    """Tool calls that reached the server, on either run (the runs keep one count)."""
    return running.bridge.upstream.mux.forwarded["tools/call"]


async def test_a_dual_era_server_answers_each_caller_in_its_own_era(http):
    async with bridge_app(command=FIXTURE) as running:
        assert running.bridge.upstream.modern
        assert running.bridge.upstream.server_tasks
        # A 2026-07-28 caller's request passes through: the server's own multi round-trip request
        # (its own key), and its own capability check (-32021 for a caller without sampling).
        call = modern_request(1, "tools/call", {"name": "test_input_required_result_elicitation", "arguments": {}})
        status, answer = await post(http, running.mcp_url, call, modern_headers(call))
        assert (status, answer["result"]["resultType"]) == (200, "input_required")
        assert list(answer["result"]["inputRequests"]) == ["user_name"]
        check = modern_request(2, "tools/call", {"name": "test_missing_capability", "arguments": {}})
        status, refused = await post(http, running.mcp_url, check)
        assert (status, refused["error"]["code"]) == (400, -32021)
        assert running.bridge.status().server_runs == 1  # no handshake-era caller yet: one run

        # A handshake-era caller: the server asks it mid-call (sampling, routed to its call), it gets
        # its progress and its log records on its own stream — on a run of the server of its own.
        asked: list[str] = []

        async def sampling(context, params: CreateMessageRequestParams) -> CreateMessageResult:
            content = params.messages[0].content
            assert isinstance(content, TextContent)
            asked.append(content.text)
            return CreateMessageResult(role="assistant", content=TextContent(type="text", text="Paris"), model="m")

        steps: list[float] = []
        logged: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            steps.append(progress)

        async def on_log(params: LoggingMessageNotificationParams) -> None:
            logged.append(str(params.data))

        async with Client(running.mcp_url, mode="legacy", sampling_callback=sampling, logging_callback=on_log) as c:
            sampled = await c.call_tool("test_sampling", {"prompt": "capital of France?"})
            assert text_of(sampled) == "LLM response: Paris"
            assert asked == ["capital of France?"]
            await c.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
            await c.call_tool("test_tool_with_logging", {})
        assert steps == [0, 50, 100]
        assert "Tool execution completed" in logged
        status_now = running.bridge.status()
        assert status_now.server_runs == 2
        assert running.bridge.eras.secondary is not None
        assert not running.bridge.eras.secondary.modern


async def test_a_handshake_only_server_is_translated_on_one_run(http):
    async with bridge_app(command=EVERYTHING) as running:
        # server-everything answers server/discover with -32601: the handshake follows, on the same run.
        assert not running.bridge.upstream.modern
        call = modern_request(1, "tools/call", {"name": "echo", "arguments": {"message": "hi"}})
        status, answer = await post(http, running.mcp_url, call)
        assert (status, answer["result"]["resultType"]) == (200, "complete")
        async with Client(running.mcp_url, mode="legacy") as c:
            assert text_of(await c.call_tool("echo", {"message": "old"})) == "Echo: old"
        assert running.bridge.status().server_runs == 1
        assert running.bridge.upstream.restarts == 0


async def test_a_server_that_ends_at_the_probe_is_started_again_with_the_handshake(http):
    async with bridge_app(command=[*ROGUE, "--strict"]) as running:
        up = running.bridge.upstream
        assert (up.modern, up.restarts) == (False, 1)  # one exit at server/discover, then the handshake
        assert up.last_exit is None  # an exit at the probe is not reported as the server failing
        call = modern_request(1, "tools/call", {"name": "echo", "arguments": {"message": "still here"}})
        assert (await post(http, running.mcp_url, call))[1]["result"]["content"][0]["text"] == "Echo: still here"


async def test_a_body_claiming_another_era_than_its_header_is_refused(http):
    async with bridge_app(command=DEMO) as running:
        async with Client(running.mcp_url, mode="legacy") as c:
            await c.list_tools()
        async with http.post(
            running.mcp_url,
            json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
            headers=ACCEPT,
        ) as response:  # fmt: skip
            session = response.headers["Mcp-Session-Id"]
        before = _forwarded(running)
        claimed = modern_request(1, "tools/call", {"name": "counter", "arguments": {}})
        headers = {**ACCEPT, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        async with http.post(running.mcp_url, json=claimed, headers=headers) as response:
            assert response.status == 400
            body = await response.json()
        assert (body["id"], body["error"]["code"]) == (1, -32020)
        # And the other way round: a 2026-07-28 header over a body that claims 2025-11-25.
        other = modern_request(2, "tools/call", {"name": "counter", "arguments": {}})
        other["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2025-11-25"
        status, refused = await post(http, running.mcp_url, other)
        assert (status, refused["error"]["code"]) == (400, -32020)
        assert _forwarded(running) == before  # nothing reached the server


@pytest.mark.parametrize(
    ("server", "uri", "runs"),
    [(EVERYTHING, "demo://resource/static/document/features.md", 1), (FIXTURE, "test://watched-resource", 2)],
)
async def test_a_client_session_resumed_while_the_server_starts_is_replayed_on_its_eras_run(http, server, uri, runs):
    # The router recreates an MCP client session (POST /v1/clients) on a bridge whose server is still
    # starting (a new pod, a restarted bridge): its log level and subscription reach the run handshake-era
    # callers are on once the server has said which eras it speaks — a run of their own for a dual-era
    # server, the only run for a handshake-only one (no second run started while the first is probed).
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}
    state = {"session_id": "5e55101d", "initialize": init, "log_level": "error", "subscriptions": [uri]}
    async with bridge_app(command=server, wait_ready=False) as running:
        async with http.post(f"{running.url}/v1/clients", json=state) as response:
            assert response.status == 201
        assert running.bridge.status().server_runs == runs
        metrics = await scrape(http, running.url)
        for method in ("logging/setLevel", "resources/subscribe"):
            assert metrics.value("pier_bridge_requests_total", method=method, outcome="ok") == 1, method


def _listen(http: aiohttp.ClientSession, url: str, request_id: int) -> asyncio.Future[list[dict]]:
    """A subscriptions/listen stream read to its end, in the background: its events."""
    message = modern_request(request_id, "subscriptions/listen", {"notifications": {"toolsListChanged": True}})

    async def read() -> list[dict]:
        events = []
        async with http.post(url, json=message, headers=modern_headers(message)) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
        return events

    return asyncio.ensure_future(read())


async def test_the_revisions_post_release_changes_on_both_paths(http):
    """clientInfo optional, serverInfo in the result's _meta (none on DiscoverResult), a graceful end of
    subscriptions/listen, tasks/result gone: translated (a handshake-only server) and passed through."""
    for command in (EVERYTHING, FIXTURE):
        async with bridge_app(command=command) as running:
            url = running.mcp_url
            bare = modern_request(1, "tools/list", {})
            del bare["params"]["_meta"]["io.modelcontextprotocol/clientInfo"]
            status, listed = await post(http, url, bare)
            assert status == 200, command
            assert listed["result"]["tools"]
            assert SERVER_INFO_KEY in listed["result"]["_meta"]

            status, discovered = await post(http, url, modern_request(2, "server/discover", {}))
            assert "serverInfo" not in discovered["result"]
            assert discovered["result"]["_meta"][SERVER_INFO_KEY]["name"]

            status, gone = await post(http, url, modern_request(3, "tasks/result", {"taskId": "x"}))
            assert (status, gone["error"]["code"]) == (404, -32601)

            reading = _listen(http, url, 7)
            await wait_until(lambda: running.bridge.mcp.stateless.subscriptions.listeners
                             or running.bridge.mcp.stateless._listens)  # fmt: skip
            running.bridge.mcp.stateless.close()  # the bridge stops: every listen ends gracefully
            events = await asyncio.wait_for(reading, 10)
            final = events[-1]
            assert final["id"] == 7
            assert final["result"]["resultType"] == "complete"
            assert final["result"]["_meta"][SUBSCRIPTION_ID_KEY] == 7
