"""The router as several processes on one port (`PIER_PROCESSES`): each user's sessions in one process,
connections handed over to it, metrics and the dashboard adding up every process, a dead process replaced."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.cli.redis_server import free_port
from pier.router.processes import Peers
from tests.servers import PIER, ROOT, Metrics, wait_until

USERS = [f"user-{n}" for n in range(8)]  # with two processes, some of them are each one's


@dataclass
class Processes:
    url: str
    supervisor: asyncio.subprocess.Process

    def children(self) -> dict[int, int]:
        """Router process index → pid, from /proc (the supervisor's children)."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    argv = file.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == self.supervisor.pid and b"--process" in argv:
                found[int(argv[argv.index(b"--process") + 1])] = int(pid)
        return found


@contextlib.asynccontextmanager
async def processes(redis_url: str, count: int = 2, **env: str) -> AsyncIterator[Processes]:
    """`pier up` with `count` router processes (its Redis the test's), until the test ends."""
    settings = {
        "PIER_PROCESSES": str(count), "PIER_PORT": str(free_port()), "PIER_REDIS_URL": redis_url,
        "PIER_LOCAL_SANDBOX_PATHS": json.dumps([str(ROOT)]), **env,
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *PIER, "up", env={**os.environ, **settings}, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "pier up ended before it was up"
            if line.startswith("Pier is up:"):
                url = line.split(":", 1)[1].strip()
        yield Processes(url, proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 90)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def call(url: str, user: str, tool: str = "counter", **arguments: object) -> tuple[int, dict]:
    """One call on a connection of its own: the kernel picks the process that accepts it."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/users/{user}/servers/demo/tools/{tool}/call", json={"arguments": arguments}) as r,
    ):
        return r.status, await r.json()


async def scrape(url: str) -> Metrics:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        return Metrics(await response.text())


async def test_each_users_calls_reach_one_session_whichever_process_accepts_them(redis_server):
    async with processes(redis_server.url) as pier:
        # Four calls per user, each on a new connection: spread by the kernel, all in the user's one session.
        for expected in range(1, 5):
            answers = await asyncio.gather(*(call(pier.url, user) for user in USERS))
            assert [(status, body["result"]["structuredContent"]) for status, body in answers] == [
                (200, {"result": expected})
            ] * len(USERS)
        # One keep-alive connection for every user in turn: handed over as its users change.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            for user in USERS:
                url = f"{pier.url}/v1/users/{user}/servers/demo/tools/count/call"
                async with http.post(url, json={"arguments": {}}) as response:
                    assert (await response.json())["result"]["structuredContent"] == {"result": 4}

        metrics = await scrape(pier.url)
        assert metrics.value("pier_router_handovers_total", outcome="handed") > 0
        assert metrics.value("pier_router_handovers_total", outcome="failed") == 0
        # Every process's metrics, added up: each call counted once (by the process that served it).
        route = "/v1/users/{user}/servers/{server}/tools/{tool}/call"
        assert metrics.value("pier_router_requests_total", route=route, status="200") == 5 * len(USERS)
        assert metrics.value("pier_router_sessions_active", profile="demo") == len(USERS)

        async with aiohttp.ClientSession() as http, http.get(f"{pier.url}/v1/dashboard") as response:
            dashboard = await response.json()
        assert sorted(s["user"] for s in dashboard["sessions"]) == sorted(USERS)
        assert dashboard["totals"]["calls"] == 5 * len(USERS)


async def test_mcp_clients_and_websockets_are_served_by_their_users_process(redis_server):
    async with processes(redis_server.url) as pier:
        for user in USERS[:4]:
            url = f"{pier.url}/v1/users/{user}/servers/demo/mcp"
            async with (
                httpx2.AsyncClient(timeout=60) as client,
                # (the handshake, as the WebSocket below: a dual-era server speaks each era from its own process)
                Client(streamable_http_client(url, http_client=client), mode="legacy") as mcp,
            ):
                for expected in (1, 2):
                    assert (await mcp.call_tool("counter", {})).structured_content == {"result": expected}
        async with aiohttp.ClientSession() as http:
            for user in USERS[:4]:
                ws_url = f"{pier.url.replace('http://', 'ws://')}/v1/users/{user}/servers/demo/ws"
                async with http.ws_connect(ws_url) as ws:
                    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "ws"}}
                    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}))
                    assert json.loads((await ws.receive()).data)["result"]["serverInfo"]["name"] == "pier-demo"
                    await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
                    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                                  "params": {"name": "count", "arguments": {}}}))  # fmt: skip
                    assert json.loads((await ws.receive()).data)["result"]["structuredContent"] == {"result": 2}


async def test_a_process_that_dies_is_replaced_and_its_users_served_again(redis_server):
    async with processes(redis_server.url) as pier:
        for user in USERS:
            assert (await call(pier.url, user))[0] == 200
        children = pier.children()
        assert sorted(children) == [0, 1]
        os.kill(children[1], signal.SIGKILL)

        async def all_served() -> bool:
            # (a connection the dead process had accepted but not yet served is reset: that is a retry too)
            answers = await asyncio.gather(*(call(pier.url, u) for u in USERS), return_exceptions=True)
            return all(not isinstance(answer, BaseException) and answer[0] == 200 for answer in answers)

        await wait_until(all_served, timeout=120, interval=0.5)
        assert pier.children()[1] != children[1]
        # The dead process's users started afresh (their sessions died with it); the others' went on.
        counts = {user: (await call(pier.url, user, "count"))[1]["result"]["structuredContent"]["result"]
                  for user in USERS}  # fmt: skip
        peers = Peers(0, 2, ROOT)
        survivors = [counts[user] for user in USERS if peers.owner(user) == 0]
        restarted = [counts[user] for user in USERS if peers.owner(user) == 1]
        assert max(restarted) < min(survivors)  # (both sides have users: see USERS)


async def test_several_processes_cannot_serve_https_themselves(redis_server, tmp_path):
    env = {
        **os.environ, "PIER_PROCESSES": "2", "PIER_REDIS_URL": redis_server.url,
        "PIER_TLS_CERT": str(tmp_path / "cert.pem"),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*PIER, "router", env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "pier router: PIER_PROCESSES > 1 with PIER_TLS_CERT" in err.decode()
