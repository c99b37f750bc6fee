"""Where users' connected accounts live, by backend — as users' secrets do (`pier.router.usersecrets`):

- **Redis** (local backend): one key per (user, profile), the connection sealed with AES-GCM under
  `PIER_SECRETS_KEY`, its key bound in as associated data (a sealed value copied elsewhere does not open).
- **Kubernetes**: one Secret per (user, profile) (`connection_secret_name`), labelled as the router's:
  key `token` holds the access token alone — what the session's pod takes (an environment variable, a
  file) — and key `connection` the rest (refresh token, expiry, scopes), which no pod mounts.

A connection is never shown: its `view` says whether it is connected, its scopes and expiry, never a token.
"""

from __future__ import annotations

import abc
import base64
from typing import Any, Literal

import pydantic
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from pier.core import redis_keys as keys
from pier.core.errors import PierError
from pier.core.mcpsession import CONNECTION_TOKEN_KEY, connection_secret_name
from pier.router.usersecrets import Request, Sealer, write_secret

TOKEN_KEY = CONNECTION_TOKEN_KEY  # the Secret's key a session's pod receives
CONNECTION_KEY = "connection"  # the Secret's key only the router reads


class Connection(BaseModel):
    """A user's connected account for one profile: the tokens the provider gave, and their state."""

    model_config = ConfigDict(extra="forbid")

    access_token: str
    refresh_token: str | None = None
    scopes: list[str] = Field(default_factory=list)
    expires_at: float | None = None  # None: the provider said nothing (treated as not expiring)
    obtained_at: float  # when the access token was issued (refreshes renew it)
    connected_at: float  # when the user connected
    status: Literal["connected", "broken"] = "connected"
    reason: str | None = None  # why it is broken

    def due(self, now: float, margin_s: float) -> bool:
        """Whether the access token should be refreshed now."""
        when = renew_at(self.expires_at, self.obtained_at, margin_s)
        return when is not None and now >= when

    def view(self) -> dict[str, Any]:
        """What the user and apps may see (never a token)."""
        return {
            "connected": self.status == "connected",
            "status": self.status,
            "reason": self.reason,
            "scopes": self.scopes,
            "expires_at": self.expires_at,
            "connected_at": self.connected_at,
            "refreshed_at": self.obtained_at if self.obtained_at > self.connected_at else None,
            "refreshable": self.refresh_token is not None,
        }


def renew_at(expires_at: float | None, obtained_at: float, margin_s: float) -> float | None:
    """When a token obtained at `obtained_at` should be renewed: `margin_s` before it expires, but at most
    half its lifetime before (a short-lived token is not renewed all the time); None: it does not expire."""
    if expires_at is None:
        return None
    lifetime = max(expires_at - obtained_at, 0.0)
    return expires_at - min(margin_s, lifetime / 2)


NOT_CONNECTED: dict[str, Any] = {"connected": False, "status": "not_connected", "scopes": [], "expires_at": None}


class ConnectionStore(abc.ABC):
    """Where connections live; every method takes (user, profile)."""

    @abc.abstractmethod
    async def get(self, user: str, profile: str) -> Connection | None:
        """The connection, or None."""

    @abc.abstractmethod
    async def put(self, user: str, profile: str, connection: Connection) -> None:
        """Store (or replace) the connection."""

    @abc.abstractmethod
    async def delete(self, user: str, profile: str) -> bool:
        """Forget the connection; False when there was none."""

    async def deliver(self, user: str, profile: str, token: str) -> None:  # noqa: B027 - optional hook
        """Make `token` what the user's sessions of the profile receive (Kubernetes: the Secret's `token`)."""


class RedisConnectionStore(ConnectionStore):
    def __init__(self, redis: aioredis.Redis, sealer: Sealer) -> None:
        self.redis = redis
        self.sealer = sealer

    async def get(self, user: str, profile: str) -> Connection | None:
        key = keys.connection(user, profile)
        sealed = await self.redis.get(key)
        if sealed is None:
            return None
        try:
            return Connection.model_validate_json(self.sealer.open(sealed, key))
        except pydantic.ValidationError:
            raise PierError("INTERNAL", "a stored connection cannot be read") from None

    async def put(self, user: str, profile: str, connection: Connection) -> None:
        key = keys.connection(user, profile)
        await self.redis.set(key, self.sealer.seal(connection.model_dump_json(), key))

    async def delete(self, user: str, profile: str) -> bool:
        return bool(await self.redis.delete(keys.connection(user, profile)))


class KubernetesConnectionStore(ConnectionStore):
    """One Secret per (user, profile) in the sessions' namespace, through the router's API client."""

    def __init__(self, request: Request, base_url: str, namespace: str) -> None:
        self._request = request
        self._base = f"{base_url}/api/v1/namespaces/{namespace}/secrets"

    async def _read(self, user: str, profile: str) -> dict[str, Any] | None:
        status, body = await self._request("GET", f"{self._base}/{connection_secret_name(user, profile)}")
        if status == 404:
            return None
        _check(status, body, "read")
        return body if isinstance(body, dict) else None

    async def get(self, user: str, profile: str) -> Connection | None:
        secret = await self._read(user, profile)
        raw = ((secret or {}).get("data") or {}).get(CONNECTION_KEY)
        if raw is None:
            return None
        try:
            return Connection.model_validate_json(base64.b64decode(raw))
        except (pydantic.ValidationError, ValueError):
            raise PierError("INTERNAL", "a stored connection cannot be read") from None

    async def put(self, user: str, profile: str, connection: Connection) -> None:
        data = {CONNECTION_KEY: connection.model_dump_json(), TOKEN_KEY: connection.access_token}
        await self._write(user, profile, data)

    async def deliver(self, user: str, profile: str, token: str) -> None:
        await self._write(user, profile, {TOKEN_KEY: token})

    async def _write(self, user: str, profile: str, values: dict[str, str]) -> None:
        current = await self._read(user, profile)
        await write_secret(self._request, self._base, connection_secret_name(user, profile), user, profile, values,
                           current)  # fmt: skip

    async def delete(self, user: str, profile: str) -> bool:
        status, answer = await self._request("DELETE", f"{self._base}/{connection_secret_name(user, profile)}")
        if status == 404:
            return False
        _check(status, answer, "delete")
        return True


def _check(status: int, body: Any, what: str) -> None:
    if status >= 300:
        reason = body.get("reason") if isinstance(body, dict) else None
        # The API server's answer can quote what was sent: only its reason is passed on.
        raise PierError("INTERNAL", f"cannot {what} the user's connection (HTTP {status}, {reason})")
