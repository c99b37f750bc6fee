"""Authorizations in progress: the `state` an authorization request carries (RFC 6749 §10.12), and what the
router must remember until the browser comes back with it.

A state is 256 random bits, stored in Redis (sealed: it holds the PKCE verifier) for a few minutes and
taken exactly once (GETDEL: two callbacks with one state, on any replicas, cannot both have it). It is
bound to what it was made for — the user and profile of a connection, or a sign-in — and, when a browser
started it, to that browser (a cookie whose digest the flow keeps), so a callback that another browser
delivers (the victim of a phished authorization link) changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Literal

import pydantic
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from pier.core import redis_keys as keys
from pier.core.errors import PierError
from pier.router.usersecrets import Sealer

_STATE = re.compile(r"[A-Za-z0-9_-]{16,128}")  # what `start` makes (43 characters), with room
BROWSER_COOKIE = "pier_browser"  # binds flows to the browser that started them (HttpOnly, SameSite=Lax)


class Flow(BaseModel):
    """One authorization in progress."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["connect", "signin"]
    user: str | None = None  # connect: whose account is being connected
    profile: str | None = None  # connect: for which profile
    verifier: str  # PKCE code verifier
    redirect_uri: str
    browser: str | None = None  # digest of the browser cookie of the browser that started it
    next: str | None = None  # a path on this router to go to afterwards
    nonce: str | None = None  # signin: the ID token's nonce
    created_at: float

    def bound_to(self, browser_cookie: str | None) -> bool:
        """Whether the browser delivering the callback may complete the flow."""
        if self.browser is None:
            return True  # started by an app for its own user (it sends the URL to that user only)
        return browser_cookie is not None and hmac.compare_digest(self.browser, browser_digest(browser_cookie))


def browser_digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def new_browser_cookie() -> str:
    return secrets.token_urlsafe(32)


def bad_state(why: str) -> PierError:
    return PierError("BAD_REQUEST", f"this authorization cannot be completed: {why}; start again", {"reason": why})


class Flows:
    """States in Redis, sealed, single use, short-lived."""

    def __init__(self, redis: aioredis.Redis, sealer: Sealer, ttl_s: int) -> None:
        self.redis = redis
        self.sealer = sealer
        self.ttl_s = ttl_s

    async def start(self, flow: Flow) -> str:
        """Remember `flow`; its state (to put in the authorization request)."""
        state = secrets.token_urlsafe(32)
        key = keys.oauth_flow(state)
        await self.redis.set(key, self.sealer.seal(flow.model_dump_json(), key), ex=self.ttl_s)
        return state

    async def user_of(self, state: str | None) -> str | None:
        """Whose flow `state` is, without taking it (None when it is not one): with several router
        processes, the callback is served by that user's."""
        if not state or not _STATE.fullmatch(state):
            return None
        key = keys.oauth_flow(state)
        sealed = await self.redis.get(key)
        try:
            return None if sealed is None else Flow.model_validate_json(self.sealer.open(sealed, key)).user
        except (PierError, pydantic.ValidationError, UnicodeDecodeError):
            return None

    async def take(self, state: str | None) -> Flow:
        """The flow of `state`, forgotten at once; BAD_REQUEST (400) for a forged, replayed or expired one."""
        if not state or not _STATE.fullmatch(state):
            raise bad_state("the state is missing or malformed")
        key = keys.oauth_flow(state)
        sealed = await self.redis.getdel(key)
        if sealed is None:
            raise bad_state("the state is unknown, already used or expired")
        try:
            flow = Flow.model_validate_json(self.sealer.open(sealed, key))
        except (PierError, pydantic.ValidationError, UnicodeDecodeError):
            raise bad_state("the state cannot be read") from None
        if time.time() - flow.created_at > self.ttl_s:
            raise bad_state("the state has expired")
        return flow
