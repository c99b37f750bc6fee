"""Faults and abuse, end to end: Redis outages during hand-offs, a worker killed, poison input, floods,
slow clients, servers that die at start or leave helpers behind.

Every test asserts invariants, not timings: each call's result reaches its caller or the call never
ran (the demo's `counter` counts its executions only once its delay is over, so a cancelled call
leaves no trace); nothing stays running or stuck; no 500; descriptors and tasks back to baseline.
Loops are bounded in count, and every wait has a bound that only guards against a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import uuid

import aiohttp
import pytest

from pier.cli.redis_server import free_port
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.redis_keys import job as job_key
from tests.servers import PIER, ROGUE, ROOT, get_json, router_app, wait_job, wait_until, worker_processes

pytestmark = pytest.mark.slow  # the fault-and-abuse suite: `make test` runs it, `make test-fast` does not


async def _post(http, url: str, body: object, headers: dict | None = None) -> tuple[int, dict]:
    async with http.post(url, json=body, headers=headers or {}) as response:
        return response.status, await response.json()


async def _count(http, user_url: str) -> int:
    status, body = await _post(http, f"{user_url}/tools/count/call", {"arguments": {}})
    assert status == 200, body
    return body["result"]["structuredContent"]["result"]


async def _bridge_status(http, running, user: str) -> dict:
    [session] = running.router.backend.list(user)
    async with http.get(f"{session.endpoint.url}/v1/status", headers=session.endpoint.headers()) as response:
        return await response.json()


def _nested(levels: int) -> object:
    value: object = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. Redis outages during hand-offs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("outage_s", "delay_s", "grace_s", "expected"),
    [
        (1.0, 3.0, 10.0, "queued"),  # Redis is back within the grace: every call is handed off
        (4.0, 1.5, 10.0, "answered"),  # the calls finish while their hand-offs wait: answered directly
        (5.0, 30.0, 1.5, "refused"),  # Redis stays away past the grace: cancelled, the caller retries
    ],
)
async def test_a_redis_outage_during_hand_offs_loses_no_result(
    http, redis_server, outage_s, delay_s, grace_s, expected
):
    async with (
        router_app(redis_server.url, handoff_grace_s=grace_s) as running,
        worker_processes(redis_server.url, count=2, PIER_VISIBILITY_TIMEOUT_S="2") as workers,
    ):
        users = [running.user_url(f"user-{n}") for n in range(8)]
        await asyncio.gather(*(_count(http, url) for url in users))  # sessions up before the outage

        body = {"arguments": {"delay_s": delay_s}, "timeout_s": 0.5}
        calls = [asyncio.create_task(_post(http, f"{url}/tools/counter/call", body)) for url in users for _ in range(3)]
        await redis_server.stop()  # before any call reaches its hand-off
        await asyncio.sleep(outage_s)
        await redis_server.start()
        answers = await asyncio.gather(*calls)

        statuses = sorted({status for status, _ in answers})
        reachable = 0
        if expected == "queued":
            assert statuses == [202], answers
            workers[0].send_signal(signal.SIGKILL)  # one worker dies too: the other takes its jobs
            await workers[0].wait()
            finals = await asyncio.gather(*(wait_job(http, running.url, b["job_id"], 90) for _, b in answers))
            assert [f["status"] for f in finals] == ["completed"] * len(answers)
            reachable = len(finals)
        elif expected == "answered":
            assert statuses == [200], answers
            reachable = len(answers)
        else:
            assert statuses == [503], answers
            for _, answer in answers:
                assert answer["error"]["code"] == "STORE_UNAVAILABLE"
                assert answer["error"]["details"]["cancelled"] is True
        # Every execution reached its caller, and nothing is left running in any session.
        assert sum([await _count(http, url) for url in users]) == reachable
        for n in range(len(users)):
            assert (await _bridge_status(http, running, f"user-{n}"))["calls_running"] == 0


async def test_keyed_calls_across_a_redis_outage_replay_their_one_result(http, redis_server):
    async with router_app(redis_server.url) as running:
        users = [running.user_url(f"user-{n}") for n in range(4)]
        await asyncio.gather(*(_count(http, url) for url in users))
        body = {"arguments": {"delay_s": 2}, "timeout_s": 20}
        keys = {url: {"Idempotency-Key": uuid.uuid4().hex} for url in users}
        calls = [asyncio.create_task(_post(http, f"{url}/tools/counter/call", body, keys[url])) for url in users]

        async def all_running() -> bool:
            states = [await _bridge_status(http, running, f"user-{n}") for n in range(len(users))]
            return all(s["calls_running"] == 1 for s in states)

        await wait_until(all_running)  # keys claimed, calls under way
        await redis_server.stop()
        first = await asyncio.gather(*calls)  # they finish while Redis is away: answered all the same
        assert [status for status, _ in first] == [200] * len(users), first
        await redis_server.start()

        # Once Redis is back, every outcome is recorded: a resend replays it, the tool does not run again.
        async def settled() -> bool:
            raws = [await running.router.redis.get(job_key(k)) for k in await _job_ids(running)]
            return len(raws) == len(users) and all(json.loads(r)["status"] == "completed" for r in raws if r)

        await wait_until(settled)
        for (_, answer), url in zip(first, users, strict=True):
            status, again = await _post(http, f"{url}/tools/counter/call", body, keys[url])
            assert status == 200
            assert again["result"] == answer["result"]
            assert await _count(http, url) == 1


async def _job_ids(running) -> list[str]:
    keys = [k.decode() async for k in running.router.redis.scan_iter("pier:idem:*")]
    return [(await running.router.redis.get(k)).decode() for k in keys]


async def test_a_refused_keyed_hand_off_releases_its_key(http, redis_server):
    async with router_app(redis_server.url, handoff_grace_s=1) as running:
        alice = running.user_url("alice")
        await _count(http, alice)
        key = {"Idempotency-Key": "charge-42"}
        body = {"arguments": {"delay_s": 30}, "timeout_s": 0.5}
        call = asyncio.create_task(_post(http, f"{alice}/tools/counter/call", body, key))
        await wait_until(lambda: _running_calls(http, running, "alice", 1))
        await redis_server.stop()
        status, answer = await call
        assert (status, answer["error"]["code"]) == (503, "STORE_UNAVAILABLE")
        await redis_server.start()
        # The key was never bound to a result: the resend runs the call (once), it does not replay an error.
        await wait_until(lambda: _key_gone(running, "alice", "charge-42"))
        status, answer = await _post(http, f"{alice}/tools/counter/call", {"arguments": {}}, key)
        assert (status, answer["result"]["structuredContent"]["result"]) == (200, 1)
        assert await _count(http, alice) == 1


async def _running_calls(http, running, user: str, count: int) -> bool:
    return (await _bridge_status(http, running, user))["calls_running"] == count


async def _key_gone(running, user: str, key: str) -> bool:
    return not await running.router.redis.exists(f"pier:idem:{user}:demo:{key}")


async def test_job_routes_say_when_redis_is_away(http, redis_server):
    async with router_app(redis_server.url) as running:
        await redis_server.stop()
        async with http.get(f"{running.url}/v1/jobs/some-job") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "STORE_UNAVAILABLE"
        # A keyed call cannot be recorded: refused before anything runs (no session was even started).
        body, key = {"arguments": {"message": "x"}}, {"Idempotency-Key": "k"}
        status, answer = await _post(http, f"{running.user_url('alice')}/tools/echo/call", body, key)
        assert (status, answer["error"]["code"]) == (503, "STORE_UNAVAILABLE")
        assert not running.router.backend.list("alice")


# -- 2. Poison input ------------------------------------------------------------------------------


async def test_deeply_nested_json_is_refused_at_every_door(http, redis_server):
    catalog = Catalog([demo_profile(), Profile(name="rogue", command=ROGUE)])
    async with router_app(redis_server.url, catalog, max_sessions=1) as running:
        alice = running.user_url("alice")
        deep = {"message": "x", "extra": _nested(300)}

        status, answer = await _post(http, f"{alice}/tools/echo/call", {"arguments": deep})
        assert (status, answer["error"]["code"]) == (400, "BAD_REQUEST")
        assert "nested more than 128 levels" in answer["error"]["message"]
        status, answer = await _post(
            http, f"{running.url}/chat", {"user_id": "alice", "tool_name": "echo", "tool_args": deep}
        )
        assert (status, answer["error_code"]) == (400, "BAD_REQUEST")
        message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": deep}}
        status, answer = await _post(http, f"{alice}/mcp", message, {"Accept": "application/json, text/event-stream"})
        assert (status, answer["error"]["code"]) == (400, -32700)
        async with http.ws_connect(alice.replace("http://", "ws://") + "/ws") as ws:
            await ws.send_str(json.dumps(message))
            assert json.loads((await ws.receive()).data)["error"]["code"] == -32700
        # Straight at the bridge, too.
        [session] = running.router.backend.list("alice")
        call = {"tool": "echo", "arguments": deep}
        status, answer = await _post(http, f"{session.endpoint.url}/v1/calls", call, session.endpoint.headers())
        assert (status, answer["error"]["code"]) == (400, "BAD_REQUEST")
        assert (await _bridge_status(http, running, "alice"))["calls_running"] == 0

        # A server answering too deeply: its caller hears why, and the call is over.
        await running.router.backend.end("alice", "demo")
        rogue = running.user_url("alice", "rogue")
        status, answer = await _post(http, f"{rogue}/tools/deep/call", {"arguments": {"levels": 300}})
        assert (status, answer["error"]["code"]) == (502, "SERVER_ERROR")
        assert "nested more than 128 levels" in answer["error"]["message"]
        # Less deep is fine, both ways.
        status, answer = await _post(
            http, f"{rogue}/tools/echo/call", {"arguments": {"message": "ok", "x": _nested(100)}}
        )
        assert (status, answer["result"]["content"][0]["text"]) == (200, "Echo: ok")
        status, answer = await _post(http, f"{rogue}/tools/deep/call", {"arguments": {"levels": 100}})
        assert status == 200, answer
        assert (await _bridge_status(http, running, "alice"))["calls_running"] == 0
        # With a pool of one, the idle session makes room for a new user: nothing is stuck busy.
        status, _ = await _post(http, f"{running.user_url('bob')}/tools/echo/call", {"arguments": {"message": "hi"}})
        assert status == 200


async def test_user_ids_are_matched_whole(http, redis_server):
    async with router_app(redis_server.url) as running:
        async with http.get(f"{running.url}/v1/users/alice%0A/servers/demo/tools") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "BAD_REQUEST"
        assert not running.router.backend.list()


async def test_an_idempotency_key_is_refused_for_another_call(http, redis_server):
    async with router_app(redis_server.url) as running:
        alice = running.user_url("alice")
        key = {"Idempotency-Key": "order-7"}
        status, first = await _post(http, f"{alice}/tools/echo/call", {"arguments": {"message": "a"}}, key)
        assert status == 200
        for tool, arguments in (("counter", {}), ("echo", {"message": "b"})):
            status, answer = await _post(http, f"{alice}/tools/{tool}/call", {"arguments": arguments}, key)
            assert (status, answer["error"]["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
        status, again = await _post(http, f"{alice}/tools/echo/call", {"arguments": {"message": "a"}}, key)
        assert (status, again["result"]) == (200, first["result"])
        assert await _count(http, alice) == 0  # counter never ran


# -- 3. Job streams are not public ----------------------------------------------------------------


async def test_bridgekit_job_events_need_the_owners_key(http, redis_server):
    async with (
        router_app(redis_server.url, app_keys=["app"], user_keys={"alice-key": "alice", "bob-key": "bob"}) as running,
        worker_processes(redis_server.url),
    ):
        alice = {"Authorization": "Bearer alice-key"}
        body = {"arguments": {"seconds": 0.5}, "timeout_s": 0.1}
        status, queued = await _post(http, f"{running.user_url('alice')}/tools/slow/call", body, alice)
        assert status == 202
        events = f"{running.url}/mcp/events/{queued['job_id']}"
        async with http.get(events) as response:
            assert (response.status, (await response.json())["error_code"]) == (401, "MISSING_API_KEY")
        async with http.get(events, headers={"Authorization": "Bearer bob-key"}) as response:
            assert response.status == 403
        async with http.get(events, headers=alice) as response:
            frames = [line async for line in response.content if line.startswith(b"data: ")]
        [frame] = frames
        assert json.loads(frame[6:])["user_id"] == "alice"


# -- 4. A server that cannot start ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_a_server_that_exits_at_start_is_reported_at_once(http, redis_server, mode):
    broken = Profile(name="broken", command=["sh", "-c", "echo fatal: missing API token >&2; exit 7"])
    # A start timeout of an hour: only the early report can make this test finish.
    async with router_app(
        redis_server.url, Catalog([broken]), local_bridges=mode, session_start_timeout_s=3600
    ) as running:
        status, answer = await _post(http, f"{running.user_url('alice', 'broken')}/tools/x/call", {"arguments": {}})
    assert (status, answer["error"]["code"]) == (502, "SESSION_START_FAILED")
    details = answer["error"]["details"]
    assert details["exit_code"] == 7
    assert "fatal: missing API token" in details["stderr_tail"]
    assert "exited with code 7" in answer["error"]["message"]


# -- 5. A WebSocket flood -----------------------------------------------------------------------


async def test_a_websocket_flood_is_bounded_and_leaves_nothing_behind(http, redis_server):
    async with router_app(redis_server.url, ws_max_in_flight=16, ws_max_in_flight_per_user=24) as running:
        alice = running.user_url("alice")

        async def flood(count: int) -> list[dict]:
            async with http.ws_connect(alice.replace("http://", "ws://") + "/ws") as ws:
                init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "flood"}}
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}))
                answers: dict[int, dict] = {}
                while 0 not in answers:
                    answers.update(_answers_in(await ws.receive()))
                call = {"name": "slow", "arguments": {"seconds": 0.2}}
                for n in range(1, count + 1):  # all at once, without waiting for answers
                    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": call}))
                while len(answers) <= count:
                    answers.update(_answers_in(await ws.receive()))
                del answers[0]
                return list(answers.values())

        await _count(http, alice)  # the session exists, and the connections used below: what follows is the flood
        await _bridge_status(http, running, "alice")
        await flood(1)  # (and its server's handshake-era process, which a dual-era server starts for this era)
        fds, tasks = _open_fds(), len(asyncio.all_tasks())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        # Two sockets of one user: two floods of 1,000 requests against 16 per socket and 24 for the user.
        answers = [a for batch in await asyncio.gather(flood(1000), flood(1000)) for a in batch]
        done = [a for a in answers if "result" in a]
        refused = [a for a in answers if "error" in a]
        assert len(done) + len(refused) == 2000  # every request answered, none lost
        assert {a["error"]["data"]["code"] for a in refused} == {"CALL_QUEUE_FULL"}
        assert 24 <= len(done) < 2000

        # Descriptors and tasks return to where they were; memory grew by little; nothing runs on.
        await wait_until(lambda: _open_fds() <= fds and len(asyncio.all_tasks()) <= tasks, timeout=30)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        assert grown_kib < 64 * 1024, grown_kib
        assert (await _bridge_status(http, running, "alice"))["in_flight"] == 0
        # Other users were never shut out.
        assert (await _post(http, f"{running.user_url('bob')}/tools/echo/call", {"arguments": {"message": "hi"}}))[
            0
        ] == 200


def _answers_in(frame: aiohttp.WSMessage) -> dict[int, dict]:
    """The answers a frame carries, by request id (log notifications skipped)."""
    message = json.loads(frame.data)
    return {message["id"]: message} if "id" in message else {}


# -- 6. Helpers of a server die with the router -------------------------------------------------


def _processes_with(argv: list[str]) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == [a.encode() for a in argv]:
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_a_servers_helpers_die_with_a_killed_router(http, redis_server, mode):
    helper = ["sleep", f"{600 + uuid.uuid4().int % 1000}.{os.getpid()}"]  # a unique command line
    command = ["sh", "-c", f"{' '.join(helper)} & exec {sys.executable} {ROGUE[1]}"]
    port = free_port()
    env = {
        **os.environ, "PIER_PORT": str(port), "PIER_REDIS_URL": redis_server.url, "PIER_LOCAL_BRIDGES": mode,
        "PIER_PROFILES_INLINE": json.dumps({"profiles": {"spawner": {"command": command}}}),
        "PIER_LOCAL_SANDBOX_PATHS": json.dumps([str(ROOT)]),  # the rogue server, when sandboxed (as root)
    }  # fmt: skip
    router = await asyncio.create_subprocess_exec(*PIER, "router", env=env, stderr=asyncio.subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_until(lambda: _up(http, url), timeout=60)
        status, answer = await _post(
            http, f"{url}/v1/users/alice/servers/spawner/tools/echo/call", {"arguments": {"message": "x"}}
        )
        assert status == 200, answer
        assert _processes_with(helper)
        router.kill()
        await router.wait()
        await wait_until(lambda: not _processes_with(helper), timeout=30)
    finally:
        if router.returncode is None:
            router.kill()
            await router.wait()


async def _up(http, url: str) -> bool:
    try:
        return (await get_json(http, f"{url}/healthz"))["status"] == "ok"
    except aiohttp.ClientError:
        return False


# -- 7. Crashes: the culprit is not retried, bystanders are ---------------------------------------


async def test_a_call_that_crashes_its_server_is_not_retried(http, redis_server):
    async with router_app(redis_server.url) as running:
        alice = running.user_url("alice")
        await _count(http, alice)
        status, answer = await _post(http, f"{alice}/tools/crash/call", {"arguments": {}})
        assert (status, answer["error"]["code"]) == (502, "SERVER_EXITED")
        assert answer["error"]["details"]["retried"] is False
        assert answer["error"]["details"]["suspect"] is True
        await wait_until(lambda: _restarted(http, running, "alice", 1))
        assert await _count(http, alice) == 0  # the server answers again, after exactly one crash


async def test_a_read_only_call_hit_by_another_calls_crash_is_retried(http, redis_server):
    async with router_app(redis_server.url) as running:
        alice = running.user_url("alice")
        await _count(http, alice)
        slow = asyncio.create_task(_post(http, f"{alice}/tools/slow/call", {"arguments": {"seconds": 1}}))
        await wait_until(lambda: _running_calls(http, running, "alice", 1))
        status, crashed = await _post(http, f"{alice}/tools/crash/call", {"arguments": {}})
        assert (status, crashed["error"]["code"]) == (502, "SERVER_EXITED")
        status, answer = await slow
        assert (status, answer["result"]["content"][0]["text"]) == (200, "Slept 1.0 seconds")
        await wait_until(lambda: _restarted(http, running, "alice", 1))


async def _restarted(http, running, user: str, times: int) -> bool:
    status = await _bridge_status(http, running, user)
    return status["restarts"] == times and status["ready"]


# -- 8. Slow and oversized requests ----------------------------------------------------------------


async def test_slow_clients_and_huge_bodies_are_refused(http, redis_server):
    async with router_app(redis_server.url, header_timeout_s=1, body_timeout_s=1) as running:
        host, port = "127.0.0.1", int(running.url.rsplit(":", 1)[1])

        async def slow_headers() -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            try:
                return await reader.read()  # b"" once the router hangs up
            finally:
                writer.close()

        assert await asyncio.wait_for(asyncio.gather(*(slow_headers() for _ in range(100))), 60) == [b""] * 100

        async def exchange(head: bytes, body: bytes = b"") -> tuple[int, dict]:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head + body)
            try:
                status_line = await reader.readline()
                raw = await reader.read()
            finally:
                writer.close()
            return int(status_line.split()[1]), json.loads(raw.split(b"\r\n\r\n", 1)[1])

        call = b"POST /v1/users/alice/servers/demo/tools/echo/call HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        status, answer = await exchange(
            call + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n", b'{"ar'
        )
        assert (status, answer["error"]["code"]) == (408, "REQUEST_TIMEOUT")
        status, answer = await exchange(call + b"Content-Type: application/json\r\nContent-Length: 10737418240\r\n\r\n")
        assert (status, answer["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
