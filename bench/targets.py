"""The systems under test, each started fresh, on loopback, with server-everything behind it.

A target hands out clients: `client(user)` is one caller with its own session (a new user),
`clients_one_user(n)` is n callers sharing one user's session. The memory scenario needs
the process ids, so each target also says which processes are its own.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers
from bench.clients import (
    CallApiClient,
    Caller,
    ModernHttpClient,
    RestClient,
    SdkClient,
    StdioClient,
    StreamableHttpClient,
    sdk_client,
)
from bench.processes import Proc, free_port, running, spawn, wait_http

APP_KEY = "bench-app-key"  # the router runs with one app key, as a deployment would
AUTH = {"Authorization": f"Bearer {APP_KEY}"}
PROFILE = "everything"
POOLED_PROFILE = "everything-pooled"


class Target(abc.ABC):
    """A path from a client to server-everything's `echo`."""

    key: str  # short id used in results
    label: str  # what the table shows
    has_sdk: bool = True

    @abc.abstractmethod
    async def client(self, user: str) -> Caller:
        """A ready caller for `user` (its own session, started if need be)."""

    async def clients_one_user(self, n: int) -> list[Caller]:
        """n callers on one user's session (by default: n callers of the same user)."""
        return [await self.client("bench") for _ in range(n)]

    def sdk(self) -> contextlib.AbstractAsyncContextManager[SdkClient]:
        raise NotImplementedError


# -- direct stdio ------------------------------------------------------------------------------


class Direct(Target):
    """The physical baseline: the bench's own stdio client on the server process itself."""

    key = "direct"
    label = "direct stdio"

    async def client(self, user: str) -> Caller:
        client = await StdioClient.start(peers.EVERYTHING)
        await client.initialize()
        return client

    async def clients_one_user(self, n: int) -> list[Caller]:
        # One server, one pipe: concurrent callers pipeline their requests on it.
        shared = await self.client("bench")
        return [_Shared(shared, owner=i == 0) for i in range(n)]

    def sdk(self) -> contextlib.AbstractAsyncContextManager[SdkClient]:
        # The SDK passes the server's stderr through; its start-up banner would clutter the table.
        return sdk_client(["/bin/sh", "-c", 'exec "$0" "$@" 2>/dev/null', *peers.EVERYTHING])


@dataclass
class _Shared:
    """One caller used by several tasks; only the first one closes it."""

    inner: Caller
    owner: bool

    async def echo(self) -> None:
        await self.inner.echo()

    async def close(self) -> None:
        if self.owner:
            await self.inner.close()


# -- MCP over Streamable HTTP ------------------------------------------------------------------


class McpHttp(Target):
    """Anything serving MCP Streamable HTTP; `url_for(user)` is the endpoint for a user."""

    def __init__(self, key: str, label: str, url_template: str, headers: dict[str, str] | None = None) -> None:
        self.key = key
        self.label = label
        self.url_template = url_template  # may contain {user}
        self.headers = headers or {}

    def url_for(self, user: str) -> str:
        return self.url_template.format(user=user)

    async def client(self, user: str, accept: str | None = None) -> Caller:
        kwargs: dict[str, Any] = {"accept": accept} if accept else {}
        client = StreamableHttpClient(self.url_for(user), self.headers, **kwargs)
        await client.initialize()
        return client

    async def modern_client(self, user: str) -> Caller:
        """A lean 2026-07-28 client (no session: each request stands alone)."""
        return ModernHttpClient(self.url_for(user), self.headers)

    async def clients_one_user(self, n: int) -> list[Caller]:
        # One MCP session, n connections: the session's server sees n callers at once.
        first = StreamableHttpClient(self.url_for("bench"), self.headers)
        session_id = await first.initialize()
        rest = [StreamableHttpClient(self.url_for("bench"), self.headers, session_id) for _ in range(n - 1)]
        return [first, *rest]

    def sdk(self) -> contextlib.AbstractAsyncContextManager[SdkClient]:
        return sdk_client(self.url_for("bench"), self.headers or None)


class Rest(Target):
    """Pier's router REST call."""

    key = "router-rest"
    label = "Pier router REST"
    has_sdk = False

    def __init__(self, base: str, key: str = key, label: str = label) -> None:
        self.base = base
        self.key, self.label = key, label

    async def client(self, user: str) -> Caller:
        return RestClient(self.base, user, PROFILE, AUTH)


class CallApi(Target):
    """The bridge's own call API (`POST /v1/calls`), what the router uses inside."""

    key = "sidecar-calls"
    label = "Pier sidecar /v1/calls"
    has_sdk = False

    def __init__(self, base: str) -> None:
        self.base = base

    async def client(self, user: str) -> Caller:
        return CallApiClient(self.base)


# -- starting them -----------------------------------------------------------------------------


@dataclass
class Running:
    """A started system: its targets and its processes (for memory and profiling)."""

    targets: list[Target]
    procs: dict[str, Proc] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def mcp_proxy(logs: Path) -> AsyncIterator[Running]:
    port = free_port()
    async with running("mcp-proxy", peers.mcp_proxy_command(port, peers.EVERYTHING), logs) as proc:
        url = f"http://127.0.0.1:{port}/mcp"
        await wait_http(url, proc, ok=())
        yield Running([McpHttp("mcp-proxy", f"mcp-proxy {peers.Pins.load().mcp_proxy}", url)], {"peer": proc})


@contextlib.asynccontextmanager
async def supergateway(logs: Path) -> AsyncIterator[Running]:
    port = free_port()
    cmd = peers.supergateway_command(port, peers.EVERYTHING)
    async with running("supergateway", cmd, logs, env=peers.supergateway_env()) as proc:
        url = f"http://127.0.0.1:{port}/mcp"
        await wait_http(url, proc, ok=())
        label = f"supergateway {peers.Pins.load().supergateway}"
        yield Running([McpHttp("supergateway", label, url)], {"peer": proc})


async def read_listening(proc: Proc, timeout: float = 60.0) -> str:
    """The URL from `pier sidecar`'s one machine-readable stdout line."""
    assert proc.proc.stdout is not None
    line = await asyncio.wait_for(proc.proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"the sidecar exited before listening:\n{proc.tail()}")
    return str(json.loads(line)["url"])


def sidecar_command(pier: list[str] | None = None) -> list[str]:
    return [*(pier or peers.PIER), "sidecar", "--host", "127.0.0.1", "--port", "0", "--", *peers.EVERYTHING]


@contextlib.asynccontextmanager
async def sidecar(
    logs: Path, env: dict[str, str] | None = None, pier: list[str] | None = None
) -> AsyncIterator[Running]:
    """`pier sidecar --port 0 -- node …/dist/index.js stdio`, as an operator would run it.

    `pier` replaces the command that runs Pier (experiments run it with patches loaded).
    """
    cmd = sidecar_command(pier)
    async with running("sidecar", cmd, logs, env={**os.environ, **(env or {})}, stdout_pipe=True) as proc:
        base = await read_listening(proc)
        await wait_http(f"{base}/readyz", proc)
        targets: list[Target] = [McpHttp("sidecar-mcp", "Pier sidecar /mcp", f"{base}/mcp"), CallApi(base)]
        yield Running(targets, {"sidecar": proc}, {"url": base})


def router_env(data_dir: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    catalog = {
        "profiles": {
            PROFILE: {"description": "server-everything (bench)", "command": peers.EVERYTHING},
            # The same server with a warm pool: a new user's first call claims a started session.
            POOLED_PROFILE: {
                "description": "server-everything, pooled (bench)",
                "command": peers.EVERYTHING,
                "warm_pool": 3,
            },
        }
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIER_")}
    env.update(
        {
            "PIER_HOST": "127.0.0.1",
            "PIER_PORT": str(port),
            "PIER_PROFILES_INLINE": json.dumps(catalog),  # YAML is a superset of JSON
            "PIER_APP_KEYS": json.dumps([APP_KEY]),
            # Room for the memory scenario's 100 sessions plus the cold-start and sweep users.
            "PIER_MAX_SESSIONS": "400",
            # Sessions are isolated (as root: a sandbox and a uid each); server-everything lives here.
            "PIER_LOCAL_SANDBOX_PATHS": json.dumps([str(peers.ROOT / "deps" / "npm")]),
            **(extra or {}),
        }
    )
    return env


@contextlib.asynccontextmanager
async def router(
    logs: Path, data_dir: Path, extra_env: dict[str, str] | None = None, pier: list[str] | None = None
) -> AsyncIterator[Running]:
    """`pier up` (its own redis-server, a job worker, local sessions) with an everything profile.

    Its bridges run under the same Python as the router (`sys.executable`), so `pier` also
    decides how they run. Its Redis is one like `pier up`'s own, started here: `pier up` keeps the
    password of its own to itself, and the hand-off scenario reads job records.
    """
    from pier.cli.redis_server import RedisServer

    port = free_port()
    cmd = [*(pier or peers.PIER), "up", "--data-dir", str(data_dir)]
    async with RedisServer(data_dir / "redis") as redis:
        env = router_env(data_dir, port, {"PIER_REDIS_URL": redis.url, **(extra_env or {})})
        proc = await spawn("router", cmd, logs, env=env, stdout_pipe=True)
        try:
            await _read_banner(proc)
            base = f"http://127.0.0.1:{port}"
            await wait_http(f"{base}/readyz", proc)
            url = base + "/v1/users/{user}/servers/" + PROFILE + "/mcp"
            targets: list[Target] = [Rest(base), McpHttp("router-mcp", "Pier router MCP relay", url, AUTH)]
            yield Running(targets, {"router": proc}, {"url": base, "redis_url": redis.url})
        finally:
            await proc.stop(grace=40)


async def _read_banner(proc: Proc, timeout: float = 60.0) -> dict[str, str]:
    """`pier up` prints a banner on stdout once it listens; it names its Redis."""
    assert proc.proc.stdout is not None
    found: dict[str, str] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while "url" not in found or "redis" not in found:
        remaining = deadline - asyncio.get_running_loop().time()
        line = await asyncio.wait_for(proc.proc.stdout.readline(), max(remaining, 0.1))
        if not line:
            raise RuntimeError(f"pier up exited before it was up:\n{proc.tail()}")
        text = line.decode().strip()
        if text.startswith("Pier is up:"):
            found["url"] = text.split(":", 1)[1].strip()
        elif text.startswith("redis "):
            found["redis"] = text.split(None, 1)[1].strip()
    # Keep draining stdout so pier up never blocks on a full pipe.
    asyncio.get_running_loop().create_task(_drain(proc))
    return found


async def _drain(proc: Proc) -> None:
    assert proc.proc.stdout is not None
    with contextlib.suppress(Exception):
        while await proc.proc.stdout.read(65536):
            pass
