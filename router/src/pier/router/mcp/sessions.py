"""MCP client sessions that outlive their server session (the handshake revisions, 2025-03-26 … 2025-11-25).

A client's `Mcp-Session-Id` is minted by the bridge that answers its `initialize`. The relay keeps what
the session needs in Redis (`redis_keys.mcp_session`, a hash): the user and profile it belongs to, the
params of its `initialize` (revision, capabilities, client info), the log level it set and the resources
it subscribed to, under an idle TTL of its own (`PIER_MCP_SESSION_TTL_S`). When a bridge does not know an
id — the user's session was reaped, evicted, deleted or moved to a new pod, the router restarted, another
replica's bridge is answering — the relay has that bridge recreate the client session under the same id
from the record (`BridgeHandle.resume_client`), and answers the request as if nothing had happened. Only
ids never issued, expired by the TTL or ended by the client's `DELETE` get 404.

The hot path pays nothing for it: a request whose bridge knows its id never waits for Redis but for the
TTL's refresh, at most once per `refresh_s` per id and router process.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pier.core import redis_keys as keys
from pier.core.callapi import CLIENT_SESSION_ID, ClientState
from pier.core.jsonrpc import Message, dumps, loads
from pier.router.metrics import RouterMetrics

log = logging.getLogger("pier.router.mcp.sessions")

_SUBSCRIPTION = "sub:"  # a hash field per subscribed resource: "sub:" + its URI
_MAX_SUBSCRIPTIONS = 1000  # kept per session; more still work, but are not replayed
_MAX_URI = 4096
# What a client tells its server that a resumed session must be told again.
NOTED = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe"})


def well_formed(session_id: str | None) -> bool:
    """An id Pier could have issued (anything else is unknown without asking Redis)."""
    return session_id is not None and CLIENT_SESSION_ID.fullmatch(session_id) is not None


class McpSessions:
    """The records of relayed MCP client sessions, in Redis."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float, metrics: RouterMetrics) -> None:
        self.redis = redis
        self.ttl_s = max(int(ttl_s), 1)
        self.metrics = metrics
        # The TTL is refreshed once per period and id (it is an idle TTL: exact to within the period).
        self.refresh_s = min(self.ttl_s / 4, 60.0)
        self._refreshed: collections.OrderedDict[str, float] = collections.OrderedDict()

    async def created(self, session_id: str, user: str, profile: str, initialize: dict[str, Any]) -> None:
        """A bridge answered the client's `initialize` with this id: remember the session."""
        key = keys.mcp_session(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # ids are random: nothing to keep, but never a stale field
            pipe.hset(key, mapping={"user": user, "profile": profile, "init": dumps(initialize)})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        self._mark(session_id)

    async def note(self, session_id: str, messages: list[Message]) -> None:
        """What the client tells its server that a resumed session is told again (its log level, its
        subscriptions), as it passes; before it is forwarded, so that a failure here forwards nothing."""
        key = keys.mcp_session(session_id)
        subscribing = [m for m in messages if m.get("method") == "resources/subscribe"]
        full = bool(subscribing) and await self.redis.hlen(key) >= _MAX_SUBSCRIPTIONS
        async with self.redis.pipeline(transaction=True) as pipe:
            for message in messages:
                method, params = message.get("method"), message.get("params") or {}
                value = params.get("level") if method == "logging/setLevel" else params.get("uri")
                if not isinstance(value, str) or len(value) > _MAX_URI:
                    continue  # the server will refuse it: nothing to replay
                if method == "logging/setLevel":
                    pipe.hset(key, "level", value)
                elif method == "resources/subscribe" and not full:
                    pipe.hset(key, _SUBSCRIPTION + value, "1")
                elif method == "resources/unsubscribe":
                    pipe.hdel(key, _SUBSCRIPTION + value)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        if full:
            log.warning("too many subscriptions to keep; more are not replayed", extra={"max": _MAX_SUBSCRIPTIONS})

    async def load(self, session_id: str, user: str, profile: str) -> ClientState | None:
        """The session to recreate, or None: never issued, expired, ended, or someone else's."""
        if not well_formed(session_id):
            return None
        stored = cast(dict[bytes, bytes], await self.redis.hgetall(keys.mcp_session(session_id)))
        record = {name.decode(): value.decode() for name, value in stored.items()}
        if record.get("user") != user or record.get("profile") != profile or "init" not in record:
            return None
        try:
            initialize = loads(record["init"])
        except ValueError:
            return None
        if not isinstance(initialize, dict):
            return None
        subscriptions = [name[len(_SUBSCRIPTION) :] for name in record if name.startswith(_SUBSCRIPTION)]
        return ClientState(session_id, initialize, record.get("level"), sorted(subscriptions))

    async def end(self, session_id: str, user: str, profile: str) -> bool:
        """The client's `DELETE`: forget the session; False when there was none of this user's."""
        if await self.load(session_id, user, profile) is None:
            return False
        await self.redis.delete(keys.mcp_session(session_id))
        self._refreshed.pop(session_id, None)
        return True

    def due(self, session_id: str) -> bool:
        """Whether the id's TTL is due for a refresh (a dictionary look-up: the hot path's only cost)."""
        now = time.monotonic()
        last = self._refreshed.get(session_id)
        return last is None or now - last >= self.refresh_s

    def _mark(self, session_id: str) -> None:
        """Note the id's TTL refreshed now; forget those refreshed a period ago (they are due anyway)."""
        now = time.monotonic()
        self._refreshed[session_id] = now
        self._refreshed.move_to_end(session_id)
        while self._refreshed:
            oldest, at = next(iter(self._refreshed.items()))
            if now - at < self.refresh_s:
                break
            del self._refreshed[oldest]

    async def touch(self, session_id: str) -> None:
        """Refresh the id's TTL (best effort: a session in use outlives a Redis hiccup at its bridge)."""
        self._mark(session_id)
        try:
            await self.redis.expire(keys.mcp_session(session_id), self.ttl_s)
        except RedisError as exc:
            self.metrics.redis_errors.labels("mcp_session").inc()
            log.warning("MCP session TTL not refreshed: Redis unavailable", extra={"error": str(exc)})
