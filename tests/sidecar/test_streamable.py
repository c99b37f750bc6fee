"""Streamable HTTP rules at /mcp, checked on the wire (raw HTTP, no SDK smoothing things over)."""

from __future__ import annotations

from typing import Any

from tests.servers import DEMO, bridge_app

ACCEPT = {"Accept": "application/json, text/event-stream"}
INIT: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


async def _session(http, url: str) -> dict[str, str]:
    async with http.post(f"{url}/mcp", json=INIT, headers=ACCEPT) as response:
        assert response.status == 200
        body = await response.json()
        assert body["result"]["protocolVersion"] == "2025-06-18"
        return {
            **ACCEPT,
            "Mcp-Session-Id": response.headers["Mcp-Session-Id"],
            "MCP-Protocol-Version": "2025-06-18",
        }


async def test_sessions_are_required_known_and_deletable(http):
    async with bridge_app(command=DEMO) as running:
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        async with http.post(f"{running.url}/mcp", json=ping, headers=ACCEPT) as response:
            assert response.status == 400
        async with http.post(f"{running.url}/mcp", json=ping, headers={**ACCEPT, "Mcp-Session-Id": "nope"}) as r:
            assert r.status == 404
        headers = await _session(http, running.url)
        async with http.post(f"{running.url}/mcp", json=ping, headers=headers) as response:
            assert (await response.json())["result"] == {}
        async with http.delete(f"{running.url}/mcp", headers=headers) as response:
            assert response.status == 204
        async with http.post(f"{running.url}/mcp", json=ping, headers=headers) as response:
            assert response.status == 404


async def test_protocol_version_header(http):
    async with bridge_app(command=DEMO) as running:
        headers = await _session(http, running.url)
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        async with http.post(
            f"{running.url}/mcp", json=ping, headers={**headers, "MCP-Protocol-Version": "1999-01-01"}
        ) as response:
            assert response.status == 400
        for version in ("2025-03-26", "2025-11-25"):
            async with http.post(
                f"{running.url}/mcp", json=ping, headers={**headers, "MCP-Protocol-Version": version}
            ) as response:
                assert response.status == 200
        # An unknown version asked at initialize gets the bridge's latest.
        other = {**INIT, "params": {**INIT["params"], "protocolVersion": "2099-01-01"}}
        async with http.post(f"{running.url}/mcp", json=other, headers=ACCEPT) as response:
            assert (await response.json())["result"]["protocolVersion"] == "2025-11-25"


async def test_malformed_input_gets_json_rpc_errors_and_harms_nothing(http):
    async with bridge_app(command=DEMO) as running:
        headers = await _session(http, running.url)
        cases = [
            (b"{not json", 400, -32700),
            (b'{"jsonrpc": "2.0", "id": 1}', 400, -32600),
            (b'{"id": 1, "method": "ping"}', 400, -32600),
            (b"[]", 400, -32600),
            (b'"just a string"', 400, -32600),
        ]
        for body, status, code in cases:
            async with http.post(
                f"{running.url}/mcp", data=body, headers={**headers, "Content-Type": "application/json"}
            ) as response:
                assert response.status == status, body
                assert (await response.json())["error"]["code"] == code, body
        async with http.post(f"{running.url}/mcp", data=b"{}", headers={**headers, "Content-Type": "text/plain"}) as r:
            assert r.status == 415
        call = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": "ok"}},
        }
        async with http.post(f"{running.url}/mcp", json=call, headers={**headers, "Accept": "application/json"}) as r:
            assert (await r.json())["result"]["content"][0]["text"] == "Echo: ok"
        assert running.bridge.upstream.restarts == 0


async def test_batches_notifications_and_sse(http):
    async with bridge_app(command=DEMO) as running:
        headers = await _session(http, running.url)
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(f"{running.url}/mcp", json=note, headers=headers) as response:
            assert response.status == 202
        batch = [
            {"jsonrpc": "2.0", "id": "a", "method": "ping"},
            {
                "jsonrpc": "2.0",
                "id": "b",
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"message": "b"}},
            },
        ]
        # Nothing comes before the responses: one plain JSON answer, even though SSE is accepted.
        async with http.post(f"{running.url}/mcp", json=batch, headers=headers) as response:
            assert response.headers["Content-Type"].startswith("application/json")
            answers = {m["id"]: m for m in await response.json()}
        assert answers["a"]["result"] == {}
        assert answers["b"]["result"]["content"][0]["text"] == "Echo: b"
        # A client that accepts only SSE gets SSE.
        async with http.post(f"{running.url}/mcp", json=batch, headers={**headers, "Accept": "text/event-stream"}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            text = await r.text()
        assert text.count("event: message") == 2
        assert '"id":"a"' in text
        assert "Echo: b" in text
        async with http.get(f"{running.url}/mcp", headers={**headers, "Accept": "application/json"}) as response:
            assert response.status == 406


async def test_origin_is_checked(http):
    async with bridge_app(command=DEMO, allowed_origins=["https://app.example"]) as running:
        for origin, status in [
            ("http://evil.example", 403),
            ("http://localhost:3000", 200),
            ("http://127.0.0.1", 200),
            ("https://app.example", 200),
            ("null", 403),
        ]:
            async with http.post(f"{running.url}/mcp", json=INIT, headers={**ACCEPT, "Origin": origin}) as r:
                assert r.status == status, origin


async def test_progress_before_the_response_turns_the_answer_into_sse(http):
    async with bridge_app(command=DEMO) as running:
        headers = await _session(http, running.url)
        call = {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"name": "slow", "arguments": {"seconds": 0.3}, "_meta": {"progressToken": "p"}},
        }
        async with http.post(f"{running.url}/mcp", json=call, headers=headers) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in (await response.text()).split("\n\n") if e.strip()]
        assert all(e.startswith("event: message\ndata: ") for e in events)
        # The tool's log record, then its progress: both this call's, on this call's stream.
        assert '"notifications/message"' in events[0]
        assert '"notifications/progress"' in events[1]
        assert '"id":5' in events[-1]
        assert "Slept 0.3 seconds" in events[-1]
        # A JSON-only client gets just the response.
        async with http.post(f"{running.url}/mcp", json=call, headers={**headers, "Accept": "application/json"}) as r:
            assert r.headers["Content-Type"].startswith("application/json")
            assert (await r.json())["result"]["content"][0]["text"] == "Slept 0.3 seconds"
