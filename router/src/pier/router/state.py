"""What one router process holds: its settings, catalog and keys, and the resources its app opens
(one cleanup context each, in `app`)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from pier.core.callapi import Endpoint, HttpBridge
from pier.core.catalog import Catalog
from pier.core.jobstore import JobStore
from pier.router.accounts.service import Accounts
from pier.router.auth.ingress import Ingress
from pier.router.auth.keys import KeyRing
from pier.router.auth.signin import SignIn
from pier.router.backends.base import SessionBackend
from pier.router.calls import CallService
from pier.router.config import RouterSettings
from pier.router.mcp.sessions import McpSessions
from pier.router.metrics import RouterMetrics
from pier.router.processes import Peers


@dataclass
class Router:
    settings: RouterSettings
    catalog: Catalog
    keys: KeyRing
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    ssl_context: ssl.SSLContext | None = None  # HTTPS (reloaded in place when the files change)
    peers: Peers | None = None  # the other router processes, when there are several
    # Opened by the app's cleanup contexts (app.py), in this order:
    http: aiohttp.ClientSession = field(init=False)  # to bridges and the policy hook
    bridge_ssl: ssl.SSLContext | bool = True  # internal mTLS to the bridges, when configured
    redis: aioredis.Redis = field(init=False)
    store: JobStore = field(init=False)
    mcp_sessions: McpSessions = field(init=False)  # MCP client sessions' records (with the job store)
    accounts: Accounts | None = None  # connected accounts and exchanged tokens, when a profile has them
    backend: SessionBackend = field(init=False)
    ingress: Ingress = field(init=False)
    signin: SignIn | None = None  # the portal's sign-in, when an identity provider and a client id are set
    calls: CallService = field(init=False)
    # Long-lived responses (SSE, relayed streams), ended at shutdown rather than waited for.
    streams: set[asyncio.Task[Any]] = field(default_factory=set)

    def http_bridge(self, endpoint: Endpoint) -> HttpBridge:
        """A bridge reached over HTTP (one a job record names, or a pod's)."""
        return HttpBridge(self.http, endpoint, self.bridge_ssl)

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


ROUTER = web.AppKey("router", Router)


def router_of(request: web.Request) -> Router:
    """The router a request reached (from whichever of its sub-applications)."""
    return request.config_dict[ROUTER]
