"""Sign-in to the portal with the company's identity provider: the router as an OpenID Connect client
(`PIER_OIDC_ISSUER`, `PIER_OIDC_CLIENT_ID`) — authorization code with PKCE and a nonce — and the session
that follows, held in a cookie.

The cookie (`pier_session`) is HttpOnly, SameSite=Lax, Secure over HTTPS (`PIER_PUBLIC_URL` says so behind
a proxy that ends TLS), and holds only a random id; what it stands for (the user, their claims, a CSRF
token, the provider's access token for token exchange) is sealed in Redis under the id's digest, so any
replica serves it and stealing Redis gives no cookie.
The cookie identifies its user on the portal and on the few routes a browser opens
(`…/connect`, `…/connection`); anything it authorizes that changes state must come from this router's
own origin (`same_origin`), and the portal's forms also carry the session's CSRF token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import pydantic
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import BaseModel

from pier.core import redis_keys as keys
from pier.core.errors import PierError
from pier.router.accounts.flows import BROWSER_COOKIE, Flow, bad_state, browser_digest, new_browser_cookie
from pier.router.accounts.provider import ProviderRefused, pkce_pair
from pier.router.accounts.service import Accounts
from pier.router.auth.keys import Principal
from pier.router.auth.oidc import InvalidToken, TokenVerifier
from pier.router.config import RouterSettings
from pier.router.usersecrets import Sealer

SESSION_COOKIE = "pier_session"
CALLBACK_PATH = "/portal/callback"


def signin_configured(settings: RouterSettings) -> bool:
    """The portal can sign users in: an identity provider and the router's client there."""
    return bool(settings.oidc_issuer and settings.oidc_client_id)


class PortalSession(BaseModel):
    """A signed-in user, as the portal remembers them."""

    user: str
    issuer: str
    claims: dict[str, Any]
    groups: list[str]
    key_id: str
    csrf: str  # the token every form of this session carries
    subject_token: str | None = None  # the provider's access token for this router (token exchange)
    created_at: float
    expires_at: float

    def principal(self) -> Principal:
        return Principal("token", self.key_id, self.user, claims=self.claims, groups=tuple(self.groups))


class PortalSessions:
    """Signed-in sessions in Redis, sealed, by the digest of their cookie."""

    def __init__(self, redis: aioredis.Redis, sealer: Sealer, ttl_s: int) -> None:
        self.redis = redis
        self.sealer = sealer
        self.ttl_s = ttl_s

    async def create(self, session: PortalSession) -> str:
        """Keep `session`; the cookie value that names it."""
        cookie = secrets.token_urlsafe(32)
        key = keys.portal_session(_digest(cookie))
        ttl = max(int(session.expires_at - time.time()), 1)
        await self.redis.set(key, self.sealer.seal(session.model_dump_json(), key), ex=ttl)
        return cookie

    async def get(self, cookie: str | None) -> PortalSession | None:
        if not cookie or len(cookie) > 128:
            return None
        key = keys.portal_session(_digest(cookie))
        sealed = await self.redis.get(key)
        if sealed is None:
            return None
        try:
            session = PortalSession.model_validate_json(self.sealer.open(sealed, key))
        except (PierError, pydantic.ValidationError):
            return None
        return session if session.expires_at > time.time() else None

    async def end(self, cookie: str | None) -> None:
        if cookie and len(cookie) <= 128:
            await self.redis.delete(keys.portal_session(_digest(cookie)))


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


class SignIn:
    """The portal's sign-in flow at the company's identity provider."""

    def __init__(
        self, settings: RouterSettings, accounts: Accounts, verifier: TokenVerifier, sessions: PortalSessions
    ) -> None:
        assert settings.oidc_issuer is not None
        assert settings.oidc_client_id is not None
        self.settings = settings
        self.issuer = settings.oidc_issuer
        self.client_id = settings.oidc_client_id
        self.accounts = accounts
        self.verifier = verifier
        self.sessions = sessions

    async def begin(self, base_url: str, browser_cookie: str, after: str | None) -> str:
        """The provider's sign-in URL for this browser."""
        provider = self.accounts.identity_provider(self.issuer)
        await provider.metadata()
        verifier, challenge = pkce_pair()
        nonce = secrets.token_urlsafe(24)
        flow = Flow(
            kind="signin", verifier=verifier, redirect_uri=base_url + CALLBACK_PATH,
            browser=browser_digest(browser_cookie), next=after, nonce=nonce, created_at=time.time(),
        )  # fmt: skip
        state = await self.accounts.flows.start(flow)
        scopes = ["openid", *(s for s in self.settings.oidc_scopes if s != "openid")]
        # The access token is asked for this router (RFC 8707): the one a token exchange starts from.
        extra = {"nonce": nonce, "resource": self._audience(base_url)}
        return await provider.authorization_url(state, challenge, flow.redirect_uri, scopes, extra)

    def _audience(self, base_url: str) -> str:
        issuer = self.verifier.issuers[self.issuer].config
        return (issuer.audience or self.settings.public_url or base_url).rstrip("/")

    async def complete(self, query: dict[str, str], browser_cookie: str | None, base_url: str) -> tuple[str, Flow]:
        """The provider's redirect back: a new session's cookie, and the flow (where to go next)."""
        flow = await self.accounts.flows.take(query.get("state"))
        if flow.kind != "signin" or flow.nonce is None:
            raise bad_state("it is not a sign-in's")
        if not flow.bound_to(browser_cookie):
            raise bad_state("it was started in another browser")
        if "error" in query or not query.get("code"):
            raise PierError("BAD_REQUEST", "the identity provider did not sign you in", {"reason": "denied"})
        provider = self.accounts.identity_provider(self.issuer)
        try:
            tokens = await provider.redeem(query["code"], flow.verifier, flow.redirect_uri, self._audience(base_url))
        except ProviderRefused as refused:
            raise PierError("BAD_REQUEST", refused.message, refused.details) from None
        if tokens.id_token is None:
            raise PierError("CONNECTION_FAILED", "the identity provider answered without an ID token")
        try:
            claims = await self.verifier.verify_id_token(tokens.id_token, self.issuer, self.client_id, flow.nonce)
        except InvalidToken as invalid:
            raise PierError("BAD_REQUEST", f"the sign-in cannot be trusted: {invalid.message}") from None
        principal = self.verifier.principal_of_claims(claims, self.issuer)
        assert principal.user_id is not None
        now = time.time()
        session = PortalSession(
            user=principal.user_id, issuer=self.issuer, claims=principal.claims or {}, groups=list(principal.groups),
            key_id=principal.key_id, csrf=secrets.token_urlsafe(24), subject_token=tokens.access_token,
            created_at=now, expires_at=now + self.settings.portal_session_ttl_s,
        )  # fmt: skip
        return await self.sessions.create(session), flow


# -- cookies and origins -----------------------------------------------------------------------------


def set_cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int, base_url: str
) -> None:
    """An HttpOnly, SameSite=Lax cookie; Secure when browsers reach the router over HTTPS: this request came
    so, or the router's URL (`base_url`: PIER_PUBLIC_URL) is https, as behind a proxy that ends TLS."""
    secure = request.scheme == "https" or base_url.startswith("https://")
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Lax", secure=secure)


def browser_cookie(request: web.Request, response: web.StreamResponse, base_url: str) -> str:
    """This browser's binding cookie (made now if it has none): what its authorizations are bound to."""
    value = request.cookies.get(BROWSER_COOKIE)
    if not value or len(value) > 128:
        value = new_browser_cookie()
        set_cookie(response, request, BROWSER_COOKIE, value, 3600, base_url)
    return value


def same_origin(request: web.Request, base_url: str) -> bool:
    """Whether a browser sent `request` from this router's own pages (the Fetch metadata and Origin headers
    browsers set, or the Referer where they set neither)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return site == "same-origin"
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.rstrip("/") == _origin(base_url)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def local_path(after: str | None, default: str) -> str:
    """A path on this router to go to afterwards (never another site: `//host` or `scheme:` are refused)."""
    if not after or not after.startswith("/") or after.startswith("//") or "\\" in after or len(after) > 2000:
        return default
    return after
