"""Per-user secrets: what each user supplies for their own sessions of a profile (e.g. GITHUB_TOKEN).

Write-only from the outside (a listing gives names and when each was set, never values); given to
that user's server process only, as environment variables. Two stores, by backend:

- **Redis** (local backend): one hash per (user, profile), each value sealed with AES-GCM under
  `PIER_SECRETS_KEY`, the (user, profile, name) it belongs to bound in as associated data, so a
  sealed value copied to another slot does not open. The router refuses to start with profiles
  that take secrets and no key.
- **Kubernetes**: one Secret per (user, profile), labelled as Pier's; the session's pod takes it
  with `envFrom: secretRef`, so the router never writes a value into an MCPSession.

No value is ever logged, counted, shown on the dashboard, audited or sent to the policy hook.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pier.core import redis_keys as keys
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import dumps, loads
from pier.core.mcpsession import PROFILE_LABEL, USER_LABEL, label_value

MAX_VALUE_BYTES = 64 * 1024
SET_AT_ANNOTATION = "pier.dev/secrets-set-at"  # name → when it was set (Kubernetes store)


class SecretStore(abc.ABC):
    """Where users' secrets live; every method takes (user, profile)."""

    @abc.abstractmethod
    async def put(self, user: str, profile: str, values: dict[str, str]) -> None:
        """Set (or replace) some of the user's secrets for the profile."""

    @abc.abstractmethod
    async def listing(self, user: str, profile: str) -> list[dict[str, Any]]:
        """`[{"name", "set_at"}]`: what is set, never the values."""

    @abc.abstractmethod
    async def delete(self, user: str, profile: str, name: str) -> bool:
        """Forget one secret; False when it was not set."""

    async def missing(self, user: str, profile: Profile) -> list[str]:
        """The profile's required secrets this user has not set."""
        names = {item["name"] for item in await self.listing(user, profile.name)}
        return sorted(n for n, spec in profile.user_secrets.items() if spec.required and n not in names)

    async def require(self, user: str, profile: Profile) -> None:
        """SECRETS_REQUIRED (409) when the user lacks a required secret of the profile."""
        missing = await self.missing(user, profile)
        if missing:
            raise PierError(
                "SECRETS_REQUIRED",
                f"{profile.name} needs secrets {user} has not set: " + ", ".join(missing),
                {"missing": missing, "set_with": f"PUT /v1/users/{user}/servers/{profile.name}/secrets"},
            )


class Sealer:
    """AES-GCM with a 32-byte key: a fresh nonce per value, its slot as associated data."""

    def __init__(self, key_b64: str) -> None:
        try:
            key = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("PIER_SECRETS_KEY must be base64 (of 32 random bytes)") from None
        if len(key) != 32:
            raise ValueError(f"PIER_SECRETS_KEY must hold 32 bytes, not {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, value: str, slot: str) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, value.encode(), slot.encode())).decode()

    def open(self, sealed: str | bytes, slot: str) -> str:
        raw = base64.b64decode(sealed)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], slot.encode()).decode()
        except InvalidTag:
            raise PierError("INTERNAL", "a stored secret cannot be decrypted (was PIER_SECRETS_KEY changed?)") from None


class RedisSecretStore(SecretStore):
    def __init__(self, redis: aioredis.Redis, sealer: Sealer) -> None:
        self.redis = redis
        self.sealer = sealer

    async def put(self, user: str, profile: str, values: dict[str, str]) -> None:
        now = time.time()
        fields = {
            name: dumps({"v": self.sealer.seal(value, f"{user}\0{profile}\0{name}"), "at": now})
            for name, value in values.items()
        }
        await self.redis.hset(keys.user_secrets(user, profile), mapping=fields)  # type: ignore[arg-type]

    async def _stored(self, user: str, profile: str) -> dict[str, dict[str, Any]]:
        stored = cast(dict[bytes, bytes], await self.redis.hgetall(keys.user_secrets(user, profile)))
        return {name.decode(): loads(raw) for name, raw in stored.items()}

    async def listing(self, user: str, profile: str) -> list[dict[str, Any]]:
        stored = await self._stored(user, profile)
        return [{"name": name, "set_at": stored[name]["at"]} for name in sorted(stored)]

    async def delete(self, user: str, profile: str, name: str) -> bool:
        return bool(await self.redis.hdel(keys.user_secrets(user, profile), name))

    async def values(self, user: str, profile: str) -> dict[str, str]:
        """The secrets in clear, for the user's server process (local sessions only)."""
        stored = await self._stored(user, profile)
        return {name: self.sealer.open(item["v"], f"{user}\0{profile}\0{name}") for name, item in stored.items()}


def check_values(profile: Profile, values: Any) -> dict[str, str]:
    """`values` as secrets of `profile` may be set: INVALID_ARGUMENTS (422) naming what is wrong (never a value)."""
    if not isinstance(values, dict) or not values:
        raise PierError("INVALID_ARGUMENTS", 'the body is an object of secrets: {"NAME": "value", …}')
    unknown = sorted(set(values) - set(profile.user_secrets))
    if unknown:
        raise PierError(
            "INVALID_ARGUMENTS", f"{profile.name} takes no secret named " + ", ".join(unknown),
            {"unknown": unknown, "secrets": sorted(profile.user_secrets)},
        )  # fmt: skip
    bad = sorted(name for name, value in values.items() if not isinstance(value, str) or len(value) > MAX_VALUE_BYTES)
    if bad:
        raise PierError(
            "INVALID_ARGUMENTS", f"secret values are strings of at most {MAX_VALUE_BYTES} bytes", {"names": bad}
        )
    return values


Request = Callable[..., Awaitable[tuple[int, Any]]]


def secret_name(user: str, profile: str) -> str:
    """The Kubernetes Secret of (user, profile): deterministic, valid, and no user id in clear."""
    return f"pier-secrets-{profile}-" + hashlib.sha256(f"{user}\0{profile}".encode()).hexdigest()[:16]


class KubernetesSecretStore(SecretStore):
    """One Secret per (user, profile) in the sessions' namespace, through the router's API client."""

    def __init__(self, request: Request, base_url: str, namespace: str) -> None:
        self._request = request
        self._base = f"{base_url}/api/v1/namespaces/{namespace}/secrets"

    async def _read(self, user: str, profile: str) -> dict[str, Any] | None:
        status, body = await self._request("GET", f"{self._base}/{secret_name(user, profile)}")
        if status == 404:
            return None
        _check(status, body, "read")
        return body if isinstance(body, dict) else None

    async def put(self, user: str, profile: str, values: dict[str, str]) -> None:
        current = await self._read(user, profile)
        set_at = loads(((current or {}).get("metadata", {}).get("annotations") or {}).get(SET_AT_ANNOTATION, "{}"))
        set_at.update({key: time.time() for key in values})
        annotations = {SET_AT_ANNOTATION: dumps(set_at).decode()}
        await write_secret(self._request, self._base, secret_name(user, profile), user, profile, values, current,
                           annotations)  # fmt: skip

    async def listing(self, user: str, profile: str) -> list[dict[str, Any]]:
        current = await self._read(user, profile)
        if current is None:
            return []
        set_at = loads((current["metadata"].get("annotations") or {}).get(SET_AT_ANNOTATION, "{}"))
        return [{"name": key, "set_at": set_at.get(key)} for key in sorted(current.get("data") or {})]

    async def delete(self, user: str, profile: str, name: str) -> bool:
        current = await self._read(user, profile)
        if current is None or name not in (current.get("data") or {}):
            return False
        data = {k: v for k, v in current["data"].items() if k != name}
        set_at = loads((current["metadata"].get("annotations") or {}).get(SET_AT_ANNOTATION, "{}"))
        set_at.pop(name, None)
        current["data"] = data
        current["metadata"].setdefault("annotations", {})[SET_AT_ANNOTATION] = dumps(set_at).decode()
        status, answer = await self._request("PUT", f"{self._base}/{current['metadata']['name']}", current)
        _check(status, answer, "write")
        return True


async def write_secret(
    request: Request, base: str, name: str, user: str, profile: str, values: dict[str, str],
    current: dict[str, Any] | None, annotations: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Create or update (with `current`'s resourceVersion) Secret `name` of (user, profile), labelled as the
    router's, `values` replacing the keys they name."""
    data = {**((current or {}).get("data") or {}),
            **{key: base64.b64encode(value.encode()).decode() for key, value in values.items()}}  # fmt: skip
    labels = {USER_LABEL: label_value(user), PROFILE_LABEL: profile, "app.kubernetes.io/managed-by": "pier-router"}
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "data": data}
    if current is None:
        status, answer = await request("POST", base, body)
    else:
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        status, answer = await request("PUT", f"{base}/{name}", body)
    _check(status, answer, "write")


def _check(status: int, body: Any, what: str) -> None:
    if status >= 300:
        reason = body.get("reason") if isinstance(body, dict) else None
        # The API server's answer can quote what was sent: only its reason is passed on.
        raise PierError("INTERNAL", f"cannot {what} the user's secrets (HTTP {status}, {reason})")
