"""Sign-in with the company's identity provider: JWT bearer tokens from trusted OpenID issuers.

Each trusted issuer is found by discovery (`/.well-known/openid-configuration`, or OAuth's
`oauth-authorization-server`), and its signing keys (JWKS) are fetched, cached, and fetched again when
a token names a key the cache lacks — so keys rotate without a restart, and a key the issuer removed
stops working at the next refresh. A token is accepted when its signature verifies with an allowed
algorithm (asymmetric only: never `none`, never HMAC), its `iss` is trusted, its `aud` names this
router (its public URL, or a resource under it: RFC 8707), it is within `exp`/`nbf` (a minute's
leeway), its user claim is a valid user id, and it carries the required scopes. Its user acts only
for itself, like a user key.

The token itself is never kept, logged or passed on (MCP forbids passing it to the server).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pier.core.errors import PierError
from pier.core.names import is_user_id
from pier.router.auth.keys import Principal

log = logging.getLogger("pier.router.auth.oidc")

# Asymmetric algorithms only: a verifier holding only public keys can never be fooled into HMAC.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY_S = 60
_REFRESH_AT_MOST_EVERY_S = 10.0  # unknown `kid`s cannot make the router hammer the issuer
_FETCH_TIMEOUT_S = 5.0
# Claims the policy hook and audit records see (never the token; no technical claims).
PASSED_CLAIMS = ("iss", "sub", "email", "name", "preferred_username", "groups", "roles", "scope", "azp", "client_id")


class IssuerConfig(BaseModel):
    """One trusted issuer (`PIER_OIDC_ISSUER…`, or an item of `PIER_OIDC_ISSUERS`)."""

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(description="the issuer URL, exactly as its tokens' `iss` says")
    audience: str | None = Field(default=None, description="the `aud` required (default: the router's public URL)")
    user_claim: str = Field(default="sub", description="the claim that names the Pier user")
    scopes: list[str] = Field(default_factory=list, description="scopes every token must carry")
    groups_claim: str = Field(default="groups", description="the claim listing the user's groups (tool rules)")


class InvalidToken(PierError):
    """401: the token is not one this router accepts (the reason, never the token)."""

    def __init__(self, why: str) -> None:
        super().__init__("UNAUTHENTICATED", f"the bearer token is not valid: {why}", {"reason": "invalid_token"})


class InsufficientScope(PierError):
    """403: a valid token without the scopes this router requires."""

    def __init__(self, missing: list[str], required: list[str]) -> None:
        super().__init__(
            "FORBIDDEN",
            "the bearer token lacks required scopes: " + " ".join(missing),
            {"reason": "insufficient_scope", "scope": " ".join(required)},
        )


def router_url(request: web.Request, public_url: str | None) -> str:
    """The router's URL: PIER_PUBLIC_URL, else as this request reached it."""
    return public_url.rstrip("/") if public_url else f"{request.scheme}://{request.host}"


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts whose first decodes to a JOSE header: a JWT, not an API key."""
    if token.count(".") != 2:
        return False
    try:
        return "alg" in jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False


class TrustedIssuer:
    """An issuer's metadata and signing keys, fetched on first use and refreshed on unknown keys."""

    def __init__(self, config: IssuerConfig, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.http = http
        self.jwks_uri: str | None = None
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The signing key named `kid` (or the only key, when the token names none)."""
        found = self._find(kid)
        if found is None:
            async with self._lock:  # one refresh for many tokens naming a new key at once
                found = self._find(kid)
                if found is None and time.monotonic() - self._fetched_at >= _REFRESH_AT_MOST_EVERY_S:
                    await self._refresh()
                    found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            if self.jwks_uri is None:
                self.jwks_uri = await self._discover()
            jwks = await self._get(self.jwks_uri)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("cannot fetch the issuer's keys", extra={"issuer": self.config.issuer, "error": str(exc)})
            return
        keys: dict[str | None, jwt.PyJWK] = {}
        for data in jwks.get("keys", []):
            if data.get("use", "sig") != "sig":
                continue
            try:
                keys[data.get("kid")] = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue  # a key type or algorithm this router does not use
        self.keys = keys
        log.info("issuer keys fetched", extra={"issuer": self.config.issuer, "keys": len(keys)})

    async def _discover(self) -> str:
        base = self.config.issuer.rstrip("/")
        for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            try:
                metadata = await self._get(base + path)
            except (aiohttp.ClientError, ValueError):
                continue
            if metadata.get("issuer") != self.config.issuer:
                raise ValueError(f"discovery at {base}{path} names another issuer: {metadata.get('issuer')!r}")
            return str(metadata["jwks_uri"])
        raise ValueError(f"no OpenID or OAuth metadata at {base}")

    async def _get(self, url: str) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)
        async with self.http.get(url, timeout=timeout, headers={"Accept": "application/json"}) as response:
            response.raise_for_status()
            data = await response.json(content_type=None)
        if not isinstance(data, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return data


class TokenVerifier:
    """Every trusted issuer, and the checks a token must pass."""

    def __init__(self, configs: list[IssuerConfig], http: aiohttp.ClientSession, public_url: str | None) -> None:
        self.issuers = {c.issuer: TrustedIssuer(c, http) for c in configs}
        self.public_url = public_url.rstrip("/") if public_url else None

    @property
    def authorization_servers(self) -> list[str]:
        return list(self.issuers)

    def scopes(self) -> list[str]:
        return sorted({scope for issuer in self.issuers.values() for scope in issuer.config.scopes})

    async def verify(self, token: str, base_url: str) -> Principal:
        """The principal a token stands for; `base_url` is this router's URL as the request reached it
        (the audience when neither the issuer nor PIER_PUBLIC_URL names one)."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"algorithm {alg!r} is not accepted")
        issuer = self.issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise InvalidToken("its issuer is not trusted here")
        key = await issuer.key(header.get("kid"))
        if key is None:
            raise InvalidToken("it is signed with a key its issuer does not publish")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], issuer=issuer.config.issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "iss"], "verify_aud": False},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise InvalidToken("it has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("it is not valid yet") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(type(exc).__name__) from None
        self._check_audience(claims, issuer.config, base_url)
        return self._principal(claims, issuer.config)

    async def verify_id_token(self, token: str, issuer: str, client_id: str, nonce: str) -> dict[str, Any]:
        """An ID token (OpenID Connect Core §3.1.3.7) from `issuer` for this router as client `client_id`:
        signature, issuer, audience, times and the nonce the sign-in sent. Its claims."""
        trusted = self.issuers.get(issuer)
        if trusted is None:
            raise InvalidToken("its issuer is not trusted here")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"algorithm {alg!r} is not accepted")
        key = await trusted.key(header.get("kid"))
        if key is None:
            raise InvalidToken("it is signed with a key its issuer does not publish")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], issuer=issuer, audience=client_id, leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise InvalidToken(type(exc).__name__) from None
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce):
            raise InvalidToken("its nonce is not this sign-in's")
        return claims

    def principal_of_claims(self, claims: dict[str, Any], issuer: str) -> Principal:
        """The principal a signed-in user's claims stand for (as a token of theirs would)."""
        return self._principal(claims, self.issuers[issuer].config, check_scopes=False)

    def _check_audience(self, claims: dict[str, Any], config: IssuerConfig, base_url: str) -> None:
        audience = (config.audience or self.public_url or base_url).rstrip("/")
        given = claims.get("aud")
        values = given if isinstance(given, list) else [given] if isinstance(given, str) else []
        # RFC 8707: a token for this router's URL, or for a resource under it (one MCP endpoint).
        if not any(v.rstrip("/") == audience or v.startswith(audience + "/") for v in values if isinstance(v, str)):
            raise InvalidToken("it was issued for another audience")

    def _principal(self, claims: dict[str, Any], config: IssuerConfig, check_scopes: bool = True) -> Principal:
        missing = [s for s in config.scopes if s not in _scopes(claims)] if check_scopes else []
        if missing:
            raise InsufficientScope(missing, config.scopes)
        user = claims.get(config.user_claim)
        if not isinstance(user, str) or not is_user_id(user):
            raise InvalidToken(f"its {config.user_claim!r} claim is not a valid user id")
        groups = claims.get(config.groups_claim) or []
        digest = hashlib.sha256(f"{config.issuer}\0{user}".encode()).hexdigest()[:12]
        return Principal(
            "token", f"oidc:{digest}", user,
            claims={k: claims[k] for k in PASSED_CLAIMS if k in claims},
            groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
        )  # fmt: skip


def _scopes(claims: dict[str, Any]) -> set[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return set(scope.split())
    scp = claims.get("scp")
    return {str(s) for s in scp} if isinstance(scp, list) else set()
