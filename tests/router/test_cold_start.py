"""Cold starts: one deadline per request, covering the session's start, and warm pools (local backend).

A "sluggish" server takes seconds to start and leaves a mark once it has: what a test sees before
the mark exists happened before the server was up — no clock is read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from pier.core.catalog import Catalog, Profile, demo_profile
from pier.router.backends.local import LocalBackend
from tests.mcp_wire import TASKS, modern_request, post
from tests.servers import ROGUE, get_json, router_app, scrape, wait_job, wait_until, worker_processes

# These servers tell the test how their start goes through files in its tmp_path: they run unisolated
# (a sandboxed server sees a /tmp of its own). Isolation itself: test_isolation.py.
unisolated = functools.partial(router_app, local_isolation="none")


def sluggish(mark: Path, seconds: float = 3) -> Profile:
    """The demo server behind a slow start: it sleeps, then marks that it is starting for real."""
    script = f"sleep {seconds}; touch {mark}; exec {sys.executable} -m pier.examples.demo_server"
    return Profile(name="sluggish", command=["sh", "-c", script])


async def _call(http, url: str, tool: str, timeout_s: float | None = None, **arguments) -> tuple[int, dict]:
    body: dict = {"arguments": arguments}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    async with http.post(f"{url}/tools/{tool}/call", json=body) as response:
        return response.status, await response.json()


def _value(body: dict) -> int:
    return body["result"]["structuredContent"]["result"]


async def test_the_deadline_covers_the_sessions_start(http, redis_server, tmp_path):
    mark = tmp_path / "server-started"
    async with (
        unisolated(redis_server.url, Catalog([sluggish(mark)])) as running,
        worker_processes(redis_server.url),
    ):
        alice = running.user_url("alice", "sluggish")
        status, queued = await _call(http, alice, "counter", timeout_s=1)
        # Handed off before the server was even up: the job exists already, the server does not.
        assert status == 202, queued
        assert not mark.exists()
        job = await get_json(http, f"{running.url}/v1/jobs/{queued['job_id']}")
        assert job["status"] in ("queued", "running")
        assert not mark.exists()

        final = await wait_job(http, running.url, queued["job_id"])
        assert (final["status"], final["result"]["structuredContent"]) == ("completed", {"result": 1})
        status, count = await _call(http, alice, "count")
        assert (status, _value(count)) == (200, 1)  # the call ran exactly once, in alice's session


async def test_bridgekit_chat_hands_off_while_the_session_starts(http, redis_server, tmp_path):
    mark = tmp_path / "server-started"
    async with (
        unisolated(redis_server.url, Catalog([sluggish(mark)]), default_profile="sluggish") as running,
        worker_processes(redis_server.url),
    ):
        body = {"user_id": "bob", "tool_name": "echo", "tool_args": {"message": "hi"}, "timeout_s": 1}
        async with http.post(f"{running.url}/chat", json=body) as response:
            frame = json.loads((await response.text()).removeprefix("data: "))
        assert (frame["status"], frame["error_code"]) == ("queued", "TOOL_TIMED_OUT")
        assert not mark.exists()
        final = await wait_job(http, running.url, frame["job_id"])
        assert final["result"]["content"][0]["text"] == "Echo: hi"


async def test_the_relay_answers_session_starting_within_the_deadline(http, redis_server, tmp_path):
    mark = tmp_path / "server-started"
    profile = sluggish(mark).model_copy(update={"call_timeout_s": 1})
    async with unisolated(redis_server.url, Catalog([profile])) as running:
        url = running.user_url("carol", "sluggish") + "/mcp"
        init = {
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}},
        }  # fmt: skip
        headers = {"Accept": "application/json, text/event-stream"}
        async with http.post(url, json=init, headers=headers) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            answer = await response.json()
        assert (answer["id"], answer["error"]["data"]["code"]) == (1, "SESSION_STARTING")
        assert not mark.exists()
        # The start went on: once the server is up, the same request is answered.
        await wait_until(mark.exists, timeout=60)

        async def initialized() -> bool:
            async with http.post(url, json=init, headers=headers) as response:
                return response.status == 200

        await wait_until(initialized, timeout=60)


async def test_a_caller_that_takes_tasks_gets_a_task_while_the_session_starts(http, redis_server, tmp_path):
    mark = tmp_path / "server-started"
    profile = sluggish(mark).model_copy(update={"call_timeout_s": 1})
    async with unisolated(redis_server.url, Catalog([profile])) as running, worker_processes(redis_server.url):
        url = running.user_url("alice", "sluggish") + "/mcp"
        call = modern_request(1, "tools/call", {"name": "counter", "arguments": {}}, TASKS)
        status, answer = await post(http, url, call)
        assert not mark.exists()  # a task before the server was up
        assert (status, answer["result"]["resultType"], answer["result"]["status"]) == (200, "task", "working")
        task = {"taskId": answer["result"]["taskId"]}
        done: dict = {}

        async def completed() -> bool:
            done.update((await post(http, url, modern_request(2, "tasks/get", task, TASKS)))[1]["result"])
            return done["status"] == "completed"

        await wait_until(completed, timeout=60, interval=0.2)
        assert done["result"]["structuredContent"] == {"result": 1}
        status, count = await _call(http, running.user_url("alice", "sluggish"), "count")
        assert (status, _value(count)) == (200, 1)  # ran once


@pytest.mark.slow  # a load test: six servers starting
async def test_a_herd_of_new_users_starts_its_servers_a_few_at_a_time(http, redis_server, tmp_path):
    # Each server marks itself starting, looks a second later how many are starting with it, then
    # unmarks itself and runs: all inside its session's start.
    script = (
        f"touch {tmp_path}/starting.$$; sleep 1; ls {tmp_path} | grep -c starting > {tmp_path}/seen.$$; "
        f"rm {tmp_path}/starting.$$; exec {sys.executable} -m pier.examples.demo_server"
    )
    catalog = Catalog([Profile(name="herd", command=["sh", "-c", script])])
    # A deadline no queue of starts reaches on a busy machine: this test is about starts, not hand-offs.
    async with unisolated(redis_server.url, catalog, max_concurrent_starts=2, call_timeout_s=120) as running:
        calls = [_call(http, running.user_url(f"user-{n}", "herd"), "counter") for n in range(6)]
        results = await asyncio.gather(*calls)
    assert [(status, _value(body)) for status, body in results] == [(200, 1)] * 6
    seen = [int(path.read_text()) for path in tmp_path.glob("seen.*")]
    assert len(seen) == 6
    assert max(seen) <= 2  # never more than two starting at once (unlimited: all six would be)


@pytest.mark.slow  # a load test: a burst of twenty users, twenty-five servers (the pool's limits are tested below)
async def test_a_warm_pool_serves_the_first_users_and_refills(http, redis_server):
    pooled = demo_profile().model_copy(update={"warm_pool": 5})
    async with router_app(redis_server.url, Catalog([pooled]), max_sessions=40) as running:

        async def pool_ready(count: int) -> bool:
            metrics = await scrape(http, running.url)
            return metrics.value("pier_router_pool_ready", profile="demo") == count

        await wait_until(lambda: pool_ready(5), timeout=60)
        assert not running.router.backend.list()  # pooled sessions belong to nobody

        # A burst of twenty new users: five claim pooled sessions, fifteen start their own.
        users = [running.user_url(f"user-{n}") for n in range(20)]
        first = await asyncio.gather(*(_call(http, url, "counter") for url in users))
        assert [status for status, _ in first] == [200] * 20
        assert [_value(body) for _, body in first] == [1] * 20
        counts = await asyncio.gather(*(_call(http, url, "count") for url in users))
        assert [_value(body) for _, body in counts] == [1] * 20  # each saw only its own counter
        metrics = await scrape(http, running.url)
        assert metrics.value("pier_router_pool_claims_total", profile="demo") == 5
        assert metrics.value("pier_router_pool_misses_total", profile="demo") == 15
        assert len(running.router.backend.list()) == 20

        # The pool refills behind the claims, and the dashboard shows it.
        await wait_until(lambda: pool_ready(5), timeout=60)
        state = await get_json(http, f"{running.url}/v1/dashboard")
        [pool] = state["pools"]
        assert (pool["server"], pool["size"], pool["ready"], pool["claims"]) == ("demo", 5, 5, 5)


async def test_a_warm_pool_stays_within_capacity_and_yields_to_users(http, redis_server):
    pooled = demo_profile().model_copy(update={"warm_pool": 5})
    async with router_app(redis_server.url, Catalog([pooled]), max_sessions=3) as running:

        async def ready() -> float:
            return (await scrape(http, running.url)).value("pier_router_pool_ready", profile="demo")

        await wait_until(lambda: _equals(ready(), 3), timeout=60)  # the pool never takes more than the room
        # Four users on a capacity of three: each new one takes a pooled session (or its room).
        for n in range(4):
            status, body = await _call(http, running.user_url(f"user-{n}"), "counter")
            assert (status, _value(body)) == (200, 1)
        assert len(running.router.backend.list()) == 3  # the oldest idle user was evicted for the fourth
        assert await ready() == 0


@pytest.mark.slow  # a fault test
async def test_a_pooled_session_whose_bridge_gives_up_is_replaced(http, redis_server):
    # Its bridge gives up after one restart: two kills of the server end the pooled session.
    env = {"PIER_SIDECAR_MAX_RESTARTS": "1", "PIER_SIDECAR_RESTART_BACKOFF_INITIAL_S": "0.01"}
    pooled = demo_profile().model_copy(update={"warm_pool": 1, "env": env})
    async with router_app(redis_server.url, Catalog([pooled]), reap_interval_s=0.2) as running:
        assert isinstance(running.router.backend, LocalBackend)
        pool = running.router.backend.pools["demo"]  # pooled sessions are nobody's: not listed anywhere public
        await wait_until(lambda: len(pool.ready) == 1, timeout=60)
        [session] = pool.ready
        for restarts in range(2):
            await wait_until(functools.partial(_server_up, session, restarts), timeout=30)
            pid = (await session.bridge.status()).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: len(pool.ready) == 1 and pool.ready[0] is not session, timeout=60)
        status, body = await _call(http, running.user_url("dave"), "counter")
        assert (status, _value(body)) == (200, 1)


async def _server_up(session, restarts: int) -> bool:
    status = await session.bridge.status()
    return status.ready and status.restarts == restarts


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def test_pooled_sessions_are_warmed_up_and_others_are_not(http, redis_server):
    catalog = Catalog([Profile(name="pooled", command=ROGUE, warm_pool=1), Profile(name="plain", command=ROGUE)])
    async with router_app(redis_server.url, catalog) as running:
        assert isinstance(running.router.backend, LocalBackend)
        pool = running.router.backend.pools["pooled"]
        await wait_until(lambda: pool.ready, timeout=30)
        [pooled] = pool.ready

        def calls(session) -> list[str]:
            return [line for line in session.app_bridge.upstream.transport.stderr_tail if line.startswith("call: ")]

        # One call of a tool no server has, refused by the server before anyone asked for the session.
        assert calls(pooled) == ["call: pier.warm-up.no-such-tool"]
        status, body = await _call(http, running.user_url("alice", "pooled"), "echo", message="hi")
        assert (status, body["result"]["content"][0]["text"]) == (200, "Echo: hi")
        assert running.router.backend.list("alice") == [pooled]  # she got the warmed one
        status, _ = await _call(http, running.user_url("alice", "plain"), "echo", message="hi")
        [plain] = [s for s in running.router.backend.list("alice") if s.key.profile == "plain"]
        assert calls(plain) == ["call: echo"]  # a user's own session starts without one
