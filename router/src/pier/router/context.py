"""What one router process holds: settings, catalog, keys, and the resources its lifespan opens."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from pier.core import logs
from pier.core.bridge import BridgeClient
from pier.core.catalog import Catalog, Profile
from pier.core.errors import PierError
from pier.core.jobstore import JobStore
from pier.core.policy import Policer
from pier.core.web import read_body
from pier.router.auth import KeyRing, Principal
from pier.router.backends.base import SessionBackend
from pier.router.calls import CallService
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.ratelimit import RateLimiter

# Checked with fullmatch: a pattern ending in `$` also matches before a final newline ("alice\n").
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}")


@dataclass
class Router:
    settings: RouterSettings
    catalog: Catalog
    keys: KeyRing
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    ssl_context: ssl.SSLContext | None = None  # HTTPS (reloaded in place when the files change)
    # Opened by the app's lifespan:
    http: aiohttp.ClientSession = field(init=False)
    redis: aioredis.Redis = field(init=False)
    store: JobStore = field(init=False)
    limiter: RateLimiter = field(init=False)
    backend: SessionBackend = field(init=False)
    bridge: BridgeClient = field(init=False)
    calls: CallService = field(init=False)
    policer: Policer = field(init=False)
    # Long-lived responses (SSE, relayed streams), ended at shutdown rather than waited for.
    streams: set[asyncio.Task[Any]] = field(default_factory=set)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        try:
            yield
        finally:
            self.streams.discard(task)

    def end_streams(self) -> None:
        for task in self.streams:
            task.cancel()

    async def target(self, request: web.Request, user: str, server: str) -> Profile:
        """Authorize `request` for (user, server), count it against the user's rate limit."""
        if not USER_ID.fullmatch(user):
            raise PierError("BAD_REQUEST", "user ids are 1-128 characters: letters, digits and . _ @ + = -")
        caller = principal(request)
        caller.check_user(user)
        profile = self.catalog.get(server)
        logs.bind(user=user, profile=server)  # for the rest of this request's log lines
        await self.limiter.check(caller, user)
        return profile


ROUTER = web.AppKey("router", Router)
PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


async def read_request_body(request: web.Request) -> bytes:
    """The body, within the router's size and time limits (413, 408)."""
    settings = request.app[ROUTER].settings
    return await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
