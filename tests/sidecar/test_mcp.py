"""The bridge's /mcp endpoint with real MCP SDK clients on real stdio servers."""

from __future__ import annotations

import asyncio
import json
import subprocess

import mcp_types as types
import pytest
from mcp import Client

from tests.servers import DEMO, EVERYTHING, INSPECTOR, bridge_app, text_of, wait_until


@pytest.mark.parametrize("server", [DEMO, EVERYTHING], ids=["demo", "everything"])
async def test_twenty_concurrent_clients_each_get_their_own_answers(server):
    async with bridge_app(command=server) as running:

        async def client(n: int) -> list[str]:
            async with Client(running.mcp_url) as c:
                results = await asyncio.gather(
                    *(c.call_tool("echo", {"message": f"client-{n}-call-{k}"}) for k in range(5))
                )
                return [text_of(r) for r in results]

        answers = await asyncio.gather(*(client(n) for n in range(20)))

    for n, texts in enumerate(answers):
        assert texts == [f"Echo: client-{n}-call-{k}" for k in range(5)]


async def test_progress_reaches_only_the_calling_client():
    async with bridge_app(command=DEMO) as running:
        seen: dict[str, list[tuple[float, float | None]]] = {"a": [], "b": []}
        bystander: list[object] = []

        def recorder(name: str):
            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen[name].append((progress, total))

            return on_progress

        async def on_message(message: object) -> None:
            bystander.append(message)

        async with (
            Client(running.mcp_url) as a,
            Client(running.mcp_url) as b,
            Client(running.mcp_url, message_handler=on_message) as c,
        ):
            await asyncio.gather(
                a.call_tool("slow", {"seconds": 0.3}, progress_callback=recorder("a")),
                b.call_tool("slow", {"seconds": 0.6}, progress_callback=recorder("b")),
            )
            await c.call_tool("echo", {"message": "still here"})

    # Three steps for a's 0.3 s, six for b's 0.6 s: each saw only its own call's progress.
    assert seen["a"] == [(float(i), 3.0) for i in range(1, 4)]
    assert seen["b"] == [(float(i), 6.0) for i in range(1, 7)]
    assert not [m for m in bystander if isinstance(m, types.ProgressNotification)]


async def test_log_records_of_a_call_reach_its_caller_only():
    # Handshake-era clients (the revisions with GET streams): the caller holds none, an idle
    # second client does. The tool's log record is the caller's, on its call's own stream.
    async with bridge_app(command=DEMO) as running:
        logs: dict[str, list[str]] = {"caller": [], "listener": []}

        def recorder(name: str):
            async def on_log(params: types.LoggingMessageNotificationParams) -> None:
                logs[name].append(str(params.data))

            return on_log

        async with (
            Client(running.mcp_url, mode="legacy", logging_callback=recorder("caller")) as caller,
            Client(running.mcp_url, mode="legacy", logging_callback=recorder("listener")),
        ):
            await wait_until(lambda: sum(1 for s in running.bridge.clients.sessions.values() if s.get_streams) == 2)
            await caller.call_tool("slow", {"seconds": 0.1})
            # What belongs to no call still reaches every GET stream: a notification sent after.
            running.bridge.mcp.broadcast({"jsonrpc": "2.0", "method": "notifications/message",
                                          "params": {"level": "info", "data": "for everyone"}})  # fmt: skip
            await wait_until(lambda: "for everyone" in logs["listener"] and "for everyone" in logs["caller"])

    assert logs["caller"] == ["slow: sleeping 0.1 seconds", "for everyone"]
    assert logs["listener"] == ["for everyone"]


async def test_server_requests_go_to_the_client_whose_call_is_in_flight():
    async with bridge_app(command=EVERYTHING) as running:
        asked: list[str] = []

        async def sampling(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            content = params.messages[0].content
            assert isinstance(content, types.TextContent)
            asked.append(content.text)
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text="sampled!"), model="test-model"
            )

        async with (
            Client(running.mcp_url, sampling_callback=sampling) as sampler,
            Client(running.mcp_url) as other,
        ):
            result, echoed = await asyncio.gather(
                sampler.call_tool("trigger-sampling-request", {"prompt": "hello from the test"}),
                other.call_tool("echo", {"message": "unrelated"}),
            )

    assert any("hello from the test" in text for text in asked)
    assert "sampled!" in json.dumps([c.model_dump() for c in result.content])
    assert text_of(echoed) == "Echo: unrelated"


async def test_server_request_without_a_capable_client_gets_an_error():
    async with bridge_app(command=EVERYTHING) as running, Client(running.mcp_url) as plain:
        # This client declared no sampling capability: the server's request is refused, not lost.
        result = await plain.call_tool("trigger-sampling-request", {"prompt": "anyone?"})
    assert result.is_error
    assert "no connected client can handle sampling/createMessage" in text_of(result)


async def test_tool_errors_are_results_and_unknown_tools_are_errors():
    async with bridge_app(command=DEMO) as running, Client(running.mcp_url) as c:
        failed = await c.call_tool("fail", {"message": "boom"})
        assert failed.is_error
        assert "boom" in text_of(failed)
        unknown = await c.call_tool("no-such-tool", {})
        assert unknown.is_error
        assert "Unknown tool" in text_of(unknown)
        # The session is unharmed.
        assert text_of(await c.call_tool("echo", {"message": "ok"})) == "Echo: ok"


async def test_initialize_never_reaches_the_server():
    async with bridge_app(command=DEMO) as running:
        for mode in ("auto", "auto", "auto", "legacy", "legacy", "legacy"):
            async with Client(running.mcp_url, mode=mode) as c:
                assert c.server_info is not None
                assert c.server_info.name == "pier-demo"
                # tools/list is answered from the bridge's cache too.
                await c.list_tools()
        # The demo server speaks both eras, one per run: the bridge's own server/discover on the first,
        # its own initialize on the second (the first handshake-era client's), and one tools/list of its
        # own on each. The handshake-era clients were answered from the bridge's cache; the 2026-07-28
        # ones' tools/list passed through to the server (its own answer, caching hints and all).
        forwarded = running.bridge.upstream.mux.forwarded
        assert (forwarded["server/discover"], forwarded["initialize"], forwarded["tools/list"]) == (1, 1, 2 + 3)


def _inspector(url: str, *args: str) -> dict:
    done = subprocess.run(
        [*INSPECTOR, url, "--transport", "http", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


async def test_mcp_inspector_cli_lists_and_calls_tools():
    async with bridge_app(command=DEMO) as running:
        listed = await asyncio.to_thread(_inspector, running.mcp_url, "--method", "tools/list")
        called = await asyncio.to_thread(
            _inspector,
            running.mcp_url,
            "--method",
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            "message=hi",
        )
    assert {t["name"] for t in listed["tools"]} == {"echo", "slow", "counter", "count", "fail", "crash", "env_hash"}
    assert called["content"][0]["text"] == "Echo: hi"
