"""The bridge's internal call API (/v1/calls), which the router and the job pool use."""

from __future__ import annotations

from typing import Any

from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from pier.core.callapi import CallAnswer
from tests.servers import DEMO, EVERYTHING, ROGUE, bridge_app, get_json, scrape, wait_until


async def _post(http, url: str, body: dict) -> tuple[int, dict]:
    async with http.post(f"{url}/v1/calls", json=body) as response:
        return response.status, await response.json()


async def test_a_call_outlives_the_wait_and_runs_exactly_once(http):
    async with bridge_app(command=DEMO) as running:
        status, body = await _post(
            http,
            running.url,
            {"tool": "counter", "arguments": {"delay_s": 0.5}, "call_id": "job-1", "wait_s": 0},
        )
        assert status == 202
        assert body["status"] == "running"
        CallAnswer.from_dict(body)

        # Asking again with the same id joins the same call; it never runs twice.
        status, again = await _post(http, running.url, {"tool": "counter", "call_id": "job-1", "wait_s": 0})
        assert (status, again["call_id"]) == (202, "job-1")

        done = await get_json(http, f"{running.url}/v1/calls/job-1?wait_s=30")
        assert done["status"] == "completed"
        assert done["result"]["structuredContent"] == {"result": 1}
        CallAnswer.from_dict(done)

        status, repeat = await _post(http, running.url, {"tool": "counter", "call_id": "job-1"})
        assert (status, repeat["result"]) == (200, done["result"])
        _, count = await _post(http, running.url, {"tool": "count"})
        assert count["result"]["structuredContent"] == {"result": 1}


async def test_long_poll_returns_progress_as_it_comes(http):
    async with bridge_app(command=DEMO) as running:
        _, body = await _post(http, running.url, {"tool": "slow", "arguments": {"seconds": 1}, "wait_s": 0})
        call_url = f"{running.url}/v1/calls/{body['call_id']}"
        first = await get_json(http, f"{call_url}?wait_s=30&progress_after=0")
        assert first["status"] == "running"
        assert first["progress_count"] >= 1
        assert first["progress"][0]["total"] == 10
        later = await get_json(http, f"{call_url}?wait_s=30&progress_after={first['progress_count']}")
        # Only progress after what the caller already has.
        assert later["progress"][0]["progress"] > first["progress"][-1]["progress"]
        final = await get_json(http, f"{call_url}?wait_s=30")
        assert final["status"] == "completed"
        assert final["progress_count"] == 10


async def test_cancel_reaches_the_tool(http):
    async with bridge_app(command=DEMO) as running:
        _, body = await _post(http, running.url, {"tool": "slow", "arguments": {"seconds": 60}, "wait_s": 0.5})
        async with http.delete(f"{running.url}/v1/calls/{body['call_id']}") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "cancelled"

        async def tool_saw_it() -> bool:
            logs = await get_json(http, f"{running.url}/v1/logs")
            return any(line.startswith("slow: cancelled at step") for line in logs["lines"])

        await wait_until(tool_saw_it)
        assert running.bridge.upstream.in_flight == 0
        final = await get_json(http, f"{running.url}/v1/calls/{body['call_id']}")
        assert final["status"] == "cancelled"


async def test_bad_requests_get_clear_errors_and_reach_nothing(http):
    async with bridge_app(command=DEMO) as running:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"tool": "nope"}, 404, "UNKNOWN_TOOL"),
            ({"tool": "echo", "arguments": {"message": 42}}, 422, "INVALID_ARGUMENTS"),
            ({"tool": "echo", "arguments": {}}, 422, "INVALID_ARGUMENTS"),
            ({"tool": "echo", "unexpected": 1}, 422, "INVALID_ARGUMENTS"),
            ({"arguments": {}}, 422, "INVALID_ARGUMENTS"),
        ]
        for body, status, code in cases:
            got_status, got = await _post(http, running.url, body)
            assert (got_status, got["error"]["code"]) == (status, code), body
        async with http.post(f"{running.url}/v1/calls", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "BAD_REQUEST"
        async with http.get(f"{running.url}/v1/calls/unknown") as response:
            assert response.status == 404
        async with http.get(f"{running.url}/v1/calls/unknown?wait_s=abc") as response:
            assert response.status == 404
        assert running.bridge.upstream.mux.forwarded["tools/call"] == 0


async def test_tool_errors_are_completed_calls(http):
    async with bridge_app(command=DEMO) as running:
        status, body = await _post(http, running.url, {"tool": "fail", "arguments": {"message": "nope"}})
        assert status == 200
        assert body["status"] == "completed"
        assert body["result"]["isError"] is True


async def test_status_tools_logs_and_metrics(http):
    async with bridge_app(command=DEMO) as running:
        await _post(http, running.url, {"tool": "echo", "arguments": {"message": "x"}})
        await _post(http, running.url, {"tool": "nope"})
        async with Client(f"{running.url}/mcp") as client:  # /mcp calls are timed by tool
            await client.call_tool("echo", {"message": "y"})
        status = await get_json(http, f"{running.url}/v1/status")
        assert status["ready"] is True
        assert status["server_info"]["name"] == "pier-demo"
        assert status["tools"] == 7
        assert status["pid"] > 0
        tools = await get_json(http, f"{running.url}/v1/tools")
        annotations = {t["name"]: t.get("annotations", {}) for t in tools["tools"]}
        assert annotations["count"]["readOnlyHint"] is True
        assert annotations["counter"]["idempotentHint"] is False
        async with http.get(f"{running.url}/metrics") as response:
            text = await response.text()
        assert "pier_bridge_server_up 1.0" in text
        assert "pier_bridge_requests_in_flight 0.0" in text
        # Written by hand, read by Prometheus' own parser.
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["pier_bridge_server_restarts"].samples[0].value == 0
        [rejected] = families["pier_bridge_rejected"].samples
        assert (rejected.labels, rejected.value) == ({"code": "UNKNOWN_TOOL"}, 1)
        durations = {s.name: s for s in families["pier_bridge_call_duration_seconds"].samples if not s.labels.get("le")}
        buckets = [s for s in families["pier_bridge_call_duration_seconds"].samples if s.labels.get("le") == "+Inf"]
        assert durations["pier_bridge_call_duration_seconds_count"].value == buckets[0].value == 1


async def test_bearer_token_guards_the_api(http):
    async with bridge_app(command=DEMO, token="s3cret") as running:
        async with http.get(f"{running.url}/v1/tools") as response:
            assert response.status == 401
        async with http.get(f"{running.url}/v1/tools", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with http.get(f"{running.url}/v1/tools", headers={"Authorization": "Bearer s3cret"}) as response:
            assert response.status == 200
        async with http.get(f"{running.url}/healthz") as response:
            assert response.status == 200


async def test_retained_calls_are_capped_when_a_call_starts(http):
    async with bridge_app(command=DEMO, max_retained_calls=3) as running:
        calls = running.bridge.calls
        # A running call is never forgotten, however many finish after it.
        _, slow = await _post(http, running.url, {"tool": "slow", "arguments": {"seconds": 2}, "wait_s": 0})
        ids = []
        for n in range(8):
            status, body = await _post(http, running.url, {"tool": "echo", "arguments": {"message": str(n)}})
            assert status == 200
            ids.append(body["call_id"])
            # The cap holds at every insert, not only after the periodic sweep.
            assert len(calls.calls) <= 3
        assert slow["call_id"] in calls.calls
        assert calls.running == 1
        # The newest finished calls are the ones kept; the oldest are gone.
        assert (await get_json(http, f"{running.url}/v1/calls/{ids[-1]}"))["status"] == "completed"
        async with http.get(f"{running.url}/v1/calls/{ids[0]}") as response:
            assert response.status == 404
        assert (await get_json(http, f"{running.url}/v1/calls/{slow['call_id']}?wait_s=30"))["status"] == "completed"
        assert calls.running == 0


async def test_sweep_forgets_finished_calls_past_their_retention(http):
    async with bridge_app(command=DEMO, call_retention_s=0.2) as running:
        _, done = await _post(http, running.url, {"tool": "echo", "arguments": {"message": "x"}})
        _, slow = await _post(http, running.url, {"tool": "slow", "arguments": {"seconds": 1}, "wait_s": 0})

        def swept() -> bool:
            running.bridge.calls.sweep()
            return done["call_id"] not in running.bridge.calls.calls

        await wait_until(swept)
        assert slow["call_id"] in running.bridge.calls.calls  # still running: kept


def test_flat_schemas_are_judged_exactly_as_jsonschema_judges_them():
    from jsonschema import validators

    from pier.sidecar.schema import FlatSchema

    schemas: list[dict[str, Any]] = [
        {"type": "object", "properties": {"message": {"type": "string", "description": "x"}}, "required": ["message"]},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "b": {"type": "boolean"}, "any": {}},
            "additionalProperties": False,
        },
        {"type": "object", "properties": {"items": {"type": "array"}, "o": {"type": "object"}, "z": {"type": "null"}}},
    ]
    instances: list[dict[str, Any]] = [
        {}, {"message": "hi"}, {"message": 1}, {"message": None}, {"message": "hi", "extra": 1},
        {"n": 1}, {"n": 1.0}, {"n": 1.5}, {"n": True}, {"x": 2}, {"x": 2.5}, {"x": False}, {"b": 0}, {"b": False},
        {"any": [1]}, {"other": 1}, {"items": []}, {"items": {}}, {"o": {}}, {"o": []}, {"z": None}, {"z": 0},
    ]  # fmt: skip
    for schema in schemas:
        flat = FlatSchema.of(schema)
        assert flat is not None
        full = validators.validator_for(schema)(schema)
        for instance in instances:
            assert flat.accepts(instance) == full.is_valid(instance), (schema, instance)
    # Anything beyond flat typed properties is left to jsonschema.
    for schema in [
        {"type": "object", "properties": {"s": {"type": "string", "minLength": 1}}},
        {"type": "object", "properties": {"e": {"enum": [1, 2]}}},
        {"type": "object", "properties": {"t": {"type": ["string", "null"]}}},
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "type": "object",
            "properties": {"n": {"type": "integer"}},
        },
    ]:
        assert FlatSchema.of(schema) is None, schema


async def test_arguments_are_judged_by_each_bridge_alike_and_an_invalid_schema_by_the_server(http, caplog):
    # Two bridges in one process share compiled schemas (as a router's in-process sessions do), one
    # of them warmed up (compiled before its first call): each refuses what breaks a schema.
    async with bridge_app(command=ROGUE) as one, bridge_app(command=ROGUE, warm_up=True) as two:
        for running in (one, two):
            status, body = await _post(http, running.url, {"tool": "echo", "arguments": {"message": 42}})
            assert (status, body["error"]["code"]) == (422, "INVALID_ARGUMENTS")
            # A schema that is not one cannot judge anything: the server does.
            status, body = await _post(http, running.url, {"tool": "loose", "arguments": {"x": 1}})
            assert (status, body["result"]["content"][0]["text"]) == (200, "Echo: None")
    warnings = [r for r in caplog.records if "invalid inputSchema" in r.getMessage()]
    assert [r.tool for r in warnings] == ["loose", "loose"]  # once per bridge


async def test_a_client_session_is_recreated_under_its_id_once(http):
    # What the router sends for an MCP session this bridge never saw (`pier.router.mcp.sessions`).
    init = {
        "protocolVersion": "2025-06-18",
        "capabilities": {"sampling": {}},
        "clientInfo": {"name": "c", "version": "1"},
    }
    uri = "demo://resource/static/document/features.md"
    state = {"session_id": "5e55101d", "initialize": init, "log_level": "error", "subscriptions": [uri]}
    async with bridge_app(command=EVERYTHING) as running:
        for body, problem in [
            ({**state, "session_id": "a b"}, ["session_id"]),
            ({**state, "initialize": "no"}, ["initialize"]),
            ({**state, "subscriptions": [1]}, ["subscriptions"]),
            ({**state, "extra": 1}, ["extra"]),
        ]:
            async with http.post(f"{running.url}/v1/clients", json=body) as response:
                answer = await response.json()
                assert (response.status, answer["error"]["code"]) == (422, "INVALID_ARGUMENTS")
                assert [e["path"] for e in answer["error"]["details"]["errors"]] == [problem]
        async with http.post(f"{running.url}/v1/clients", data=b"{", headers={"Content-Type": "application/json"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "BAD_REQUEST")
        assert not running.bridge.clients.sessions
        for expected in (201, 200):  # recreated once; then it is simply there
            async with http.post(f"{running.url}/v1/clients", json=state) as response:
                assert (response.status, await response.json()) == (expected, {"created": expected == 201})
        client = running.bridge.clients.sessions["5e55101d"]
        assert (client.protocol_version, client.capabilities) == ("2025-06-18", {"sampling": {}})
        # Its log level and subscription went to the server as the client's own requests did, once.
        metrics = await scrape(http, running.url)
        assert metrics.value("pier_bridge_requests_total", method="logging/setLevel", outcome="ok") == 1
        assert metrics.value("pier_bridge_requests_total", method="resources/subscribe", outcome="ok") == 1
        # The session serves its client at once, under its old id.
        headers = {"Mcp-Session-Id": "5e55101d", "MCP-Protocol-Version": "2025-06-18", "Accept": "application/json"}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(running.mcp_url, json=ping, headers=headers) as response:
            assert (response.status, await response.json()) == (200, {"jsonrpc": "2.0", "id": 1, "result": {}})
