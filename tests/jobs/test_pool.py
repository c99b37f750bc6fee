"""The job pool: real Redis, the real demo server, workers in their own processes."""

from __future__ import annotations

import asyncio
import base64
import os
import signal

import pytest
from standardwebhooks import Webhook

from pier.cli.redis_server import RedisServer, free_port
from pier.core.redis_keys import DEAD_LETTERS, GROUP, STREAM
from tests.hooks import Receiver
from tests.servers import get_json, router_app, sse_events, wait_job, wait_until, worker_processes

SECRET = "whsec_" + base64.b64encode(b"pier-test-webhook-secret-32bytes").decode()


async def _hand_off(http, url: str, tool: str, headers: dict | None = None, timeout_s: float = 0.3, **arguments):
    async with http.post(
        f"{url}/tools/{tool}/call", json={"arguments": arguments, "timeout_s": timeout_s}, headers=headers or {}
    ) as response:
        body = await response.json()
        assert response.status == 202, body
        assert body["status"] == "queued"
        return body


async def _count(http, url: str) -> int:
    async with http.post(f"{url}/tools/count/call", json={}) as response:
        return (await response.json())["result"]["structuredContent"]["result"]


async def test_an_overrunning_call_finishes_once_and_reaches_poll_sse_and_webhook(http, redis_server):
    async with (
        Receiver() as receiver,
        router_app(redis_server.url, webhook_url=receiver.url) as running,
        worker_processes(redis_server.url, PIER_WEBHOOK_SECRET=SECRET),
    ):
        alice = running.user_url("alice")
        queued = await _hand_off(http, alice, "counter", delay_s=2)
        job_id = queued["job_id"]
        assert queued["poll_url"] == f"/v1/jobs/{job_id}"
        events = await sse_events(http, f"{running.url}{queued['events_url']}")
        polled = await wait_job(http, running.url, job_id)
        await wait_until(lambda: receiver.received)

        assert polled["status"] == "completed"
        assert polled["result"]["structuredContent"] == {"result": 1}
        assert events[-1][0] == "completed"
        assert events[-1][1]["result"] == polled["result"]
        headers, body = receiver.received[0]
        payload = Webhook(SECRET).verify(body, headers)  # raises if the signature is wrong
        assert headers["webhook-id"] == job_id
        assert payload["result"] == polled["result"]
        assert payload["status"] == "completed"
        # bridgekit's routes see the same job.
        compat = await get_json(http, f"{running.url}/job/{job_id}")
        assert (compat["status"], compat["result"]) == ("completed", polled["result"])
        [(_, compat_event)] = await sse_events(http, f"{running.url}/mcp/events/{job_id}")
        assert compat_event["result"] == polled["result"]
        # Exactly one execution: the call kept running in alice's own session.
        assert await _count(http, alice) == 1


async def test_progress_arrives_as_sse_events_before_completion(http, redis_server):
    async with router_app(redis_server.url) as running, worker_processes(redis_server.url):
        queued = await _hand_off(http, running.user_url("alice"), "slow", seconds=1.5)
        events = await sse_events(http, f"{running.url}{queued['events_url']}")
    names = [name for name, _ in events]
    assert names[-1] == "completed"
    assert names.count("completed") == 1
    progress = [data for name, data in events if name == "progress"]
    assert progress, names
    assert all(p["total"] == 15 for p in progress)
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)


@pytest.mark.slow  # a fault test
async def test_a_killed_worker_is_replaced_and_the_call_still_runs_once(http, redis_server):
    async with (
        router_app(redis_server.url) as running,
        worker_processes(redis_server.url, count=2, PIER_VISIBILITY_TIMEOUT_S="1.5") as workers,
    ):
        alice = running.user_url("alice")
        job_id = (await _hand_off(http, alice, "counter", delay_s=4))["job_id"]

        async def holder() -> str | None:
            pending = await running.router.redis.xpending_range(STREAM, GROUP, "-", "+", 10)
            if not pending:
                return None
            consumer = pending[0]["consumer"]
            return consumer.decode() if isinstance(consumer, bytes) else str(consumer)

        await wait_until(holder)
        name = await holder()
        assert name is not None
        victim = workers[int(name.split("-")[1])]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()

        final = await wait_job(http, running.url, job_id)
        assert final["status"] == "completed"
        assert final["result"]["structuredContent"] == {"result": 1}
        assert await _count(http, alice) == 1


@pytest.mark.slow  # a fault test
async def test_jobs_queued_across_a_redis_restart_all_complete(http, tmp_path):
    data = tmp_path / "redis"
    redis = RedisServer(data)
    await redis.start()
    try:
        async with router_app(redis.url) as running:
            users = [running.user_url(f"user-{n}") for n in range(5)]
            jobs = [(await _hand_off(http, url, "counter", delay_s=1))["job_id"] for url in users]
            await redis.stop()  # no worker has seen them yet
            redis = RedisServer(data, port=redis.port, password=redis.password)
            await redis.start()
            async with worker_processes(redis.url):
                finals = [await wait_job(http, running.url, job_id) for job_id in jobs]
            assert [f["status"] for f in finals] == ["completed"] * 5
            assert [await _count(http, url) for url in users] == [1] * 5
    finally:
        await redis.stop()


@pytest.mark.slow  # a load test
async def test_three_hundred_slow_jobs_across_three_workers(http, redis_server):
    async with (
        router_app(redis_server.url) as running,
        worker_processes(redis_server.url, count=3) as _,
    ):
        users = [running.user_url(f"user-{n}") for n in range(30)]
        # Each user's session runs its ten calls at once; every one overruns the timeout.
        queued = await asyncio.gather(
            *(_hand_off(http, url, "counter", timeout_s=0.2, delay_s=3) for url in users for _ in range(10))
        )
        finals = await asyncio.gather(*(wait_job(http, running.url, q["job_id"], timeout=180) for q in queued))
        assert [f["status"] for f in finals] == ["completed"] * 300
        assert [await _count(http, url) for url in users] == [10] * 30
        for n in range(len(users)):
            results = sorted(f["result"]["structuredContent"]["result"] for f in finals[n * 10 : n * 10 + 10])
            assert results == list(range(1, 11))  # each of the user's ten calls ran once


async def test_cancelling_a_running_job_reaches_the_tool(http, redis_server):
    async with router_app(redis_server.url) as running, worker_processes(redis_server.url):
        await _count(http, running.user_url("alice"))  # the session is up: the call starts in it before the hand-off
        queued = await _hand_off(http, running.user_url("alice"), "slow", seconds=60)
        await wait_until(lambda: _status(http, running.url, queued["job_id"], "running"))
        async with http.delete(f"{running.url}/v1/jobs/{queued['job_id']}") as response:
            assert (await response.json())["status"] == "cancelled"
        [session] = running.router.backend.list("alice")

        async def tool_saw_it() -> bool:
            async with http.get(f"{session.endpoint.url}/v1/logs", headers=session.endpoint.headers()) as r:
                return any(line.startswith("slow: cancelled") for line in (await r.json())["lines"])

        await wait_until(tool_saw_it)
        events = await sse_events(http, f"{running.url}{queued['events_url']}")
        assert events == [("completed", events[0][1])]
        assert events[0][1]["status"] == "cancelled"


async def _status(http, base: str, job_id: str, status: str) -> bool:
    return (await get_json(http, f"{base}/v1/jobs/{job_id}"))["status"] == status


@pytest.mark.slow  # a fault test
async def test_a_lost_session_fails_unsafe_jobs_and_reruns_safe_ones(http, redis_server):
    async with router_app(redis_server.url) as running, worker_processes(redis_server.url):
        alice = running.user_url("alice")
        await _count(http, alice)  # the session is up: both calls start in it before their hand-offs
        unsafe = (await _hand_off(http, alice, "counter", delay_s=30))["job_id"]
        safe = (await _hand_off(http, alice, "slow", seconds=3))["job_id"]
        [session] = running.router.backend.list("alice")
        status = await get_json_auth(http, f"{session.endpoint.url}/v1/status", session.endpoint.headers())
        await wait_until(lambda: _status(http, running.url, unsafe, "running"))
        await wait_until(lambda: _status(http, running.url, safe, "running"))
        os.kill(status["pid"], signal.SIGKILL)

        lost = await wait_job(http, running.url, unsafe)
        assert (lost["status"], lost["error"]["code"]) == ("failed", "SESSION_LOST")
        rerun = await wait_job(http, running.url, safe)
        assert (rerun["status"], rerun["attempts"]) == ("completed", 2)
        assert await _count(http, alice) == 0  # the unsafe call never ran twice (nor completed once)


@pytest.mark.slow  # a fault test
async def test_a_safe_job_whose_bridge_is_gone_runs_again_where_its_session_runs_next(http, redis_server):
    """The session's bridge itself is gone (as a pod on a lost node): a retry-safe job is re-run where a router
    finds the session next (here the local backend starts a new bridge); an unsafe one fails SESSION_LOST."""
    async with router_app(redis_server.url, local_bridges="process") as running, worker_processes(redis_server.url):
        alice = running.user_url("alice")
        await _count(http, alice)
        [session] = running.router.backend.sessions.values()  # type: ignore[attr-defined]
        gone = session.endpoint.url
        unsafe = (await _hand_off(http, alice, "counter", delay_s=30))["job_id"]
        safe = (await _hand_off(http, alice, "slow", seconds=2))["job_id"]
        await wait_until(lambda: _status(http, running.url, unsafe, "running"))
        await wait_until(lambda: _status(http, running.url, safe, "running"))
        session.proc.kill()  # the bridge process, its server with it

        lost = await wait_job(http, running.url, unsafe)
        assert (lost["status"], lost["error"]["code"]) == ("failed", "SESSION_LOST")
        rerun = await wait_job(http, running.url, safe)
        assert (rerun["status"], rerun["attempts"]) == ("completed", 2), rerun
        assert rerun["result"]["content"][0]["text"] == "Slept 2.0 seconds"
        [now] = running.router.backend.list("alice")
        assert now.endpoint.url != gone  # it ran in the session's new bridge
        assert await _count(http, alice) == 0  # the unsafe call never ran twice


async def test_the_backlog_autoscalers_read_is_measured(http, redis_server):
    """Jobs no worker has taken yet: how many, and the oldest one's age (pier_jobs_queue_lag and
    pier_jobs_oldest_queued_age_seconds; /v1/queue for KEDA)."""
    from pier.core.jobstore import JobStore, connect

    async with router_app(redis_server.url) as running:
        alice = running.user_url("alice")
        await _count(http, alice)
        for _ in range(3):
            await _hand_off(http, alice, "slow", seconds=1)
        store = JobStore(connect(redis_server.url), 3600)
        await asyncio.sleep(0.5)
        stats = await store.queue_stats()
        assert (stats.queued, stats.following, stats.length) == (3, 0, 3)
        assert stats.oldest_queued_s >= 0.5
        port = free_port()
        async with worker_processes(redis_server.url, PIER_JOBS_PORT=str(port)):
            await wait_until(lambda: _queue_empty(store), timeout=30)
            async with http.get(f"http://127.0.0.1:{port}/v1/queue") as response:
                queue = await response.json()
            assert set(queue) == {"queued", "oldest_queued_seconds", "following", "length"}
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
            assert "pier_jobs_queue_lag " in metrics
            assert "pier_jobs_oldest_queued_age_seconds " in metrics
        await store.redis.aclose()


async def _queue_empty(store) -> bool:
    return (await store.queue_stats()).queued == 0


async def get_json_auth(http, url: str, headers: dict) -> dict:
    async with http.get(url, headers=headers) as response:
        return await response.json()


async def test_an_idempotency_key_returns_the_same_job(http, redis_server):
    async with router_app(redis_server.url) as running, worker_processes(redis_server.url):
        alice = running.user_url("alice")
        headers = {"Idempotency-Key": "ticket-7"}
        first = await _hand_off(http, alice, "counter", headers, delay_s=2)
        async with http.post(
            f"{alice}/tools/counter/call", json={"arguments": {"delay_s": 2}, "timeout_s": 0.3}, headers=headers
        ) as response:
            again = await response.json()
        assert again["job_id"] == first["job_id"]
        final = await wait_job(http, running.url, first["job_id"])
        async with http.post(
            f"{alice}/tools/counter/call", json={"arguments": {"delay_s": 2}}, headers=headers
        ) as response:
            third = await response.json()
        assert third["result"] == final["result"]
        assert await _count(http, alice) == 1


@pytest.mark.slow  # a fault test (dead-lettering also runs in tests/core/test_redis_keys.py)
async def test_a_failing_webhook_receiver_is_dead_lettered_and_stalls_nothing(http, redis_server):
    async with (
        Receiver(fail_with=500) as receiver,
        router_app(redis_server.url, webhook_url=receiver.url) as running,
        worker_processes(redis_server.url, PIER_WEBHOOK_ATTEMPTS="3", PIER_WEBHOOK_BACKOFF_S="0.05"),
    ):
        first = (await _hand_off(http, running.user_url("alice"), "counter", delay_s=0.5))["job_id"]
        second = (await _hand_off(http, running.user_url("bob"), "counter", delay_s=0.5))["job_id"]
        assert (await wait_job(http, running.url, first))["status"] == "completed"
        assert (await wait_job(http, running.url, second))["status"] == "completed"
        await wait_until(lambda: _dead_letters(running, 2))
        assert len(receiver.received) == 6  # three attempts each
        dashboard = await get_json(http, f"{running.url}/v1/dashboard")
        assert dashboard["dead_letters"] == 2


async def _dead_letters(running, expected: int) -> bool:
    return int(await running.router.redis.llen(DEAD_LETTERS)) == expected
