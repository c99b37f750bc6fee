"""Who is calling: app keys (any user), user keys (one user), tokens from a trusted identity provider
(one user: `oidc`), or nobody when no keys and no issuers are set."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pier.core.errors import PierError
from pier.core.tls import common_name

log = logging.getLogger("pier.router.auth")

KeyClass = Literal["app", "user", "token", "open"]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. `key_id` is a short digest: safe to log, useless to an attacker."""

    key_class: KeyClass
    key_id: str
    user_id: str | None = None  # set for user keys and tokens: the only user they may act for
    subject: str | None = None  # the verified client certificate's subject (mTLS)
    claims: dict[str, Any] | None = None  # a token's claims that policy may use (never the token)
    groups: tuple[str, ...] = ()  # a token's groups, for the profile's tool rules

    def identity(self) -> dict[str, Any]:
        """Who is calling, for audit records and the policy hook (never the key or token itself)."""
        identity: dict[str, Any] = {
            "key_class": self.key_class, "key_id": self.key_id, "bound_user": self.user_id, "subject": self.subject,
        }  # fmt: skip
        if self.claims is not None:
            identity["claims"] = self.claims
        return identity

    def check_user(self, user_id: str) -> None:
        if self.user_id is not None and self.user_id != user_id:
            raise PierError("FORBIDDEN", "this key may not act for that user")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    app_keys: list[str] = Field(default_factory=list)
    user_keys: dict[str, str] = Field(default_factory=dict, description="key → user_id")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-API-Key") or None


class KeyRing:
    """The configured keys, held as SHA-256 digests and compared in constant time."""

    def __init__(self, app_keys: list[str], user_keys: dict[str, str], closed: bool = False) -> None:
        # `closed`: other credentials exist (tokens from an identity provider), so no keys ≠ open.
        self._closed = closed
        self._keys: list[tuple[bytes, Principal]] = []
        for key in app_keys:
            self._keys.append((_digest(key), Principal("app", _digest(key).hex()[:12])))
        for key, user_id in user_keys.items():
            self._keys.append((_digest(key), Principal("user", _digest(key).hex()[:12], user_id)))

    @classmethod
    def load(cls, app_keys: list[str], user_keys: dict[str, str], path: Path | None, closed: bool = False) -> KeyRing:
        if path is not None:
            data = KeysFile.model_validate(yaml.safe_load(path.read_text()) or {})
            app_keys = [*app_keys, *data.app_keys]
            user_keys = {**user_keys, **data.user_keys}
        return cls(app_keys, user_keys, closed)

    @property
    def open(self) -> bool:
        return not self._keys and not self._closed

    def authenticate(self, key: str | None, subject: str | None = None, cert_users: bool = False) -> Principal:
        """The caller behind `key` (and the client certificate `subject`, with mTLS)."""
        if key is None and subject is not None and cert_users:
            user = common_name(subject)
            if user:
                return Principal("user", "cert:" + _digest(subject).hex()[:12], user, subject)
        if self.open:
            return Principal("open", "open", subject=subject)
        if key is None:
            raise PierError(
                "UNAUTHENTICATED",
                "an API key is required (Authorization: Bearer KEY or X-API-Key)",
                {"reason": "missing"},
            )
        supplied = _digest(key)
        found = None
        # Every configured key is compared, matching or not, so timing says nothing about which matched.
        for digest, principal in self._keys:
            if hmac.compare_digest(supplied, digest):
                found = principal
        if found is None:
            raise PierError("UNAUTHENTICATED", "the API key is not valid", {"reason": "invalid"})
        return dataclasses.replace(found, subject=subject) if subject else found
