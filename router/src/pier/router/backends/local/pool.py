"""The local session pool: one session per (user, profile), bounded, reaped when idle.

Sessions start through a runtime (`runtimes`: a bridge in the router's process, or a bridge
process). The pool keeps at most `PIER_MAX_SESSIONS` (the least recently used idle session is
evicted first, else `SESSION_CAPACITY`), starts each key once however many requests ask at once,
reaps sessions idle past their TTL, and drops a session whose bridge died so the next request
starts it afresh.

Warm pools: a profile's `warm_pool: N` keeps N sessions started and initialized, bound to no user.
A new user's first use claims one at once (its server is already up) and a replacement starts in
the background. Pooled sessions count against `PIER_MAX_SESSIONS` but yield to users: a refill only
uses free room, and a user who needs room evicts a pooled session before an idle user's. They are
nobody's: not listed for any user, not billed, not reaped for idleness; one whose server dies is
replaced.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field

from pier.core import logs, tracing
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.router.accounts.service import Accounts, Credential
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.backends.local.runtimes import LocalSession, Runtime
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.usersecrets import RedisSecretStore

log = logging.getLogger("pier.router.local")


POOLED = ""  # the user of a pooled session: nobody (no user id is empty)
# A claim's replacement starts a little later: spawning a server blocks the event loop for ~10 ms
# (fork and exec), which the claimant's first call, under way on that loop, should not wait for.
REFILL_AFTER_CLAIM_S = 0.25
RENEW_RETRY_S = 5.0  # a token that could not be renewed (no newer one yet, the provider away) is tried again after


@dataclass
class WarmPool:
    """The ready sessions of one profile that belong to no user yet."""

    profile: Profile
    ready: list[LocalSession] = field(default_factory=list)
    starting: set[asyncio.Task[None]] = field(default_factory=set)
    claims: int = 0
    misses: int = 0

    @property
    def size(self) -> int:
        return self.profile.warm_pool

    def view(self) -> dict[str, object]:
        return {
            "server": self.profile.name, "size": self.size, "ready": len(self.ready), "starting": len(self.starting),
            "claims": self.claims, "misses": self.misses,
        }  # fmt: skip


class LocalBackend(SessionBackend):
    def __init__(
        self,
        settings: RouterSettings,
        runtime: Runtime,
        metrics: RouterMetrics,
        profiles: list[Profile],
        secrets: RedisSecretStore | None = None,
        accounts: Accounts | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self._user_secrets = secrets
        self.accounts = accounts
        self.runtime = runtime
        self.metrics = metrics
        self.sessions: dict[SessionKey, LocalSession] = {}
        self._starting: dict[SessionKey, asyncio.Task[LocalSession]] = {}
        # A herd of new users must not start all their servers at once: on a few cores every start
        # then crawls past its timeout together. Each start's own timeout begins when it gets a slot.
        self._start_slots = asyncio.Semaphore(settings.max_concurrent_starts)
        self._reaper: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self.profiles = profiles
        self.pools = {p.name: WarmPool(p) for p in profiles if p.pooled}

    async def start(self) -> None:
        await self.runtime.isolation.start(self.profiles)  # may refuse: ConfigError
        self._reaper = asyncio.create_task(self._reap_forever(), name="pier-local-reaper")
        for pool in self.pools.values():
            self.metrics.pool.pooled(pool.profile.name, pool.size)
            self._refill(pool)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        refills = [task for pool in self.pools.values() for task in pool.starting]
        for task in [*self._starting.values(), *refills]:
            task.cancel()
        await asyncio.gather(*self._starting.values(), *refills, return_exceptions=True)
        pooled = [s for pool in self.pools.values() for s in pool.ready]
        await asyncio.gather(
            *(self._stop(s, "shutdown") for s in list(self.sessions.values())), *(s.stop() for s in pooled)
        )
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self.runtime.close()

    def pool_views(self) -> builtins.list[dict[str, object]]:  # `list` is a method here
        return [pool.view() for pool in self.pools.values()]

    def list(self, user: str | None = None) -> list[Session]:
        return [s for s in self.sessions.values() if user is None or s.key.user == user]

    def ready(self, user: str, profile: Profile) -> Session | None:
        if profile.token_delivery is not None or tracing.enabled():
            return None  # `acquire` checks the session's token is current, and traces how it was had
        session = self.sessions.get(SessionKey(user, profile.name))
        return session if session is not None and session.alive else None

    async def acquire(self, user: str, profile: Profile) -> Session:
        with tracing.span("session acquire", attributes={"pier.user": user, "pier.profile": profile.name}) as span:
            return await self._acquire(user, profile, span)

    async def _acquire(self, user: str, profile: Profile, span: tracing.Span) -> Session:
        """The session; `span` learns how it was had: existing, pooled (a warm one claimed), started, or
        joined (another request's start, under way)."""
        key = SessionKey(user, profile.name)
        session = self.sessions.get(key)
        if session is not None:
            if session.alive:
                current = await self._current(session)
                if current is not None:
                    span.set("pier.session.acquired", "existing")
                    return current
            else:
                await self.forget(session, "exited")
        task = self._starting.get(key)
        how = "joined"
        credential = None
        if task is None:
            claimed = self._claim(key, profile)
            if claimed is not None:
                span.set("pier.session.acquired", "pooled")
                return claimed
            # In this request's context: a token exchange needs the caller's own token.
            credential = await self._credential(user, profile)
            task = self._starting.get(key)  # (another request may have begun the start meanwhile)
            started = self.sessions.get(key)  # (or even finished it: a second start would orphan that one)
            if task is None and started is not None and started.alive:
                span.set("pier.session.acquired", "existing")
                return started
        if task is None:
            # One start per key: concurrent first requests all wait for the same task.
            # A fresh context: an in-process bridge's tasks inherit it, and must not log with the
            # request id of whichever request happened to start the session (its trace goes on).
            task = asyncio.create_task(
                self._start(key, profile, credential), name=f"pier-start-{user}-{profile.name}",
                context=tracing.detached(),
            )  # fmt: skip
            self._starting[key] = task
            task.add_done_callback(lambda _: self._starting.pop(key, None))
            how = "started"
        span.set("pier.session.acquired", how)  # now: a caller's deadline may end the wait
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

    async def _start(self, key: SessionKey, profile: Profile, credential: Credential | None) -> LocalSession:
        logs.bind(user=key.user, profile=key.profile)
        env = await self._secret_env(key, profile)
        files: dict[str, str] = {}
        delivery = profile.token_delivery
        if credential is not None and delivery is not None:
            if delivery.env is not None:
                env[delivery.env] = credential.token
            if delivery.file is not None:
                files[delivery.file] = credential.token
        await self._make_room()
        session = await self._start_bridge(key, profile, env, files)
        session.credential = credential
        self._bind(session, key)
        log.info("session started", extra={"user": key.user, "profile": key.profile, "url": session.endpoint.url})
        return session

    async def _secret_env(self, key: SessionKey, profile: Profile) -> dict[str, str]:
        """The user's secrets for the profile, for its server's environment (none when it takes none)."""
        if not profile.user_secrets:
            return {}
        assert self._user_secrets is not None  # the app refuses to start without a store for them
        await self._user_secrets.require(key.user, profile)
        return await self._user_secrets.values(key.user, profile.name)

    async def _start_bridge(
        self, key: SessionKey, profile: Profile, env: dict[str, str], files: dict[str, str] | None = None
    ) -> LocalSession:
        pooled = key.user == POOLED
        attributes: tracing.Attributes = {
            "pier.profile": profile.name,
            "pier.session.pooled": pooled,
            "pier.local_bridges": self.settings.local_bridges,
        }
        try:
            # A pooled session is warmed up: nobody waits for its start, its first user's call will.
            async with self._start_slots:
                with tracing.span("session start", attributes=attributes):
                    session = await self.runtime.start(key, profile, secrets.token_urlsafe(24), env, pooled, files)
        except (PierError, TimeoutError, ValueError, KeyError, OSError) as exc:
            raise self._failed(key, exc) from None
        self.metrics.sessions_started.labels(profile.name).inc()
        return session

    # -- users' upstream tokens ------------------------------------------------------------

    async def _credential(self, user: str, profile: Profile) -> Credential | None:
        """The upstream token a new session of the profile starts with (CONNECTION_REQUIRED without one)."""
        if profile.token_delivery is None or self.accounts is None:
            return None
        return await self.accounts.credential(user, profile)

    async def _current(self, session: LocalSession) -> LocalSession | None:
        """The session, its token renewed if due; None when it must start again (its new token is for a
        server started afresh, and it is idle)."""
        if session.retiring and session.in_flight == 0:
            await self._stop(session, "token")
            return None
        held = session.credential
        if held is None or not held.stale(time.time()):
            return session
        return await self._renew(session, held, in_request=True)

    async def _renew(self, session: LocalSession, held: Credential, in_request: bool) -> LocalSession | None:
        """Give a live session a newer token: its file rewritten in place, or (a variable only) the session
        retired to start again once idle. A connection that is gone ends the session."""
        assert self.accounts is not None
        delivery = session.profile.token_delivery
        assert delivery is not None
        try:
            fresh = await self.accounts.renew(session.key.user, session.profile, held)
        except PierError as err:
            if err.code != "CONNECTION_REQUIRED":
                log.warning("token not renewed; the session keeps its own", extra={"why": err.message})
                session.credential = dataclasses.replace(held, renew_at=time.time() + RENEW_RETRY_S)
                return session
            await self._stop(session, "disconnected")
            if in_request:
                raise
            return None
        if fresh is None:
            session.credential = dataclasses.replace(held, renew_at=time.time() + RENEW_RETRY_S)
            return session
        if delivery.file is not None and session.lease is not None:
            await session.lease.write_file(delivery.file, fresh.token)
            session.credential = fresh
            return session
        session.credential = dataclasses.replace(held, renew_at=None)  # only a restart takes the new one
        session.retiring = True
        if session.in_flight == 0 and (in_request or await self._idle_on_bridge(session, 0)):
            await self._stop(session, "token")
            return None
        return session

    def _bind(self, session: LocalSession, key: SessionKey) -> None:
        """The session is this user's from now on."""
        session.key = key
        session.last_used = time.time()
        self.sessions[key] = session
        self.metrics.sessions_active.labels(key.profile).inc()

    # -- warm pools ------------------------------------------------------------------------

    def _claim(self, key: SessionKey, profile: Profile) -> LocalSession | None:
        """A pooled session of the profile, now the user's (None: no pool, or none ready)."""
        pool = self.pools.get(profile.name)
        if pool is None:
            return None
        while pool.ready:
            session = pool.ready.pop(0)
            if session.alive:
                pool.claims += 1
                self.metrics.pool.claims.labels(profile.name).inc()
                self._pool_changed(pool, REFILL_AFTER_CLAIM_S)
                self._bind(session, key)
                log.info("pooled session claimed", extra={"user": key.user, "profile": key.profile})
                return session
            self._spawn_stop(session)
        pool.misses += 1
        self.metrics.pool.misses.labels(profile.name).inc()
        self._pool_changed(pool)
        return None

    def _pool_changed(self, pool: WarmPool, after_s: float = 0.0) -> None:
        self.metrics.pool.ready.labels(pool.profile.name).set(len(pool.ready))
        self._refill(pool, after_s)

    def _refill(self, pool: WarmPool, after_s: float = 0.0) -> None:
        """Start sessions (after `after_s`) until the pool is full, in the room users leave free."""
        while len(pool.ready) + len(pool.starting) < pool.size and self._room() > 0:
            task = asyncio.create_task(
                self._start_pooled(pool, after_s), name=f"pier-pool-{pool.profile.name}",
                context=contextvars.Context(),
            )  # fmt: skip
            pool.starting.add(task)
            task.add_done_callback(pool.starting.discard)

    async def _start_pooled(self, pool: WarmPool, after_s: float) -> None:
        await asyncio.sleep(after_s)
        started = time.monotonic()
        try:
            session = await self._start_bridge(SessionKey(POOLED, pool.profile.name), pool.profile, {})
        except PierError:
            return  # logged and counted; the next claim or reaper round tries again
        self.metrics.pool.refill_seconds.labels(pool.profile.name).observe(time.monotonic() - started)
        pool.ready.append(session)
        self.metrics.pool.ready.labels(pool.profile.name).set(len(pool.ready))

    def _room(self) -> int:
        """Sessions that may still start without evicting anyone."""
        pooled = sum(len(pool.ready) + len(pool.starting) for pool in self.pools.values())
        return self.settings.max_sessions - len(self.sessions) - len(self._starting) - pooled

    def _spawn_stop(self, session: LocalSession) -> None:
        # Stopping takes a while (the bridge drains); nobody waits for a pooled session's.
        task = asyncio.create_task(session.stop(), name="pier-pool-stop")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _failed(self, key: SessionKey, exc: Exception) -> PierError:
        details = exc.details if isinstance(exc, PierError) else {}
        message = exc.message if isinstance(exc, PierError) else f"bridge did not start: {exc!r}"
        self.metrics.sessions_failed.labels(key.profile).inc()
        log.error("session failed to start", extra={"user": key.user, "profile": key.profile, "why": message})
        return PierError("SESSION_START_FAILED", message, details)

    async def _make_room(self) -> None:
        """Keep within the limit: a pooled session goes first, then the least recently used idle one."""
        while self._room() < 0:
            pooled = next((pool for pool in self.pools.values() if pool.ready), None)
            if pooled is not None:
                await pooled.ready.pop().stop()
                self.metrics.pool.ready.labels(pooled.profile.name).set(len(pooled.ready))
                continue
            refill = next((task for pool in self.pools.values() for task in pool.starting), None)
            if refill is not None:  # a pooled session still starting yields its room too
                refill.cancel()
                await asyncio.gather(refill, return_exceptions=True)
                continue
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
            for pool in self.pools.values():  # pooled sessions whose server died are replaced
                for dead in [s for s in pool.ready if not s.alive]:
                    pool.ready.remove(dead)
                    self._spawn_stop(dead)
                self._pool_changed(pool)

    async def _reap_one(self, session: LocalSession) -> None:
        if not session.alive:
            await self.forget(session, "exited")
            return
        held = session.credential
        if held is not None and held.stale(time.time()) and await self._renew(session, held, False) is None:
            return
        if session.retiring and session.in_flight == 0 and await self._idle_on_bridge(session, 0):
            await self._stop(session, "token")
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
