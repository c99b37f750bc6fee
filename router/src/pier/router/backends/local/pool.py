"""The local session pool: one session per (user, profile), bounded, reaped when idle.

Sessions start through a runtime (`runtimes`: a bridge in the router's process, or a bridge
process). The pool keeps at most `PIER_MAX_SESSIONS` (the least recently used idle session is
evicted first, else `SESSION_CAPACITY`), starts each key once however many requests ask at once,
reaps sessions idle past their TTL, and drops a session whose bridge died so the next request
starts it afresh.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time

from pier.core import logs
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.backends.local.runtimes import LocalSession, Runtime
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics

log = logging.getLogger("pier.router.local")


class LocalBackend(SessionBackend):
    def __init__(self, settings: RouterSettings, runtime: Runtime, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.sessions: dict[SessionKey, LocalSession] = {}
        self._starting: dict[SessionKey, asyncio.Task[LocalSession]] = {}
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
        await self.runtime.close()

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
        try:
            session = await self.runtime.start(key, profile, secrets.token_urlsafe(24))
        except (PierError, TimeoutError, ValueError, KeyError, OSError) as exc:
            raise self._failed(key, exc) from None
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
        await session.stop()

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
        ttl = session.profile.idle_ttl_s(self.settings.session_ttl_s)
        if await self._idle_on_bridge(session, ttl) and ttl and session.in_flight == 0:
            await self._stop(session, "idle")

    async def _idle_on_bridge(self, session: LocalSession, ttl: float) -> bool:
        """Refresh the session's bridge status; True when nothing runs there and it has been idle `ttl`."""
        try:
            status = await session.bridge.status()
        except PierError:
            await self.forget(session, "exited")
            return False
        session.bridge_status = status
        return not status.busy and status.idle_for(time.time(), session.last_used) >= ttl
