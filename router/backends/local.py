"""Local sessions: each one a `pier sidecar` process on loopback, on its own port.

The same bridge code as a pod runs; only how it is started differs. Idle sessions are reaped,
the pool is bounded (least recently used idle session evicted first), and a session whose
bridge died is started afresh on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import subprocess
import sys
import time

from pier.errors import PierError
from pier.jsonrpc import loads
from pier.process import clean_env, die_with_parent
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.profiles import Profile
from pier.sidecar.client import BridgeClient, Endpoint

log = logging.getLogger("pier.router.local")

SIDECAR = [sys.executable, "-m", "pier.cli", "sidecar"]
_STOP_GRACE_S = 30.0  # a bridge's own grace period for its calls, plus slack


class LocalSession(Session):
    proc: asyncio.subprocess.Process
    profile: Profile

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self.state == "ready"


class LocalBackend(SessionBackend):
    def __init__(self, settings: RouterSettings, bridge: BridgeClient, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.bridge = bridge
        self.metrics = metrics
        self.sessions: dict[SessionKey, LocalSession] = {}
        self._starting: dict[SessionKey, asyncio.Task[LocalSession]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
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
            task = asyncio.create_task(self._start(key, profile), name=f"pier-start-{user}-{profile.name}")
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
        # A bridge that is slow to answer (a loaded machine) is not dead: only a gone process is.
        if self.sessions.get(session.key) is session and session.proc.returncode is not None:
            await self._stop(session, reason)

    # -- starting and stopping -------------------------------------------------------------

    async def _start(self, key: SessionKey, profile: Profile) -> LocalSession:
        await self._make_room()
        token = secrets.token_urlsafe(24)
        env = {
            **clean_env(),  # the router's own settings (keys!) never reach a session
            **profile.env,
            "PIER_SIDECAR_TOKEN": token,
            "PIER_SIDECAR_MAX_CONCURRENT_CALLS": str(profile.max_concurrent_calls),
            "PIER_SIDECAR_START_TIMEOUT_S": str(self.settings.session_start_timeout_s),
            "PIER_SIDECAR_LOG_LEVEL": self.settings.sidecar_log_level,
            **self._tls_env(),
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
            details = exc.details if isinstance(exc, PierError) else {}
            message = exc.message if isinstance(exc, PierError) else f"bridge did not start: {exc!r}"
            await self._kill(proc)
            self.metrics.sessions_failed.labels(profile.name).inc()
            log.error("session failed to start", extra={"user": key.user, "profile": key.profile, "why": message})
            raise PierError("SESSION_START_FAILED", message, details) from None
        except BaseException:
            await self._kill(proc)
            raise
        session = LocalSession(key, endpoint, {t["name"]: t for t in tools})
        session.proc = proc
        session.profile = profile
        self.sessions[key] = session
        self.metrics.sessions_started.labels(profile.name).inc()
        self.metrics.sessions_active.labels(profile.name).inc()
        log.info("session started", extra={"user": key.user, "profile": key.profile, "url": endpoint.url})
        return session

    def _tls_env(self) -> dict[str, str]:
        """With internal mTLS, each bridge serves HTTPS and accepts only clients of the same CA."""
        s = self.settings
        if s.internal_tls_cert is None:
            return {}
        env = {"PIER_SIDECAR_TLS_CERT": str(s.internal_tls_cert)}
        if s.internal_tls_key is not None:
            env["PIER_SIDECAR_TLS_KEY"] = str(s.internal_tls_key)
        if s.internal_tls_ca is not None:
            env["PIER_SIDECAR_TLS_CLIENT_CA"] = str(s.internal_tls_ca)
        return env

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
        await self._kill(session.proc, graceful=True)

    async def _kill(self, proc: asyncio.subprocess.Process, graceful: bool = False) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

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
