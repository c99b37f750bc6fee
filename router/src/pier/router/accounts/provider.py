"""The router as an OAuth client of an authorization server: its metadata (RFC 8414 / OpenID discovery, or
endpoints given), the authorization request (code + PKCE S256, RFC 7636; resource, RFC 8707), the token
endpoint (the code, a refresh, a token exchange: RFC 6749, RFC 8693) and revocation (RFC 7009).

What an authorization server answers is checked before it is believed: a token response is a JSON object
with a bearer `access_token`, an error is `{"error": …}`. Anything else — garbage, an HTML page, a 5xx,
silence past the timeout — is `CONNECTION_FAILED` (502) with what went wrong, never what was sent: no
code, verifier or token reaches an error, a log line or a metric.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pier.core.errors import PierError

log = logging.getLogger("pier.router.accounts")

_METADATA_TTL_S = 3600.0
_MAX_BODY = 256 * 1024  # a token response is small; a provider answering megabytes is answering garbage
_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §5.2: error is printable ASCII
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class Metadata(BaseModel):
    """What the router uses of an authorization server's metadata (RFC 8414 §2)."""

    model_config = ConfigDict(extra="ignore")

    issuer: str | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str
    revocation_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    token_endpoint_auth_methods_supported: list[str] | None = None


class TokenResponse(BaseModel):
    """A successful token response (RFC 6749 §5.1; RFC 8693 §2.2.1 adds `issued_token_type`)."""

    model_config = ConfigDict(extra="ignore")

    access_token: str = Field(min_length=1, max_length=16384)
    token_type: str
    expires_in: float | None = Field(default=None, ge=0)
    refresh_token: str | None = Field(default=None, min_length=1, max_length=16384)
    scope: str | None = None
    issued_token_type: str | None = None
    id_token: str | None = None

    def expires_at(self, now: float) -> float | None:
        return now + self.expires_in if self.expires_in is not None else None


class ProviderFailed(PierError):
    """502: the authorization server could not be used (unreachable, timed out, answered garbage)."""

    def __init__(self, provider: str, why: str) -> None:
        super().__init__(
            "CONNECTION_FAILED",
            f"the authorization server at {provider} {why}; nothing was changed, try again later",
            {"provider": provider, "reason": "provider_unavailable"},
        )


class ProviderRefused(PierError):
    """The authorization server refused the grant (`invalid_grant`, …): a code spent or forged, a refresh
    token revoked or expired. The caller decides what that means (a 400 at the callback, a broken connection)."""

    def __init__(self, provider: str, error: str, description: str | None) -> None:
        text = f"the authorization server at {provider} refused: {error}"
        if description:
            text += f" ({description})"
        super().__init__("CONNECTION_FAILED", text, {"provider": provider, "reason": "refused", "error": error})
        self.error = error


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636 §4.1, §4.2)."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
    return verifier, s256(verifier)


def s256(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(code_verifier))), unpadded (RFC 7636 §4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def host_of(url: str) -> str:
    """How a provider is named in messages: its scheme and host (never a path or query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def discovery_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be: RFC 8414 §3.1 (the well-known path inserted before the issuer's
    path), then OpenID Connect Discovery (appended), for issuers with and without a path."""
    parts = urlsplit(issuer.rstrip("/"))
    path = parts.path
    urls = [urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", ""))]
    urls.append(urlunsplit((parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", "")))
    if path:
        urls.append(urlunsplit((parts.scheme, parts.netloc, "/.well-known/openid-configuration" + path, "", "")))
    return urls


class AuthorizationServer:
    """One authorization server, as one OAuth client (id and optional secret) sees it."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        timeout_s: float,
        client_id: str,
        client_secret: str | None,
        issuer: str | None = None,
        endpoints: dict[str, str | None] | None = None,
    ) -> None:
        self.http = http
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.client_id = client_id
        self.client_secret = client_secret
        self.issuer = issuer
        self.endpoints = {k: v for k, v in (endpoints or {}).items() if v}
        self.name = host_of(issuer or self.endpoints.get("token_endpoint") or "unknown")
        self._metadata: Metadata | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    # -- metadata --------------------------------------------------------------------------------

    async def metadata(self) -> Metadata:
        """The server's metadata: discovered (cached an hour), with the endpoints the profile gives on top."""
        if self._metadata is not None and time.monotonic() - self._fetched_at < _METADATA_TTL_S:
            return self._metadata
        async with self._lock:
            if self._metadata is None or time.monotonic() - self._fetched_at >= _METADATA_TTL_S:
                discovered = await self._discover() if self.issuer else {}
                try:
                    self._metadata = Metadata.model_validate({**discovered, **self.endpoints})
                except pydantic.ValidationError:
                    raise ProviderFailed(self.name, "published metadata without a token endpoint") from None
                self._fetched_at = time.monotonic()
        return self._metadata

    async def _discover(self) -> dict[str, Any]:
        assert self.issuer is not None
        failures: list[str] = []
        for url in discovery_urls(self.issuer):
            try:
                status, body = await self._request("GET", url)
            except ProviderFailed as failed:
                failures.append(failed.message)
                continue
            if status != 200 or not isinstance(body, dict):
                failures.append(f"HTTP {status}")
                continue
            # RFC 8414 §3.3: the metadata must name the issuer it was asked for (no mix-up).
            if str(body.get("issuer", "")).rstrip("/") != self.issuer.rstrip("/"):
                raise ProviderFailed(self.name, "published metadata for another issuer")
            return body
        log.warning("authorization server metadata unavailable", extra={"provider": self.name, "why": failures})
        raise ProviderFailed(self.name, "published no usable metadata (RFC 8414 or OpenID discovery)")

    # -- the authorization request -----------------------------------------------------------------

    async def authorization_url(
        self, state: str, challenge: str, redirect_uri: str, scopes: list[str], extra: dict[str, str]
    ) -> str:
        """Where the user's browser goes to authorize (RFC 6749 §4.1.1, with PKCE S256)."""
        metadata = await self.metadata()
        if metadata.authorization_endpoint is None:
            raise ProviderFailed(self.name, "publishes no authorization endpoint")
        methods = metadata.code_challenge_methods_supported
        if methods is not None and "S256" not in methods:
            raise ProviderFailed(self.name, "does not support PKCE with S256")
        params = {**extra, "response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                  "state": state, "code_challenge": challenge, "code_challenge_method": "S256"}  # fmt: skip
        if scopes:
            params["scope"] = " ".join(scopes)
        parts = urlsplit(metadata.authorization_endpoint)
        query = "&".join(q for q in (parts.query, urlencode(params, quote_via=quote)) if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    # -- the token endpoint ------------------------------------------------------------------------

    async def redeem(self, code: str, verifier: str, redirect_uri: str, resource: str | None) -> TokenResponse:
        """The authorization code for tokens (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}  # fmt: skip
        if resource:
            form["resource"] = resource
        return await self.token(form, [code, verifier])

    async def refresh(self, refresh_token: str, scopes: list[str], resource: str | None) -> TokenResponse:
        """A refresh (RFC 6749 §6)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scopes:
            form["scope"] = " ".join(scopes)
        if resource:
            form["resource"] = resource
        return await self.token(form, [refresh_token])

    async def exchange(self, subject_token: str, audience: str, scope: str | None) -> TokenResponse:
        """A token exchange (RFC 8693 §2.1): the caller's token for one aimed at `audience`."""
        form = {"grant_type": EXCHANGE_GRANT, "subject_token": subject_token,
                "subject_token_type": ACCESS_TOKEN_TYPE, "requested_token_type": ACCESS_TOKEN_TYPE,
                "audience": audience}  # fmt: skip
        if scope:
            form["scope"] = scope
        return await self.token(form, [subject_token])

    async def token(self, form: dict[str, str], sent_secrets: list[str]) -> TokenResponse:
        """POST to the token endpoint; the response checked (ProviderRefused, ProviderFailed)."""
        metadata = await self.metadata()
        headers, form = self._authenticate(metadata, form)
        status, body = await self._request("POST", metadata.token_endpoint, form, headers)
        if status == 200:
            try:
                answer = TokenResponse.model_validate(body)  # not JSON (None, a page) fails here too
            except pydantic.ValidationError:
                raise ProviderFailed(self.name, "answered a token response without a usable access token") from None
            if answer.token_type.lower() not in ("bearer", "n_a"):
                raise ProviderFailed(self.name, f"issued a {answer.token_type!r} token (Pier uses bearer tokens)")
            return answer
        raise self._refusal(status, body, sent_secrets)

    def _refusal(self, status: int, body: Any, sent_secrets: list[str]) -> PierError:
        error = body.get("error") if isinstance(body, dict) else None
        if status in (400, 401) and isinstance(error, str) and _ERROR_CODE.match(error):
            description = body.get("error_description")
            if not isinstance(description, str) or any(s and s in description for s in sent_secrets):
                description = None  # a provider echoing what it was sent must not put it in our errors
            return ProviderRefused(self.name, error, description[:200] if description else None)
        return ProviderFailed(self.name, f"answered HTTP {status} without an OAuth error")

    def _authenticate(self, metadata: Metadata, form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Client authentication (RFC 6749 §2.3.1): HTTP Basic with the secret (or in the body, when the
        server only takes that); a public client names itself."""
        if self.client_secret is None:
            return {}, {**form, "client_id": self.client_id}
        methods = metadata.token_endpoint_auth_methods_supported
        if methods is not None and "client_secret_basic" not in methods and "client_secret_post" in methods:
            return {}, {**form, "client_id": self.client_id, "client_secret": self.client_secret}
        user = quote(self.client_id, safe="")
        password = quote(self.client_secret, safe="")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}, form

    # -- revocation ------------------------------------------------------------------------------

    async def revoke(self, token: str, hint: str) -> bool:
        """Revoke a token (RFC 7009 §2.1); False when the server has no revocation endpoint or failed."""
        try:
            metadata = await self.metadata()
        except ProviderFailed:
            return False
        if metadata.revocation_endpoint is None:
            return False
        headers, form = self._authenticate(metadata, {"token": token, "token_type_hint": hint})
        try:
            status, _ = await self._request("POST", metadata.revocation_endpoint, form, headers)
        except ProviderFailed as failed:
            log.warning("token revocation failed", extra={"provider": self.name, "why": failed.message})
            return False
        if status != 200:
            log.warning("token revocation refused", extra={"provider": self.name, "status": status})
        return status == 200

    # -- HTTP ------------------------------------------------------------------------------------

    async def _request(
        self, method: str, url: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON or None); ProviderFailed when the server cannot be reached in time."""
        # The router's client does not decompress (it relays bodies as they are): plain answers only.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", **(headers or {})}
        try:
            async with self.http.request(
                method, url, data=form, headers=headers,
                timeout=self.timeout, allow_redirects=False,
            ) as response:  # fmt: skip
                raw = b""
                while len(raw) <= _MAX_BODY and (chunk := await response.content.read(65536)):
                    raw += chunk
                status = response.status
        except TimeoutError:
            raise ProviderFailed(self.name, f"did not answer within {self.timeout.total:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProviderFailed(self.name, f"could not be reached ({type(exc).__name__})") from None
        if len(raw) > _MAX_BODY:
            raise ProviderFailed(self.name, "answered more than a token response can be")
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None
