"""How a local session's bridge runs (`PIER_LOCAL_BRIDGES`), and how it stops.

- ``inprocess`` (default): the bridge app runs in the router's own process and event loop. A new
  session costs its server's start and little else (no Python start-up and imports: a first call
  ~0.3 s sooner, a few MiB per session instead of ~35), and the router's own calls reach the
  bridge directly (`InProcessBridge`) instead of through a second HTTP hop. The bridge is still
  served on a loopback port (with its token, and internal mTLS if configured) for the MCP relay
  and the job pool.
- ``process``: each bridge a `pier sidecar` process, exactly as a pod runs it (`HttpBridge`).

Either way the server is a child process of the bridge, and the same bridge code runs; with
isolation (`isolation`), the bridge confines it with the session's lease.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from pier.core.callapi import BridgeHandle, Endpoint, HttpBridge
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import loads
from pier.core.process import clean_env, die_with_parent
from pier.core.tls import server_context
from pier.core.web import tcp_site
from pier.router.accounts.service import Credential
from pier.router.backends.base import Session, SessionKey
from pier.router.backends.local.isolation import Isolation, Lease
from pier.router.config import RouterSettings
from pier.sidecar.app import BRIDGE, Bridge, create_app
from pier.sidecar.config import ENV_PREFIX, SidecarSettings
from pier.sidecar.embedded import InProcessBridge

log = logging.getLogger("pier.router.local")

SIDECAR = [sys.executable, "-m", "pier.sidecar"]  # its own entry point: no CLI (nor router) imported
_STOP_GRACE_S = 30.0  # a bridge process's own grace period for its calls, plus slack
_STOP_SLACK_S = 10.0  # an in-process bridge's stop: beyond its drain and kill steps


@dataclass(eq=False, kw_only=True)
class LocalSession(Session):
    """A local session; how its bridge runs (and stops) is the subclass's business."""

    profile: Profile
    lease: Lease | None = None  # its isolation slot, released once its server is gone
    credential: Credential | None = None  # the user's upstream token its server has (profiles with one)
    retiring: bool = False  # its server's token is outdated and only a restart gives it the new one: once idle

    @property
    def alive(self) -> bool:
        return not self.exited and self.state == "ready"

    @property
    @abc.abstractmethod
    def exited(self) -> bool:
        """The bridge is gone (or has given up on its server): the session cannot serve again."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the bridge (its in-flight calls get its grace period) and its server; release the lease."""

    async def release_lease(self) -> None:
        if self.lease is not None:
            await self.lease.release()


@dataclass(eq=False, kw_only=True)
class ProcessSession(LocalSession):
    """The bridge is a `pier sidecar` child process."""

    proc: asyncio.subprocess.Process

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    async def stop(self) -> None:
        try:
            await kill(self.proc, graceful=True)
        finally:
            await self.release_lease()


@dataclass(eq=False, kw_only=True)
class InProcessSession(LocalSession):
    """The bridge runs on the router's event loop; only its server is a child process."""

    runner: web.AppRunner
    app_bridge: Bridge
    stopping: set[asyncio.Task[None]]  # the runtime's: it waits for them when it closes
    stopped: bool = field(default=False)

    @property
    def exited(self) -> bool:
        # A bridge process exits when it gives up on its server; an in-process one just says so.
        return self.stopped or self.app_bridge.upstream.gave_up.is_set()

    async def stop(self) -> None:
        # Always graceful: the bridge drains its calls (none, after a failed start), then stops its server.
        if self.stopped:
            return
        self.stopped = True
        # It must finish even if the caller is cancelled (a half-stopped bridge would leave its
        # server running), so it is a task of its own, which the runtime waits for when it closes.
        task = asyncio.create_task(self._cleanup(), name=f"pier-stop-{self.key.user}-{self.key.profile}")
        self.stopping.add(task)
        task.add_done_callback(self.stopping.discard)
        # Bounded all the same: a stop that never ends must not hold the reaper or the router's shutdown.
        settings = self.app_bridge.settings
        budget = settings.shutdown_grace_s + 3 * settings.kill_timeout_s + _STOP_SLACK_S
        try:
            await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            log.error("bridge did not stop in time", extra={"user": self.key.user, "profile": self.key.profile})
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _cleanup(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            await self.release_lease()


class Runtime(abc.ABC):
    """Starts local sessions' bridges (ready, tools listed) and stops them."""

    def __init__(self, settings: RouterSettings, isolation: Isolation) -> None:
        self.settings = settings
        self.isolation = isolation
        # The router's own environment variables no server may inherit besides PIER_* (client secrets).
        self.private_env: frozenset[str] = frozenset()

    def server_base_env(self) -> dict[str, str]:
        """The router's environment as a server inherits it: without Pier's settings nor its secrets."""
        return {k: v for k, v in clean_env().items() if k not in self.private_env}

    async def start(
        self, key: SessionKey, profile: Profile, token: str, env: dict[str, str], warm_up: bool = False,
        files: dict[str, str] | None = None,
    ) -> LocalSession:  # fmt: skip
        """A started session (its server initialized, its tools listed); PierError when it cannot start.

        `env`: more environment for the server alone (the user's own secrets). `files`: path → content,
        files the server alone reads (the user's token file; sandboxed sessions only). `warm_up`: the
        bridge runs the server once through its call path before it is ready (pooled sessions). The
        session holds its isolation lease, if any: stopping it releases the lease.
        """
        lease = await self.isolation.lease()
        try:
            for path, content in (files or {}).items():
                if lease is None:
                    raise PierError("SESSION_START_FAILED", "a token file needs a sandboxed session")
                await lease.write_file(path, content)
            return await self._start(key, profile, token, env, warm_up, lease)
        except BaseException:
            if lease is not None:
                await lease.release()  # (a no-op if the failed session's stop released it)
            raise

    @abc.abstractmethod
    async def _start(
        self, key: SessionKey, profile: Profile, token: str, env: dict[str, str], warm_up: bool, lease: Lease | None
    ) -> LocalSession:
        """`start`, with the session's lease taken."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Wait for stops still under way."""

    def tls_settings(self) -> dict[str, Path]:
        """With internal mTLS, each bridge serves HTTPS and accepts only clients of the same CA."""
        s = self.settings
        if s.internal_tls_cert is None:
            return {}
        tls = {"tls_cert": s.internal_tls_cert}
        if s.internal_tls_key is not None:
            tls["tls_key"] = s.internal_tls_key
        if s.internal_tls_ca is not None:
            tls["tls_client_ca"] = s.internal_tls_ca
        return tls

    async def _list_tools(self, bridge: BridgeHandle, started: float) -> dict[str, dict[str, object]]:
        remaining = self.settings.session_start_timeout_s - (time.monotonic() - started)
        return {t["name"]: t for t in await bridge.tools(max(remaining, 1.0))}


class InProcessRuntime(Runtime):
    def __init__(self, settings: RouterSettings, isolation: Isolation) -> None:
        super().__init__(settings, isolation)
        self.stopping: set[asyncio.Task[None]] = set()
        # In-process bridges log through the router's handlers, at the bridges' own level.
        self._bridge_logger = logging.getLogger("pier.sidecar")
        self._saved_level = self._bridge_logger.level
        self._bridge_logger.setLevel(settings.sidecar_log_level.upper())

    async def _start(
        self, key: SessionKey, profile: Profile, token: str, env: dict[str, str], warm_up: bool, lease: Lease | None
    ) -> LocalSession:
        s = self.settings
        # What a bridge process would read from its environment: the profile's PIER_SIDECAR_*
        # values, then the router's choices. The server gets what it would get from a bridge
        # process: the router's environment without PIER_*, plus the profile's (without the
        # bridge's settings).
        settings = SidecarSettings.from_env(
            profile.env, command=profile.command, host="127.0.0.1", port=0, cwd=profile.cwd, token=token,
            max_concurrent_calls=profile.max_concurrent_calls, start_timeout_s=s.session_start_timeout_s,
            log_level=s.sidecar_log_level, warm_up=warm_up, **self.tls_settings(),
            **(lease.sidecar_settings() if lease else {}),
        )  # fmt: skip
        server_env = {
            **self.server_base_env(),
            **{k: v for k, v in profile.env.items() if not k.upper().startswith(ENV_PREFIX)},
            **env,
        }
        app = create_app(settings, server_env)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_grace_s + 1)
        bridge = InProcessBridge(app[BRIDGE], Endpoint("", token))
        session = InProcessSession(
            key, bridge, profile=profile, lease=lease, runner=runner, app_bridge=app[BRIDGE], stopping=self.stopping
        )
        started = time.monotonic()
        try:
            await runner.setup()
            ssl_context = None
            if settings.tls_cert is not None:
                ssl_context = server_context(
                    settings.tls_cert, settings.tls_key or settings.tls_cert, settings.tls_client_ca
                )
            site = tcp_site(runner, "127.0.0.1", 0, ssl_context)
            await site.start()
            scheme = "https" if ssl_context else "http"
            bridge.endpoint = Endpoint(f"{scheme}://127.0.0.1:{runner.addresses[0][1]}", token)
            session.tools = await self._list_tools(bridge, started)
        except BaseException:
            await session.stop()
            raise
        return session

    async def close(self) -> None:
        await asyncio.gather(*self.stopping, return_exceptions=True)
        self._bridge_logger.setLevel(self._saved_level)


class ProcessRuntime(Runtime):
    def __init__(
        self, settings: RouterSettings, isolation: Isolation, http: aiohttp.ClientSession, ssl: ssl.SSLContext | bool
    ) -> None:
        super().__init__(settings, isolation)
        self.http = http
        self.ssl = ssl

    async def _start(
        self, key: SessionKey, profile: Profile, token: str, env: dict[str, str], warm_up: bool, lease: Lease | None
    ) -> LocalSession:
        bridge_settings: dict[str, object] = {
            "token": token,
            "max_concurrent_calls": profile.max_concurrent_calls,
            "start_timeout_s": self.settings.session_start_timeout_s,
            "log_level": self.settings.sidecar_log_level,
            "warm_up": str(warm_up).lower(),
            **self.tls_settings(),
            **(lease.sidecar_settings() if lease else {}),
        }
        env = {
            **self.server_base_env(),  # the router's own settings (keys!) never reach a session
            **profile.env,
            **env,
            **{ENV_PREFIX + name.upper(): _env_value(value) for name, value in bridge_settings.items()},
        }
        proc = await asyncio.create_subprocess_exec(
            *SIDECAR, "--host", "127.0.0.1", "--port", "0", "--", *profile.command,
            stdout=subprocess.PIPE, env=env, cwd=profile.cwd, preexec_fn=die_with_parent,
        )  # fmt: skip
        bridge = HttpBridge(self.http, Endpoint("", token), self.ssl)
        session = ProcessSession(key, bridge, profile=profile, lease=lease, proc=proc)
        started = time.monotonic()
        try:
            bridge.endpoint = Endpoint(await self._listening_url(proc), token)
            session.tools = await self._list_tools(bridge, started)
        except BaseException:
            await kill(proc)
            raise
        return session

    async def _listening_url(self, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), self.settings.session_start_timeout_s)
        if not line:
            code = await proc.wait()
            raise PierError("SESSION_START_FAILED", f"the bridge exited with code {code} before listening")
        url: str = loads(line)["url"]
        return url


def _env_value(value: object) -> str:
    """A bridge setting as its environment variable (lists as JSON)."""
    return json.dumps(value) if isinstance(value, list) else str(value)


async def kill(proc: asyncio.subprocess.Process, graceful: bool = False) -> None:
    """Stop a bridge process (graceful: SIGTERM, so it drains its calls) and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
