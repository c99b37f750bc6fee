"""What the router needs from a session backend: find or start a user's session, end it, list them."""

from __future__ import annotations

import abc
import builtins
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pier.core.callapi import BridgeHandle, BridgeStatus, Endpoint
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.router.accounts.store import ConnectionStore
from pier.router.usersecrets import SecretStore


@dataclass(frozen=True)
class SessionKey:
    user: str
    profile: str


@dataclass(eq=False)
class Session:
    """A user's session of one profile, as the router sees it."""

    key: SessionKey
    bridge: BridgeHandle  # how to call its bridge (in this process, or over HTTP)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "ready"
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0  # calls this router is forwarding right now
    bridge_status: BridgeStatus | None = None  # the last /v1/status seen
    call_timeout_s: float | None = None  # the session's own hand-off threshold (an MCPSession may set one)
    server_tasks: bool | None = None  # its server runs tasks of its own (2026-07-28); None: not asked yet

    @property
    def endpoint(self) -> Endpoint:
        """Where its bridge is served over HTTP (the relay and the job pool reach it there)."""
        return self.bridge.endpoint

    async def look(self, timeout: float = 2.0) -> None:
        """Ask its bridge how busy it is now, for a listing: what runs there this moment, not what a reaper
        round or an eviction's check saw seconds ago (kept when the bridge does not answer)."""
        if self.state != "ready" or not self.endpoint.url:
            return  # not started yet (listed, never called)
        with contextlib.suppress(PierError):
            self.bridge_status = await self.bridge.status(timeout)

    def view(self) -> dict[str, Any]:
        """The session for listings and the dashboard (no endpoint token)."""
        now = time.time()
        status = self.bridge_status
        in_bridge = status.in_flight + status.queued if status else 0
        return {
            "user": self.key.user,
            "server": self.key.profile,
            "state": self.state,
            "created_at": self.created_at,
            "age_s": round(now - self.created_at, 1),
            "idle_s": round(now - self.last_used, 1),
            "in_flight": max(self.in_flight, in_bridge),
            "restarts": status.restarts if status else 0,
            "tools": len(self.tools),
        }


class SessionBackend(abc.ABC):
    """Local processes or Kubernetes pods: the router does not care which."""

    secrets: SecretStore | None = None  # where users' secrets live, for profiles that take them
    connections: ConnectionStore | None = None  # where connected accounts live, when not in Redis (Kubernetes)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (reaping, watching)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; a local backend also stops every session it owns."""

    def ready(self, user: str, profile: Profile) -> Session | None:
        """The user's live session of `profile` when one is at hand now (None: `acquire` it)."""
        return None

    @abc.abstractmethod
    async def acquire(self, user: str, profile: Profile) -> Session:
        """The user's live session of `profile`, started if needed (exactly one, however many ask)."""

    @abc.abstractmethod
    async def end(self, user: str, profile_name: str) -> bool:
        """End a session; False when there was none."""

    @abc.abstractmethod
    async def forget(self, session: Session, reason: str) -> None:
        """A session found dead: drop it so the next request starts a fresh one."""

    @abc.abstractmethod
    def list(self, user: str | None = None) -> list[Session]:
        """Known sessions, of one user or all."""

    def pool_views(self) -> builtins.list[dict[str, object]]:  # `list` is a method here
        """Warm pools, for the dashboard: size, ready, claims, misses per profile."""
        return []

    @contextlib.asynccontextmanager
    async def use(self, user: str, profile: Profile) -> AsyncIterator[Session]:
        """Find or start the user's session and hold it for the length of a call."""
        session = await self.acquire(user, profile)
        async with hold(session):
            yield session


class Hold:
    """A session held for the length of a call: it counts as in use and is not reaped. Let go when the
    call ends, or sooner (`release`) when its caller cancels it: a count read after the cancellation was
    acknowledged must not include it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.held = False

    async def __aenter__(self) -> Hold:
        self.session.in_flight += 1
        self.session.last_used = time.time()
        self.held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.session.in_flight -= 1
            self.session.last_used = time.time()


def hold(session: Session) -> Hold:
    """Hold a session for the length of a call (`async with hold(session) as held:`)."""
    return Hold(session)
