"""Commands of the real MCP servers the tests run, and helpers to run Pier components."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from mcp_types import CallToolResult, TextContent

from pier.sidecar.app import BRIDGE, Bridge, create_app
from pier.sidecar.config import SidecarSettings

if TYPE_CHECKING:  # the router is imported where a test runs one
    from pier.router.state import Router

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "deps" / "npm" / "node_modules"
DEMO = [sys.executable, "-m", "pier.examples.demo_server"]
ROGUE = [sys.executable, str(ROOT / "tests" / "mcp_servers" / "rogue_server.py")]  # misbehaves on request
PEEK = [sys.executable, str(ROOT / "tests" / "mcp_servers" / "peek_server.py")]  # looks around its machine
EVERYTHING = [
    "node",
    str(NODE_MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"),
    "stdio",
]
# The conformance suite's fixture: the mcp SDK's everything-server, a dual-era server with tasks of its own.
FIXTURE = [sys.executable, str(ROOT / "tests" / "conformance" / "fixture_server.py")]
INSPECTOR = ["node", str(NODE_MODULES / "@modelcontextprotocol" / "inspector-cli" / "build" / "index.js")]
PIER = [sys.executable, "-m", "pier.cli"]


@dataclass
class RunningBridge:
    url: str
    bridge: Bridge

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"


@contextlib.asynccontextmanager
async def serve(app: web.Application, **runner_args: Any) -> AsyncIterator[str]:
    """`app` served in-process on a free loopback port until the block ends; yields its URL."""
    runner = web.AppRunner(app, **runner_args)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class LoopbackApiAccess:
    """What a `KubeClient` needs of `ApiAccess` (which reads a kubeconfig), for an API server of a test's own:
    where it is, no credentials, no TLS."""

    def __init__(self, host: str) -> None:
        self.host, self.ssl = host, None

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": "identity"}


@contextlib.asynccontextmanager
async def bridge_app(wait_ready: bool = True, **settings: Any) -> AsyncIterator[RunningBridge]:
    """A bridge served in-process on a free loopback port (the same app `pier sidecar` runs)."""
    app = create_app(SidecarSettings(port=0, **settings))
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    running = RunningBridge(f"http://127.0.0.1:{runner.addresses[0][1]}", app[BRIDGE])
    try:
        if wait_ready:
            await running.bridge.upstream.wait_ready()
        yield running
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def sidecar_process(
    *command: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`pier sidecar --port 0 -- COMMAND` as a real process; yields its URL once it listens."""
    proc = await asyncio.create_subprocess_exec(
        *PIER,
        "sidecar",
        "--port",
        "0",
        "--",
        *command,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        url = json.loads(line)["url"]
        yield url, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll `predicate` (sync or async) until true; fail the test after `timeout` seconds."""

    async def loop() -> None:
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)

    await asyncio.wait_for(loop(), timeout)


async def get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> dict:
    async with session.get(url, headers=headers) as response:
        return await response.json()


@contextlib.asynccontextmanager
async def router_app(redis_url: str, catalog=None, port: int = 0, **settings: Any) -> AsyncIterator[RunningRouter]:
    """A router served in-process on a free loopback port, with the demo and everything profiles."""
    from pier.core.catalog import Catalog, Profile, demo_profile
    from pier.core.web import tcp_site
    from pier.router.app import create_app
    from pier.router.config import RouterSettings
    from pier.router.state import ROUTER

    if catalog is None:
        catalog = Catalog([demo_profile(), Profile(name="everything", command=EVERYTHING, trust_annotations=True)])
    # Sandboxed servers (the default as root) see the repository: the tests' servers live in it.
    settings.setdefault("local_sandbox_paths", [str(ROOT)])
    app = create_app(RouterSettings(redis_url=redis_url, port=0, **settings), catalog)
    runner = web.AppRunner(app, shutdown_timeout=5)
    try:
        await runner.setup()
        context = app[ROUTER].ssl_context
        site = tcp_site(runner, "127.0.0.1", port, context)  # as `pier up` listens
        await site.start()
        scheme = "https" if context else "http"
        yield RunningRouter(f"{scheme}://127.0.0.1:{runner.addresses[0][1]}", app[ROUTER])
    finally:
        await runner.cleanup()


@dataclass
class RunningRouter:
    url: str
    router: Router

    def user_url(self, user: str, server: str = "demo") -> str:
        return f"{self.url}/v1/users/{user}/servers/{server}"


@contextlib.asynccontextmanager
async def worker_processes(
    redis_url: str, count: int = 1, **env: str
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`pier jobs` worker processes (real, separate from the router), stopped at the end."""
    procs = []
    for n in range(count):
        settings = {"PIER_REDIS_URL": redis_url, "PIER_JOBS_PORT": "0", "PIER_WORKER_NAME": f"worker-{n}", **env}
        procs.append(await asyncio.create_subprocess_exec(*PIER, "jobs", env={**os.environ, **settings}))
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_job(http, base_url: str, job_id: str, timeout: float = 60.0) -> dict:
    """Poll a job until it ends; returns its final view."""

    async def done() -> bool:
        return (await get_json(http, f"{base_url}/v1/jobs/{job_id}"))["status"] in ("completed", "failed", "cancelled")

    await wait_until(done, timeout=timeout, interval=0.1)
    return await get_json(http, f"{base_url}/v1/jobs/{job_id}")


async def sse_events(http, url: str) -> list[tuple[str, dict]]:
    """Read a whole SSE stream: (event name, data) pairs, until the server closes it."""
    events: list[tuple[str, dict]] = []
    name = "message"
    async with http.get(url) as response:
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                name = "message"
    return events


class Metrics:
    """A `/metrics` page, parsed: what tests read instead of the components' private counters."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


async def scrape(http: aiohttp.ClientSession, base_url: str, headers: dict[str, str] | None = None) -> Metrics:
    """The metrics a router, bridge or worker serves at `base_url`/metrics."""
    async with http.get(f"{base_url}/metrics", headers=headers or {}) as response:
        assert response.status == 200
        return Metrics(await response.text())


def text_of(result: CallToolResult) -> str:
    """The text of a tool result's first content item (which must be text)."""
    content = result.content[0]
    assert isinstance(content, TextContent), content
    return content.text
