"""`Accounts`: what the router knows of users' upstream tokens, and how it keeps them fresh.

- **Connected accounts** (a profile's `upstream_oauth`): `begin` makes the authorization URL (PKCE S256,
  a single-use state bound to the user, the profile and, for a browser, that browser); `complete` takes
  the callback (the state checked first: a forged, replayed or expired one changes nothing), redeems the
  code and stores the tokens; `disconnect` revokes them at the provider (RFC 7009) and forgets them.
- **Tokens for sessions** (`credential`): a valid access token for (user, profile), refreshed before it
  expires by one replica at a time (a Redis lock; the others wait and read what it stored). A refresh the
  provider refuses marks the connection broken (the user must connect again); a provider that is down
  or answers garbage leaves the connection as it was.
- **Token exchange** (a profile's `token_exchange`, RFC 8693): the caller's own token from the company's
  identity provider (`SUBJECT_TOKEN`, set where the caller was identified) exchanged there for one aimed
  at the upstream, cached (sealed) until it expires.

No token is ever logged, counted, returned by a view or put in an error.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp
import pydantic
import redis.asyncio as aioredis
from pydantic import BaseModel

from pier.core import redis_keys as keys
from pier.core.catalog import Catalog, Profile, UpstreamOAuth
from pier.core.errors import ConfigError, PierError
from pier.router.accounts.flows import Flow, Flows, bad_state, browser_digest
from pier.router.accounts.provider import (
    AuthorizationServer,
    ProviderFailed,
    ProviderRefused,
    TokenResponse,
    pkce_pair,
)
from pier.router.accounts.store import NOT_CONNECTED, Connection, ConnectionStore, renew_at
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.usersecrets import Sealer

log = logging.getLogger("pier.router.accounts")

# The caller's own token from a trusted identity provider, for this request only: (issuer, token).
SUBJECT_TOKEN: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("pier_subject", default=None)
_LOCK_S = 30.0  # a refresh holding the lock longer than this is presumed dead (its router died)
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass(frozen=True)
class Credential:
    """The upstream token a session of (user, profile) receives, and when to get a newer one."""

    token: str
    expires_at: float | None
    renew_at: float | None  # None: it does not expire

    def stale(self, now: float) -> bool:
        return self.renew_at is not None and now >= self.renew_at


class Exchanged(BaseModel):
    """A token had by token exchange, as cached."""

    token: str
    expires_at: float | None
    obtained_at: float


def connection_required(profile: str, reason: str, message: str) -> PierError:
    """409: the user must connect their account first (the route adds `connect_url`)."""
    return PierError("CONNECTION_REQUIRED", message, {"server": profile, "reason": reason})


class Accounts:
    def __init__(
        self,
        settings: RouterSettings,
        catalog: Catalog,
        http: aiohttp.ClientSession,
        redis: aioredis.Redis,
        sealer: Sealer,
        store: ConnectionStore,
        metrics: RouterMetrics,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.http = http
        self.redis = redis
        self.sealer = sealer
        self.store = store
        self.metrics = metrics
        self.flows = Flows(redis, sealer, settings.oauth_flow_ttl_s)
        self.providers = {
            p.name: self._provider(p.name, p.upstream_oauth) for p in catalog.profiles.values() if p.upstream_oauth
        }
        self._issuers: dict[str, AuthorizationServer] = {}  # identity providers, for token exchange
        # One exchange at a time per user and profile in this process: a client's first requests come
        # together (an MCP client's initialize, its stream, its first call), and one exchange serves them all.
        self._exchanging: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._unlock = redis.register_script(_UNLOCK)

    def _provider(self, name: str, oauth: UpstreamOAuth) -> AuthorizationServer:
        secret = None
        if oauth.client_secret_env is not None:
            secret = os.environ.get(oauth.client_secret_env)
            if not secret:
                raise ConfigError(
                    f"profile {name} connects accounts with client {oauth.client_id!r}: set its secret in the "
                    f"router's environment variable {oauth.client_secret_env}"
                )
        endpoints = {"authorization_endpoint": oauth.authorization_endpoint, "token_endpoint": oauth.token_endpoint,
                     "revocation_endpoint": oauth.revocation_endpoint}  # fmt: skip
        return AuthorizationServer(self.http, self.settings.oauth_timeout_s, oauth.client_id, secret, oauth.issuer,
                                   endpoints)  # fmt: skip

    def identity_provider(self, issuer: str) -> AuthorizationServer:
        """The company's identity provider `issuer`, as the router's own client (sign-in, token exchange)."""
        server = self._issuers.get(issuer)
        if server is None:
            if not self.settings.oidc_client_id:
                raise PierError(
                    "INTERNAL", "the router has no client id at the identity provider (PIER_OIDC_CLIENT_ID)"
                )
            secret = self.settings.oidc_client_secret
            server = AuthorizationServer(
                self.http, self.settings.oauth_timeout_s, self.settings.oidc_client_id,
                secret.get_secret_value() if secret else None, issuer,
            )  # fmt: skip
            self._issuers[issuer] = server
        return server

    def _oauth(self, profile: Profile) -> tuple[UpstreamOAuth, AuthorizationServer]:
        if profile.upstream_oauth is None:
            raise PierError("NOT_FOUND", f"{profile.name} connects no accounts (it has no upstream_oauth)")
        return profile.upstream_oauth, self.providers[profile.name]

    # -- connecting --------------------------------------------------------------------------------

    async def begin(
        self, user: str, profile: Profile, redirect_uri: str, browser_cookie: str | None, after: str | None
    ) -> str:
        """The authorization URL for `user` to connect their account for `profile`."""
        oauth, provider = self._oauth(profile)
        await provider.metadata()  # no state is kept for a provider that cannot be used
        verifier, challenge = pkce_pair()
        flow = Flow(
            kind="connect", user=user, profile=profile.name, verifier=verifier, redirect_uri=redirect_uri,
            browser=browser_digest(browser_cookie) if browser_cookie else None, next=after, created_at=time.time(),
        )  # fmt: skip
        state = await self.flows.start(flow)
        extra = dict(oauth.authorization_params)
        if oauth.resource:
            extra["resource"] = oauth.resource
        log.info("account connection started", extra={"user": user, "profile": profile.name})
        return await provider.authorization_url(state, challenge, redirect_uri, oauth.scopes, extra)

    async def complete(
        self, query: dict[str, str], browser_cookie: str | None, signed_in: str | None
    ) -> tuple[Flow, Connection]:
        """The provider's redirect back (`query`: code, state, or error). The state first: a forged,
        replayed or expired one, one started in another browser or by another signed-in user, is
        refused (400) and changes nothing. Then the code is redeemed and the connection stored."""
        try:
            flow = await self.flows.take(query.get("state"))
            if flow.kind != "connect" or flow.user is None or flow.profile is None:
                raise bad_state("it is not an account connection's")
            if not flow.bound_to(browser_cookie):
                raise bad_state("it was started in another browser")
            if signed_in is not None and signed_in != flow.user:
                raise bad_state("it was started by another user")
        except PierError:
            self.metrics.oauth_connections.labels("unknown", "bad_state").inc()
            raise
        profile = self.catalog.get(flow.profile)
        connection = await self._redeem(flow, profile, query)
        log.info("account connected", extra={"user": flow.user, "profile": profile.name})
        return flow, connection

    async def _redeem(self, flow: Flow, profile: Profile, query: dict[str, str]) -> Connection:
        oauth, provider = self._oauth(profile)
        assert flow.user is not None
        outcome = "failed"
        try:
            if "error" in query:
                outcome = "denied"
                error = query["error"] if query["error"].replace("_", "").isalnum() else "an error"
                raise PierError("BAD_REQUEST", f"the provider did not authorize the connection: {error[:64]}",
                                {"reason": "denied", "error": error[:64]})  # fmt: skip
            issuer = query.get("iss")  # RFC 9207: the response names its issuer; it must be this one
            if issuer is not None and oauth.issuer is not None and issuer.rstrip("/") != oauth.issuer.rstrip("/"):
                raise bad_state("the response came from another authorization server")
            if not query.get("code"):
                raise bad_state("the response carries no authorization code")
            try:
                tokens = await provider.redeem(query["code"], flow.verifier, flow.redirect_uri, oauth.resource)
            except ProviderRefused as refused:
                outcome = "refused"
                raise PierError("BAD_REQUEST", refused.message, refused.details) from None
            now = time.time()
            previous = await self.store.get(flow.user, profile.name)
            connection = Connection(
                access_token=tokens.access_token, refresh_token=tokens.refresh_token,
                scopes=_scopes(tokens, oauth.scopes), expires_at=tokens.expires_at(now), obtained_at=now,
                connected_at=now,
            )  # fmt: skip
            await self.store.put(flow.user, profile.name, connection)
            outcome = "connected"
        finally:
            self.metrics.oauth_connections.labels(profile.name, outcome).inc()
        if previous is not None and previous.refresh_token and previous.refresh_token != connection.refresh_token:
            # The account was connected before: the grant it replaces is revoked, not left behind.
            await provider.revoke(previous.refresh_token, "refresh_token")
        return connection

    async def view(self, user: str, profile: Profile) -> dict[str, Any]:
        """What `GET …/connection` shows: connected or not, scopes, expiry — never a token."""
        if profile.token_exchange is not None:
            cached = await self._cached_exchange(user, profile)
            live = cached is not None and (cached.expires_at is None or cached.expires_at > time.time())
            scopes = (profile.token_exchange.scope or "").split()
            expires_at = cached.expires_at if cached else None
            return {"connected": live, "status": "token_exchange", "scopes": scopes, "expires_at": expires_at}
        self._oauth(profile)
        connection = await self.store.get(user, profile.name)
        return connection.view() if connection is not None else dict(NOT_CONNECTED)

    async def disconnect(self, user: str, profile: Profile) -> bool:
        """Revoke the user's tokens at the provider (where it supports RFC 7009), then forget them;
        False when the account was not connected."""
        _, provider = self._oauth(profile)
        connection = await self.store.get(user, profile.name)
        if connection is None:
            return False
        revoked = False
        if connection.refresh_token:
            revoked = await provider.revoke(connection.refresh_token, "refresh_token")
        revoked = await provider.revoke(connection.access_token, "access_token") or revoked
        self.metrics.oauth_revocations.labels(profile.name, "revoked" if revoked else "not_revoked").inc()
        await self.store.delete(user, profile.name)
        log.info("account disconnected", extra={"user": user, "profile": profile.name, "revoked": revoked})
        return True

    # -- tokens for sessions -----------------------------------------------------------------------

    async def credential(self, user: str, profile: Profile) -> Credential:
        """The token a session of (user, profile) starts with, valid now: CONNECTION_REQUIRED (409) when
        the user has not connected (or the connection broke), CONNECTION_FAILED (502) when the provider
        is needed and cannot be used."""
        if profile.token_exchange is not None:
            return await self._exchange(user, profile)
        connection = await self.store.get(user, profile.name)
        if connection is None:
            raise connection_required(profile.name, "not_connected", f"connect your account for {profile.name} first")
        if connection.status == "broken":
            raise connection_required(
                profile.name, "broken", f"your connection for {profile.name} stopped working: connect it again"
            )
        now = time.time()
        if connection.due(now, self.settings.oauth_refresh_margin_s):
            connection = await self._fresh(user, profile, connection)
        return self._credential(connection)

    async def renew(self, user: str, profile: Profile, held: Credential) -> Credential | None:
        """A newer token than `held` for a live session (None: none to be had now; the session keeps
        its own). Raises CONNECTION_REQUIRED when the connection is gone or broke: the session must end."""
        if profile.token_exchange is not None:
            if SUBJECT_TOKEN.get() is None:
                return None  # only a caller's own token can be exchanged: the next one renews it
            fresh = await self._exchange(user, profile)
        else:
            fresh = await self.credential(user, profile)
        return fresh if fresh.token != held.token else None

    def _credential(self, connection: Connection) -> Credential:
        margin = self.settings.oauth_refresh_margin_s
        when = renew_at(connection.expires_at, connection.obtained_at, margin)
        return Credential(connection.access_token, connection.expires_at, when)

    async def _fresh(self, user: str, profile: Profile, stale: Connection) -> Connection:
        """A refreshed connection, refreshed by one replica: the lock's holder refreshes, the others wait
        for what it stored. A provider that cannot be used leaves the connection as it is (still usable
        until it expires)."""
        try:
            return await self._refreshed_once(user, profile, stale)
        except ProviderFailed:
            self.metrics.oauth_refreshes.labels(profile.name, "failed").inc()
            if stale.expires_at is not None and stale.expires_at <= time.time():
                raise
            log.warning("token refresh failed; the current token is kept", extra={"profile": profile.name})
            return stale

    async def _refreshed_once(self, user: str, profile: Profile, stale: Connection) -> Connection:
        lock = keys.connection_lock(user, profile.name)
        holder = secrets.token_hex(16)
        waited_until = time.monotonic() + _LOCK_S + self.settings.oauth_timeout_s
        while True:
            if await self.redis.set(lock, holder, nx=True, px=int(_LOCK_S * 1000)):
                try:
                    current = await self.store.get(user, profile.name)
                    if current is None:
                        raise connection_required(profile.name, "not_connected", f"{profile.name} was disconnected")
                    if current.access_token != stale.access_token or current.status == "broken":
                        return self._settled(profile, current)
                    return await self._refresh(user, profile, current)
                finally:
                    await self._unlock(keys=[lock], args=[holder])
            await asyncio.sleep(0.05)  # another replica is refreshing: what it stores is ours too
            current = await self.store.get(user, profile.name)
            if current is None:
                raise connection_required(profile.name, "not_connected", f"{profile.name} was disconnected")
            if current.access_token != stale.access_token or current.status == "broken":
                return self._settled(profile, current)
            if time.monotonic() > waited_until:
                raise ProviderFailed(self.providers[profile.name].name, "was being refreshed for too long")

    def _settled(self, profile: Profile, connection: Connection) -> Connection:
        if connection.status == "broken":
            raise connection_required(
                profile.name, "broken", f"your connection for {profile.name} stopped working: connect it again"
            )
        return connection

    async def _refresh(self, user: str, profile: Profile, connection: Connection) -> Connection:
        """Refresh now (this replica holds the lock)."""
        oauth, provider = self._oauth(profile)
        if connection.refresh_token is None:
            if connection.expires_at is not None and connection.expires_at <= time.time():
                raise connection_required(profile.name, "expired", f"your {profile.name} token expired: connect again")
            return connection  # no refresh token: used until it expires
        try:
            tokens = await provider.refresh(connection.refresh_token, [], oauth.resource)
        except ProviderRefused as refused:
            self.metrics.oauth_refreshes.labels(profile.name, "refused").inc()
            broken = connection.model_copy(update={"status": "broken", "reason": f"refresh refused: {refused.error}"})
            await self.store.put(user, profile.name, broken)
            log.warning("token refresh refused: connection broken", extra={"user": user, "profile": profile.name,
                                                                            "error": refused.error})  # fmt: skip
            raise connection_required(
                profile.name, "broken", f"your connection for {profile.name} stopped working: connect it again"
            ) from None
        now = time.time()
        refreshed = connection.model_copy(
            update={"access_token": tokens.access_token, "expires_at": tokens.expires_at(now), "obtained_at": now,
                    # RFC 6749 §6: a new refresh token replaces the old; none issued keeps the old one
                    "refresh_token": tokens.refresh_token or connection.refresh_token,
                    "scopes": _scopes(tokens, connection.scopes)},
        )  # fmt: skip
        await self.store.put(user, profile.name, refreshed)
        self.metrics.oauth_refreshes.labels(profile.name, "refreshed").inc()
        log.info("token refreshed", extra={"user": user, "profile": profile.name})
        return refreshed

    # -- token exchange ----------------------------------------------------------------------------

    async def _cached_exchange(self, user: str, profile: Profile) -> Exchanged | None:
        key = keys.exchanged(user, profile.name)
        sealed = await self.redis.get(key)
        if sealed is None:
            return None
        try:
            return Exchanged.model_validate_json(self.sealer.open(sealed, key))
        except pydantic.ValidationError:
            return None

    async def _exchange(self, user: str, profile: Profile) -> Credential:
        lock = self._exchanging.setdefault((user, profile.name), asyncio.Lock())
        async with lock:  # the waiters then find the token the first one stored
            return await self._exchange_once(user, profile)

    async def _exchange_once(self, user: str, profile: Profile) -> Credential:
        exchange = profile.token_exchange
        assert exchange is not None
        now = time.time()
        cached = await self._cached_exchange(user, profile)
        subject = SUBJECT_TOKEN.get()
        usable = cached is not None and (cached.expires_at is None or cached.expires_at > now)
        if cached is not None and usable and (subject is None or not self._due(cached, now)):
            return self._exchanged_credential(cached)
        if subject is None:
            raise PierError(
                "UNAUTHENTICATED",
                f"{profile.name} acts with the caller's own identity (token exchange): call with a token from "
                "the company's identity provider",
                {"reason": "subject_token_required", "server": profile.name},
            )
        issuer, token = subject
        try:
            tokens = await self.identity_provider(issuer).exchange(token, exchange.audience, exchange.scope)
        except ProviderRefused as refused:
            self.metrics.token_exchanges.labels(profile.name, "refused").inc()
            raise PierError(
                "FORBIDDEN",
                f"the identity provider would not exchange the caller's token for {exchange.audience}",
                {"reason": "exchange_refused", "error": refused.error},
            ) from None
        except ProviderFailed:
            self.metrics.token_exchanges.labels(profile.name, "failed").inc()
            raise
        self.metrics.token_exchanges.labels(profile.name, "exchanged").inc()
        got = Exchanged(token=tokens.access_token, expires_at=tokens.expires_at(now), obtained_at=now)
        key = keys.exchanged(user, profile.name)
        ttl = max(int(got.expires_at - now), 1) if got.expires_at is not None else None
        await self.redis.set(key, self.sealer.seal(got.model_dump_json(), key), ex=ttl)
        return self._exchanged_credential(got)

    def _due(self, cached: Exchanged, now: float) -> bool:
        when = renew_at(cached.expires_at, cached.obtained_at, self.settings.oauth_refresh_margin_s)
        return when is not None and now >= when

    def _exchanged_credential(self, got: Exchanged) -> Credential:
        when = renew_at(got.expires_at, got.obtained_at, self.settings.oauth_refresh_margin_s)
        return Credential(got.token, got.expires_at, when)

    async def forget_exchanged(self, user: str, profile: str) -> None:
        await self.redis.delete(keys.exchanged(user, profile))


def _scopes(tokens: TokenResponse, asked: list[str]) -> list[str]:
    """The scopes granted (RFC 6749 §5.1: the response says when they differ from those asked for)."""
    return tokens.scope.split() if tokens.scope else list(asked)
