"""The bridge when things go wrong: crashes, garbage, oversized messages, signals, slow readers."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.servers import DEMO, bridge_app, get_json, scrape, sidecar_process, text_of, wait_until


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes only once reaped; /proc tells the state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_crash_fails_every_call_in_flight_then_the_server_restarts(http):
    async with bridge_app(command=DEMO, restart_backoff_initial_s=0.05) as running:
        async with Client(running.mcp_url) as a, Client(running.mcp_url) as b:
            slow_calls = [asyncio.create_task(c.call_tool("slow", {"seconds": 120})) for c in (a, a, b)]
            async with http.post(
                f"{running.url}/v1/calls",
                json={"tool": "counter", "arguments": {"delay_s": 120}, "wait_s": 0},
            ) as response:
                api_call = (await response.json())["call_id"]
            await wait_until(lambda: running.bridge.upstream.in_flight == 4)
            crash = asyncio.create_task(b.call_tool("crash", {}))

            # Calls that would run for two minutes all fail now; the bound is generous on purpose.
            outcomes = await asyncio.wait_for(asyncio.gather(*slow_calls, crash, return_exceptions=True), timeout=30)
            for outcome in outcomes:
                assert isinstance(outcome, MCPError), outcome
                assert outcome.error.data["code"] == "SERVER_EXITED"
                assert outcome.error.data["exit_code"] == 3
            async with http.get(f"{running.url}/v1/calls/{api_call}") as response:
                assert response.status == 502
                body = await response.json()
            assert body["status"] == "failed"
            assert body["error"]["code"] == "SERVER_EXITED"

            # The bridge restarts the server; the next call from the same client session succeeds.
            result = await a.call_tool("echo", {"message": "after the crash"})
            assert text_of(result) == "Echo: after the crash"
        status = await get_json(http, f"{running.url}/v1/status")
        assert status["restarts"] == 1
        assert status["last_exit"]["exit_code"] == 3


async def test_garbage_on_stdout_is_skipped(http):
    noisy = ["/bin/sh", "-c", 'echo "starting up..."; echo \'{"jsonrpc": "1.0"}\'; exec "$@"', "sh", *DEMO]
    async with bridge_app(command=noisy) as running:
        async with http.post(f"{running.url}/v1/calls", json={"tool": "echo", "arguments": {"message": "x"}}) as r:
            assert (await r.json())["result"]["content"][0]["text"] == "Echo: x"
        assert (await scrape(http, running.url)).value("pier_bridge_invalid_lines_total") == 2
        assert running.bridge.upstream.restarts == 0


async def test_oversized_messages_are_refused_cleanly(http):
    async with bridge_app(command=DEMO, max_message_bytes=8192) as running:
        # The request fits, the echoed response (the text twice) does not: the caller hears why.
        async with http.post(
            f"{running.url}/v1/calls", json={"tool": "echo", "arguments": {"message": "x" * 5000}}
        ) as response:
            body = await response.json()
        assert response.status == 502
        assert "size limit" in body["error"]["message"]
        # A body over the limit is refused before it reaches the server.
        async with http.post(
            f"{running.url}/v1/calls", json={"tool": "echo", "arguments": {"message": "x" * 9000}}
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
        async with http.post(
            f"{running.url}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "y" * 9000}},
        ) as response:
            assert response.status == 413
        async with http.post(f"{running.url}/v1/calls", json={"tool": "echo", "arguments": {"message": "ok"}}) as r:
            assert r.status == 200
        assert (await scrape(http, running.url)).value("pier_bridge_oversized_messages_total") == 1
        assert running.bridge.upstream.restarts == 0


@pytest.mark.slow  # a fault test
async def test_a_server_that_never_reads_does_not_block_the_bridge(http):
    # `sleep` never reads stdin and never answers: calls time out one by one, the bridge stays live.
    async with bridge_app(command=["sleep", "600"], wait_ready=False, start_timeout_s=1, max_restarts=0) as running:
        async with http.get(f"{running.url}/readyz") as response:
            assert response.status == 503
        async with http.get(f"{running.url}/healthz") as response:
            assert response.status == 200
        async with http.post(f"{running.url}/v1/calls", json={"tool": "echo"}) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "SERVER_UNAVAILABLE"


async def test_a_server_that_keeps_failing_is_given_up(http):
    async with bridge_app(
        command=["/bin/sh", "-c", "echo nope >&2; exit 7"],
        wait_ready=False,
        max_restarts=2,
        restart_backoff_initial_s=0.01,
    ) as running:
        await wait_until(running.bridge.upstream.gave_up.is_set)
        async with http.get(f"{running.url}/healthz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["last_exit"]["exit_code"] == 7
        assert body["last_exit"]["stderr_tail"] == ["nope"]
        assert running.bridge.upstream.restarts == 3


async def test_sigterm_lets_calls_finish_and_leaves_no_process(http):
    async with sidecar_process(*DEMO) as (url, proc):
        await wait_until(lambda: _ready(http, url))
        server_pid = (await get_json(http, f"{url}/v1/status"))["pid"]
        async with http.post(
            f"{url}/v1/calls", json={"tool": "slow", "arguments": {"seconds": 1}, "wait_s": 0}
        ) as response:
            call_id = (await response.json())["call_id"]
        call = asyncio.create_task(get_json(http, f"{url}/v1/calls/{call_id}?wait_s=30"))
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        finished = await asyncio.wait_for(call, 30)
        assert finished["status"] == "completed"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not _pid_alive(server_pid)


async def test_sigkill_of_the_bridge_takes_the_server_with_it(http):
    async with sidecar_process(*DEMO) as (url, proc):
        await wait_until(lambda: _ready(http, url))
        server_pid = (await get_json(http, f"{url}/v1/status"))["pid"]
        proc.kill()
        await proc.wait()
        await wait_until(lambda: not _pid_alive(server_pid))


async def _ready(http, url: str) -> bool:
    try:
        async with http.get(f"{url}/readyz") as response:
            return response.status == 200
    except OSError:
        return False


async def test_calls_beyond_the_queue_are_refused(http):
    async with bridge_app(command=DEMO, max_concurrent_calls=1, max_queued_calls=1) as running:
        started = []
        for _ in range(2):  # one runs, one waits for the slot
            async with http.post(
                f"{running.url}/v1/calls", json={"tool": "slow", "arguments": {"seconds": 3}, "wait_s": 0}
            ) as response:
                assert response.status == 202
                started.append((await response.json())["call_id"])
        await wait_until(lambda: running.bridge.upstream.queued == 1)
        async with http.post(f"{running.url}/v1/calls", json={"tool": "echo", "arguments": {"message": "x"}}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "CALL_QUEUE_FULL"
        for call_id in started:
            async with http.delete(f"{running.url}/v1/calls/{call_id}") as response:
                assert (await response.json())["status"] == "cancelled"
