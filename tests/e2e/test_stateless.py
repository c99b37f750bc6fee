"""MCP 2026-07-28 through the bridge's /mcp and the router's relay, with real `mcp` SDK clients and
raw HTTP on the wire; the three defects of the handshake revisions (log routing, GET-stream headers,
resumable streams); multi round-trip requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
import pytest
from mcp import Client

from pier.core.catalog import Catalog, demo_profile
from pier.core.protocol import MODERN
from pier.router.backends.local.runtimes import InProcessSession
from pier.sidecar.app import Bridge
from tests.mcp_wire import ACCEPT, modern_headers, modern_request, post
from tests.servers import DEMO, FIXTURE, ROGUE, RunningRouter, bridge_app, router_app, text_of, wait_until


@contextlib.asynccontextmanager
async def endpoint(where: str, redis_url: str, command=None) -> AsyncIterator[tuple[str, Bridge | RunningRouter]]:
    """The MCP URL of a demo session: a bridge's own /mcp, or the router's relay; and its bridge."""
    if where == "bridge":
        async with bridge_app(command=command or DEMO) as running:
            yield running.mcp_url, running.bridge
    else:
        catalog = Catalog([demo_profile().model_copy(update={"command": command or DEMO})])
        async with router_app(redis_url, catalog) as running:
            url = running.user_url("alice") + "/mcp"
            yield url, running
            return


def bridge_of(handle: Bridge | RunningRouter) -> Bridge:
    """The in-process Bridge behind a bridge_app, or behind alice's session of a router."""
    if isinstance(handle, Bridge):
        return handle
    [session] = handle.router.backend.list("alice")
    assert isinstance(session, InProcessSession)
    return session.app_bridge


def _stderr(bridge: Bridge) -> list[str]:
    transport = bridge.upstream.transport
    return list(transport.stderr_tail) if transport is not None else []


WHERE = ["bridge", "relay"]


@pytest.mark.parametrize("where", WHERE)
async def test_sdk_client_on_2026_lists_calls_gets_progress_and_cancels_by_closing(where, redis_server):
    async with endpoint(where, redis_server.url) as (url, handle), Client(url, mode=MODERN) as client:
        assert client.protocol_version == MODERN
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} >= {"echo", "slow", "counter"}
        assert text_of(await client.call_tool("echo", {"message": "hi"})) == "Echo: hi"
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        done = await client.call_tool("slow", {"seconds": 0.3}, progress_callback=on_progress)
        assert text_of(done) == "Slept 0.3 seconds"
        assert seen == [1.0, 2.0, 3.0]

        # Cancel by closing the response stream: the SDK does so when its call is cancelled.
        call = asyncio.create_task(client.call_tool("slow", {"seconds": 60}))
        bridge = bridge_of(handle)
        await wait_until(lambda: bridge.upstream.in_flight == 1)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        bridge = bridge_of(handle)
        await wait_until(lambda: any("slow: cancelled" in line for line in _stderr(bridge)))
        assert bridge.upstream.in_flight == 0
        # The session is unharmed.
        assert text_of(await client.call_tool("echo", {"message": "after"})) == "Echo: after"


@pytest.mark.parametrize("where", WHERE)
async def test_sdk_client_on_2025_11_25_keeps_working(where, redis_server):
    async with endpoint(where, redis_server.url) as (url, _), Client(url, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        assert text_of(await client.call_tool("echo", {"message": "old"})) == "Echo: old"
        assert "slow" in {t.name for t in (await client.list_tools()).tools}


@pytest.mark.slow  # a load test
@pytest.mark.parametrize("where", WHERE)
async def test_fifty_callers_on_both_revisions_never_see_each_others_answers(where, redis_server):
    async with endpoint(where, redis_server.url) as (url, handle):

        async def caller(n: int) -> list[str]:
            async with Client(url, mode=MODERN if n % 2 else "legacy") as client:
                results = await asyncio.gather(
                    *(client.call_tool("echo", {"message": f"caller-{n}-call-{k}"}) for k in range(4))
                )
                return [text_of(r) for r in results]

        answers = await asyncio.gather(*(caller(n) for n in range(50)))
        assert bridge_of(handle).upstream.restarts == 0
    for n, texts in enumerate(answers):
        assert texts == [f"Echo: caller-{n}-call-{k}" for k in range(4)]


# -- the wire ----------------------------------------------------------------------------------


async def test_the_spec_checks_and_errors_carry_the_request_id(http):
    async with bridge_app(command=DEMO) as running:
        url = running.mcp_url
        echo = modern_request(7, "tools/call", {"name": "echo", "arguments": {"message": "x"}})
        status, body = await post(http, url, echo)
        assert status == 200
        assert body["result"]["resultType"] == "complete"
        assert body["result"]["content"][0]["text"] == "Echo: x"
        assert body["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "pier-demo"

        wrong_name = {**modern_headers(echo), "Mcp-Name": "slow"}
        status, body = await post(http, url, echo, wrong_name)
        assert (status, body["error"]["code"], body["id"]) == (400, -32020, 7)

        other = json.loads(json.dumps(echo).replace(MODERN, "2099-01-01"))
        status, body = await post(http, url, other, {**modern_headers(other), "MCP-Protocol-Version": "2099-01-01"})
        assert (status, body["error"]["code"], body["id"]) == (400, -32022, 7)
        assert MODERN in body["error"]["data"]["supported"]
        assert "2025-11-25" in body["error"]["data"]["supported"]

        no_meta = {"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {}}
        status, body = await post(http, url, no_meta, modern_headers(no_meta))
        assert (status, body["error"]["code"], body["id"]) == (400, -32602, 8)

        for removed in ("initialize", "ping", "logging/setLevel", "tasks/list"):
            status, body = await post(http, url, modern_request(9, removed))
            assert (status, body["error"]["code"], body["id"]) == (404, -32601, 9), removed

        status, body = await post(http, url, modern_request(10, "server/discover"))
        assert status == 200
        assert MODERN in body["result"]["supportedVersions"]
        assert "tools" in body["result"]["capabilities"]
        listed = (await post(http, url, modern_request(11, "tools/list")))[1]["result"]
        # The demo server speaks 2026-07-28: its own caching hints pass through (Pier's, 60 s, are for
        # a handshake-era server's lists, which it answers itself).
        assert listed["ttlMs"] >= 0
        assert listed["cacheScope"] == "private"
        # The handshake revisions' errors about the whole body carry the request's id too.
        async with http.post(url, json={"jsonrpc": "2.0", "id": 12, "method": "ping"}, headers=ACCEPT) as response:
            assert (response.status, (await response.json())["id"]) == (400, 12)
        # Nothing of this reached the server but the one echo (and the bridge's own handshake).
        assert running.bridge.upstream.mux.forwarded["tools/call"] == 1


async def test_log_records_reach_only_a_caller_that_asked_for_them(http):
    async with bridge_app(command=DEMO) as running:
        call = modern_request(1, "tools/call", {"name": "slow", "arguments": {"seconds": 0.1}})
        async with http.post(running.mcp_url, json=call, headers=modern_headers(call)) as response:
            quiet = await response.text()
        assert "notifications/message" not in quiet
        call["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = "info"
        async with http.post(running.mcp_url, json=call, headers=modern_headers(call)) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            loud = await response.text()
        assert "slow: sleeping 0.1 seconds" in loud


async def _next_message(response) -> dict:
    while True:
        line = await response.content.readline()
        if line.startswith(b"data: "):
            return json.loads(line[6:])


async def test_subscriptions_listen_carries_list_changes_and_resource_updates(http):
    async with bridge_app(command=ROGUE) as running:
        url = running.mcp_url
        wanted = {"toolsListChanged": True, "resourceSubscriptions": ["test://watched"]}
        listen = modern_request(5, "subscriptions/listen", {"notifications": wanted})
        async with http.post(url, json=listen, headers=modern_headers(listen)) as response:
            ack = await _next_message(response)
            assert ack["method"] == "notifications/subscriptions/acknowledged"
            assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 5
            assert ack["params"]["notifications"] == wanted

            async def notify(method: str, params: dict) -> str:
                call = modern_request(
                    6, "tools/call", {"name": "notify", "arguments": {"method": method, "params": params}}
                )
                return (await post(http, url, call))[1]["result"]["content"][0]["text"]

            # The bridge subscribed to the resource on the listener's behalf.
            assert await notify("notifications/prompts/list_changed", {}) == "subscribed: ['test://watched']"
            await notify("notifications/resources/updated", {"uri": "test://other"})
            await notify("notifications/tools/list_changed", {})
            await notify("notifications/resources/updated", {"uri": "test://watched"})
            first, second = await _next_message(response), await _next_message(response)
        # Only what it asked for, in order, each tagged with its subscription.
        assert [first["method"], second["method"]] == [
            "notifications/tools/list_changed", "notifications/resources/updated"
        ]  # fmt: skip
        assert second["params"]["uri"] == "test://watched"
        assert first["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 5
        # Its stream closed: the bridge unsubscribed.
        await wait_until(lambda: not running.bridge.mcp.stateless.subscriptions.listeners)
        call = modern_request(7, "tools/call", {"name": "notify", "arguments": {"method": "notifications/x"}})
        assert (await post(http, url, call))[1]["result"]["content"][0]["text"] == "subscribed: []"


# -- multi round-trip requests -----------------------------------------------------------------


async def test_elicitation_becomes_input_required_and_the_call_goes_on_once(http):
    # The fixture's test_elicitation asks its caller mid-call (a server request on its handshake
    # session: the fixture kept to the handshake, as a server that speaks only it); a 2026-07-28
    # caller gets an InputRequiredResult and answers with its retry.
    async with bridge_app(command=FIXTURE, server_era="handshake") as running:
        url = running.mcp_url
        capabilities: dict[str, Any] = {"elicitation": {}}
        call = modern_request(1, "tools/call", {"name": "test_elicitation", "arguments": {"message": "Name?"}},
                              capabilities)  # fmt: skip
        status, first = await post(http, url, call)
        assert status == 200
        result = first["result"]
        assert result["resultType"] == "input_required"
        [(key, asked)] = result["inputRequests"].items()
        assert asked["method"] == "elicitation/create"
        assert asked["params"]["message"] == "Name?"

        # A forged requestState leads nowhere.
        params = {"name": "test_elicitation", "arguments": {"message": "Name?"}}
        forged = modern_request(
            2, "tools/call", {**params, "requestState": "forged", "inputResponses": {}}, capabilities
        )
        assert (await post(http, url, forged))[1]["error"]["code"] == -32602

        retry = modern_request(3, "tools/call", {
            "name": "test_elicitation", "arguments": {"message": "Name?"}, "requestState": result["requestState"],
            "inputResponses": {key: {"action": "accept", "content": {"response": "Ada"}}},
        }, capabilities)  # fmt: skip
        status, final = await post(http, url, retry)
        assert (status, final["id"]) == (200, 3)
        assert final["result"]["resultType"] == "complete"
        assert "Ada" in final["result"]["content"][0]["text"]
        # One tools/call reached the server: the retry went on with the call the first request started.
        assert running.bridge.upstream.mux.forwarded["tools/call"] == 1


async def test_sdk_client_answers_input_required_through_the_relay(redis_server):
    # The fixture kept to the handshake: Pier's translation of its mid-call question into MRTR.
    handshake = {"PIER_SIDECAR_SERVER_ERA": "handshake"}
    catalog = Catalog([demo_profile().model_copy(update={"name": "fixture", "command": FIXTURE, "env": handshake})])
    async with router_app(redis_server.url, catalog) as running:
        asked: list[str] = []

        async def elicit(context, params: types.ElicitRequestParams) -> types.ElicitResult:
            asked.append(params.message)
            return types.ElicitResult(action="accept", content={"response": "Grace"})

        url = running.user_url("alice", "fixture") + "/mcp"
        async with Client(url, mode=MODERN, elicitation_callback=elicit) as client:
            result = await client.call_tool("test_elicitation", {"message": "Who?"})
        [session] = running.router.backend.list("alice")
        assert isinstance(session, InProcessSession)
        assert asked == ["Who?"]
        assert "Grace" in text_of(result)
        assert session.app_bridge.upstream.mux.forwarded["tools/call"] == 1


# -- the handshake revisions: the three defects --------------------------------------------------


async def _legacy_session(http, url: str, version: str = "2025-11-25") -> dict[str, str]:
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    async with http.post(url, json=init, headers=ACCEPT) as response:
        assert response.status == 200
        return {**ACCEPT, "Mcp-Session-Id": response.headers["Mcp-Session-Id"], "MCP-Protocol-Version": version}


async def test_a_dropped_stream_resumes_with_last_event_id(http):
    async with bridge_app(command=DEMO) as running:
        headers = await _legacy_session(http, running.mcp_url)
        call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                "params": {"name": "slow", "arguments": {"seconds": 1}, "_meta": {"progressToken": "p"}}}  # fmt: skip
        seen: list[str] = []
        async with http.post(running.mcp_url, json=call, headers=headers) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("id: "):
                    seen.append(line[4:])
                if line.startswith("data: ") and "notifications/progress" in line:
                    break  # the connection drops after the first progress event
        assert seen, "SSE events carry ids at 2025-11-25"
        resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": seen[-1]}
        async with http.get(running.mcp_url, headers=resume) as response:
            text = await response.text()  # the stream ends with the call's answer
        messages = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and len(line) > 6]
        final = [m for m in messages if m.get("id") == 5]
        assert final
        assert final[0]["result"]["content"][0]["text"] == "Slept 1.0 seconds"
        assert sum(1 for m in messages if m.get("method") == "notifications/progress") >= 1
        ids = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
        assert seen[-1] not in ids  # nothing seen before is sent again


async def test_the_relay_sends_get_stream_headers_at_once(http, redis_server):
    # Bridges in their own processes: the relay forwards the GET over HTTP.
    async with router_app(redis_server.url, local_bridges="process") as running:
        url = running.user_url("alice") + "/mcp"
        headers = await _legacy_session(http, url)
        # The bridge writes nothing on an idle GET stream for 15 s (its keep-alive): the headers must
        # not wait for it. The bound is a liveness bound, far above what the answer takes.
        response = await asyncio.wait_for(http.get(url, headers={**headers, "Accept": "text/event-stream"}), 10)
        try:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
        finally:
            response.close()


async def test_another_users_request_state_reaches_nothing(http, redis_server):
    # Sessions are per user: alice's parked call is in her session alone, and bob's retry with her
    # requestState is refused in his (-32602), nothing started; alice's own retry goes on with her call.
    handshake = {"PIER_SIDECAR_SERVER_ERA": "handshake"}
    catalog = Catalog([demo_profile().model_copy(update={"name": "fixture", "command": FIXTURE, "env": handshake})])
    async with router_app(redis_server.url, catalog) as running:
        params = {"name": "test_elicitation", "arguments": {"message": "Name?"}}
        capabilities: dict[str, Any] = {"elicitation": {}}
        alice = running.user_url("alice", "fixture") + "/mcp"
        first = (await post(http, alice, modern_request(1, "tools/call", params, capabilities)))[1]["result"]
        [key] = first["inputRequests"]
        answer = {key: {"action": "accept", "content": {"response": "Ada"}}}
        retry = {**params, "requestState": first["requestState"], "inputResponses": answer}
        bob = running.user_url("bob", "fixture") + "/mcp"
        status, refused = await post(http, bob, modern_request(2, "tools/call", retry, capabilities))
        assert (status, refused["error"]["code"]) == (400, -32602)
        status, done = await post(http, alice, modern_request(3, "tools/call", retry, capabilities))
        assert "Ada" in done["result"]["content"][0]["text"]
        sessions = {s.key.user: s for s in running.router.backend.list()}
        assert isinstance(sessions["bob"], InProcessSession)
        assert isinstance(sessions["alice"], InProcessSession)
        assert sessions["bob"].app_bridge.upstream.mux.forwarded["tools/call"] == 0
        assert sessions["alice"].app_bridge.upstream.mux.forwarded["tools/call"] == 1
