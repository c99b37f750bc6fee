"""Local sessions: each one a bridge on loopback, on its own port, with its server a child process.

`PIER_LOCAL_BRIDGES` says where the bridges run:

- ``inprocess`` (default): in the router's own process and event loop. A new session costs its
  server's start and little else (no Python start-up and imports: a first call ~0.3 s sooner, a few
  MiB per session instead of ~35), and REST calls reach the bridge's call registry directly
  instead of through a second HTTP hop. The bridge is still served on a loopback port (with its
  token, and internal mTLS if configured) for the MCP relay and the job pool.
- ``process``: each bridge a `pier sidecar` process, exactly as a pod runs it.

The same bridge code runs either way. Idle sessions are reaped, the pool is bounded (least recently
used idle session evicted first), and a session whose bridge died is started afresh on the next request.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import logging
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

from pier.core import logs
from pier.core.bridge import BridgeClient, Endpoint
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import loads
from pier.core.process import clean_env, die_with_parent
from pier.core.tls import server_context
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.sidecar.app import BRIDGE, Bridge, create_app
from pier.sidecar.config import ENV_PREFIX, SidecarSettings

log = logging.getLogger("pier.router.local")

SIDECAR = [sys.executable, "-m", "pier.sidecar"]  # its own entry point: no CLI (nor router) imported
_STOP_GRACE_S = 30.0  # a bridge's own grace period for its calls, plus slack
_STOP_SLACK_S = 10.0  # an in-process bridge's stop: beyond its drain and kill steps


class LocalSession(Session):
    """A local session; how its bridge runs (and stops) is the subclass's business."""

    profile: Profile

    @property
    def alive(self) -> bool:
        return not self.exited and self.state == "ready"

    @property
    @abc.abstractmethod
    def exited(self) -> bool:
        """The bridge is gone (or has given up on its server): the session cannot serve again."""

    @abc.abstractmethod
    async def stop(self, graceful: bool) -> None:
        """Stop the bridge (graceful: its in-flight calls get its grace period), and its server."""


class ProcessSession(LocalSession):
    """The bridge is a `pier sidecar` child process."""

    proc: asyncio.subprocess.Process

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    async def stop(self, graceful: bool) -> None:
        await _kill(self.proc, graceful)


class InProcessSession(LocalSession):
    """The bridge runs on the router's event loop; only its server is a child process."""

    runner: web.AppRunner
    bridge: Bridge
    client: BridgeClient
    stopping: set[asyncio.Task[None]]  # the backend's: it waits for them when it closes
    _stopped: bool = False

    @property
    def exited(self) -> bool:
        # A bridge process exits when it gives up on its server; an in-process one just says so.
        return self._stopped or self.bridge.upstream.gave_up.is_set()

    async def stop(self, graceful: bool) -> None:
        # Always graceful: the bridge drains its calls (none, after a failed start), then stops its server.
        if self._stopped:
            return
        self._stopped = True
        self.client.local.pop(self.endpoint.url, None)
        # It must finish even if the caller is cancelled (a half-stopped bridge would leave its
        # server running), so it is a task of its own, which the backend waits for when it closes.
        task = asyncio.create_task(self.runner.cleanup(), name=f"pier-stop-{self.key.user}-{self.key.profile}")
        self.stopping.add(task)
        task.add_done_callback(self.stopping.discard)
        # Bounded all the same: a stop that never ends must not hold the reaper or the router's shutdown.
        settings = self.bridge.settings
        budget = settings.shutdown_grace_s + 3 * settings.kill_timeout_s + _STOP_SLACK_S
        try:
            await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            log.error("bridge did not stop in time", extra={"user": self.key.user, "profile": self.key.profile})
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class LocalBackend(SessionBackend):
    def __init__(self, settings: RouterSettings, bridge: BridgeClient, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.bridge = bridge
        self.metrics = metrics
        self.sessions: dict[SessionKey, LocalSession] = {}
        self._starting: dict[SessionKey, asyncio.Task[LocalSession]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._bridge_log_level: int | None = None

    async def start(self) -> None:
        if self.settings.local_bridges == "inprocess":
            # In-process bridges log through the router's handlers, at the bridges' own level.
            bridge_logger = logging.getLogger("pier.sidecar")
            self._bridge_log_level = bridge_logger.level
            bridge_logger.setLevel(self.settings.sidecar_log_level.upper())
        self._reaper = asyncio.create_task(self._reap_forever(), name="pier-local-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for task in self._starting.values():
            task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        await asyncio.gather(*(self._stop(s, "shutdown") for s in list(self.sessions.values())))
        await asyncio.gather(*self._stopping, return_exceptions=True)
        if self._bridge_log_level is not None:
            logging.getLogger("pier.sidecar").setLevel(self._bridge_log_level)

    def list(self, user: str | None = None) -> list[Session]:
        return [s for s in self.sessions.values() if user is None or s.key.user == user]

    async def acquire(self, user: str, profile: Profile) -> Session:
        key = SessionKey(user, profile.name)
        session = self.sessions.get(key)
        if session is not None:
            if session.alive:
                return session
            await self.forget(session, "exited")
        task = self._starting.get(key)
        if task is None:
            # One start per key: concurrent first requests all wait for the same task.
            # A fresh context: an in-process bridge's tasks inherit it, and must not log with the
            # request id of whichever request happened to start the session.
            task = asyncio.create_task(
                self._start(key, profile), name=f"pier-start-{user}-{profile.name}", context=contextvars.Context()
            )
            self._starting[key] = task
            task.add_done_callback(lambda _: self._starting.pop(key, None))
        return await asyncio.shield(task)

    async def end(self, user: str, profile_name: str) -> bool:
        session = self.sessions.get(SessionKey(user, profile_name))
        if session is None:
            return False
        await self._stop(session, "deleted")
        return True

    async def forget(self, session: Session, reason: str) -> None:
        assert isinstance(session, LocalSession)
        # A bridge that is slow to answer (a loaded machine) is not dead: only a gone one is.
        if self.sessions.get(session.key) is session and session.exited:
            await self._stop(session, reason)

    # -- starting and stopping -------------------------------------------------------------

    async def _start(self, key: SessionKey, profile: Profile) -> LocalSession:
        logs.bind(user=key.user, profile=key.profile)
        await self._make_room()
        token = secrets.token_urlsafe(24)
        if self.settings.local_bridges == "inprocess":
            session: LocalSession = await self._start_inprocess(key, profile, token)
        else:
            session = await self._start_process(key, profile, token)
        session.profile = profile
        self.sessions[key] = session
        self.metrics.sessions_started.labels(profile.name).inc()
        self.metrics.sessions_active.labels(profile.name).inc()
        log.info("session started", extra={"user": key.user, "profile": key.profile, "url": session.endpoint.url})
        return session

    def _failed(self, key: SessionKey, exc: Exception) -> PierError:
        details = exc.details if isinstance(exc, PierError) else {}
        message = exc.message if isinstance(exc, PierError) else f"bridge did not start: {exc!r}"
        self.metrics.sessions_failed.labels(key.profile).inc()
        log.error("session failed to start", extra={"user": key.user, "profile": key.profile, "why": message})
        return PierError("SESSION_START_FAILED", message, details)

    async def _start_inprocess(self, key: SessionKey, profile: Profile, token: str) -> InProcessSession:
        s = self.settings
        # What a bridge process would read from its environment: the profile's PIER_SIDECAR_*
        # values, then the router's choices. The server gets what it would get from a bridge
        # process: the router's environment without PIER_*, plus the profile's (without the
        # bridge's settings).
        settings = SidecarSettings.from_env(
            profile.env, command=profile.command, host="127.0.0.1", port=0, cwd=profile.cwd, token=token,
            max_concurrent_calls=profile.max_concurrent_calls, start_timeout_s=s.session_start_timeout_s,
            log_level=s.sidecar_log_level, **self._tls_settings(),
        )  # fmt: skip
        server_env = {
            **clean_env(),
            **{k: v for k, v in profile.env.items() if not k.upper().startswith(ENV_PREFIX)},
        }
        app = create_app(settings, server_env)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_grace_s + 1)
        session = InProcessSession(key, Endpoint("", token))
        session.runner, session.bridge, session.client = runner, app[BRIDGE], self.bridge
        session.stopping = self._stopping
        started = time.monotonic()
        try:
            await runner.setup()
            ssl_context = None
            if settings.tls_cert is not None:
                ssl_context = server_context(
                    settings.tls_cert, settings.tls_key or settings.tls_cert, settings.tls_client_ca
                )
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
            await site.start()
            scheme = "https" if ssl_context else "http"
            session.endpoint = Endpoint(f"{scheme}://127.0.0.1:{runner.addresses[0][1]}", token)
            self.bridge.local[session.endpoint.url] = session.bridge
            remaining = s.session_start_timeout_s - (time.monotonic() - started)
            tools = await self.bridge.tools(session.endpoint, max(remaining, 1.0))
        except (PierError, TimeoutError, ValueError, OSError) as exc:
            await session.stop(graceful=False)
            raise self._failed(key, exc) from None
        except BaseException:
            await session.stop(graceful=False)
            raise
        session.tools = {t["name"]: t for t in tools}
        return session

    def _tls_settings(self) -> dict[str, Path]:
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

    async def _start_process(self, key: SessionKey, profile: Profile, token: str) -> ProcessSession:
        env = {
            **clean_env(),  # the router's own settings (keys!) never reach a session
            **profile.env,
            "PIER_SIDECAR_TOKEN": token,
            "PIER_SIDECAR_MAX_CONCURRENT_CALLS": str(profile.max_concurrent_calls),
            "PIER_SIDECAR_START_TIMEOUT_S": str(self.settings.session_start_timeout_s),
            "PIER_SIDECAR_LOG_LEVEL": self.settings.sidecar_log_level,
            **{ENV_PREFIX + name.upper(): str(path) for name, path in self._tls_settings().items()},
        }
        proc = await asyncio.create_subprocess_exec(
            *SIDECAR, "--host", "127.0.0.1", "--port", "0", "--", *profile.command,
            stdout=subprocess.PIPE, env=env, cwd=profile.cwd, preexec_fn=die_with_parent,
        )  # fmt: skip
        started = time.monotonic()
        try:
            endpoint = Endpoint(await self._listening_url(proc), token)
            remaining = self.settings.session_start_timeout_s - (time.monotonic() - started)
            tools = await self.bridge.tools(endpoint, max(remaining, 1.0))
        except (PierError, TimeoutError, ValueError, KeyError) as exc:
            await _kill(proc)
            raise self._failed(key, exc) from None
        except BaseException:
            await _kill(proc)
            raise
        session = ProcessSession(key, endpoint, {t["name"]: t for t in tools})
        session.proc = proc
        return session

    async def _listening_url(self, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), self.settings.session_start_timeout_s)
        if not line:
            code = await proc.wait()
            raise PierError("SESSION_START_FAILED", f"the bridge exited with code {code} before listening")
        return loads(line)["url"]

    async def _make_room(self) -> None:
        """Keep the pool within its limit by evicting the least recently used idle session."""
        while len(self.sessions) + len(self._starting) > self.settings.max_sessions:
            idle = [s for s in self.sessions.values() if s.in_flight == 0 and s.alive]
            for session in sorted(idle, key=lambda s: s.last_used):
                if await self._idle_on_bridge(session, 0):
                    await self._stop(session, "evicted")
                    break
            else:
                raise PierError(
                    "SESSION_CAPACITY",
                    "every session is busy; try again shortly",
                    {"max_sessions": self.settings.max_sessions},
                )

    async def _stop(self, session: LocalSession, reason: str) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.metrics.sessions_active.labels(session.key.profile).dec()
            self.metrics.sessions_reaped.labels(session.key.profile, reason).inc()
        if session.state == "stopping":
            return
        session.state = "stopping"
        log.info("session ending", extra={"user": session.key.user, "profile": session.key.profile, "why": reason})
        await session.stop(graceful=True)

    # -- reaping ---------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            for session in list(self.sessions.values()):
                try:
                    await self._reap_one(session)
                except Exception:  # one session's trouble must not stop the reaper
                    log.exception("reaper failed on a session", extra={"user": session.key.user})

    async def _reap_one(self, session: LocalSession) -> None:
        if not session.alive:
            await self.forget(session, "exited")
            return
        ttl = session.profile.ttl_s if session.profile.ttl_s is not None else self.settings.session_ttl_s
        if await self._idle_on_bridge(session, ttl) and ttl and session.in_flight == 0:
            await self._stop(session, "idle")

    async def _idle_on_bridge(self, session: LocalSession, ttl: float) -> bool:
        """Refresh the session's bridge status; True when nothing runs there and it has been idle `ttl`."""
        try:
            status = await self.bridge.status(session.endpoint)
        except PierError:
            await self.forget(session, "exited")
            return False
        session.bridge_status = status
        busy = status.get("in_flight", 0) or status.get("calls_running", 0) or status.get("queued", 0)
        last = max(session.last_used, status.get("last_activity", 0))
        return not busy and time.time() - last >= ttl


async def _kill(proc: asyncio.subprocess.Process, graceful: bool = False) -> None:
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
