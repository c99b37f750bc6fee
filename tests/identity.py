"""A real OpenID provider for the tests (`tests/oidc/provider.mjs`: panva's oidc-provider from npm), and
a headless user who signs in on its login screen."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from pier.cli.redis_server import free_port
from tests.servers import NODE_MODULES, ROOT, wait_until

PROVIDER = ROOT / "tests" / "oidc" / "provider.mjs"


def new_key(kid: str) -> dict[str, Any]:
    """An RS256 signing key as a private JWK."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


class OpenIdProvider:
    """The provider as a process; its keys are the test's, so it can rotate them (`restart`).

    `clients`: static clients (with secrets: the router's); `access_ttl`: access tokens' lifetime;
    `exchange_ttl`: the lifetime of tokens it gives by token exchange.
    """

    def __init__(
        self, work: Path, keys: list[dict[str, Any]] | None = None, clients: list[dict[str, Any]] | None = None,
        access_ttl: int = 600, exchange_ttl: int = 300,
    ) -> None:  # fmt: skip
        self.work = work
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.keys = keys or [new_key("k1")]
        self.clients = clients or []
        self.access_ttl = access_ttl
        self.exchange_ttl = exchange_ttl
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        keys = self.work / "jwks.json"
        keys.write_text(json.dumps({"keys": self.keys}))
        clients = self.work / "clients.json"
        clients.write_text(json.dumps(self.clients))
        env = {
            **os.environ, "PORT": str(self.port), "KEYS": str(keys), "NODE_MODULES": str(NODE_MODULES),
            "CLIENTS": str(clients), "ACCESS_TTL": str(self.access_ttl), "EXCHANGE_TTL": str(self.exchange_ttl),
        }  # fmt: skip
        with (self.work / "provider.log").open("ab") as log:  # the child keeps its own copy of the file
            self.proc = await asyncio.create_subprocess_exec(
                "node", str(PROVIDER), env=env, stdout=log, stderr=log, cwd=NODE_MODULES.parent
            )

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(self.discovery_url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, timeout=30)

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    async def stats(self) -> dict[str, Any]:
        """Successful grants by type, and requests to the revocation endpoint (the script's own counters)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.issuer}/test/stats") as response:
            data: dict[str, Any] = await response.json()
            return data

    async def fault(self, mode: str) -> None:
        """Make the token endpoint answer garbage (`garbage`), nothing (`hang`), or properly again (`off`)."""
        async with aiohttp.ClientSession() as http, http.post(f"{self.issuer}/test/fault?mode={mode}") as response:
            assert response.status == 200

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await self.proc.wait()

    async def restart(self, keys: list[dict[str, Any]]) -> None:
        """The same issuer with other keys (a key rotation; its in-memory grants are lost)."""
        await self.stop()
        self.keys = keys
        await self.start()

    def sign(self, claims: dict[str, Any], key: dict[str, Any] | None = None, **header: Any) -> str:
        """A token signed with one of the provider's keys, for the cases a real flow never produces."""
        key = key or self.keys[0]
        now = int(time.time())
        body = {"iss": self.issuer, "iat": now, "exp": now + 600, **claims}
        private = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))
        assert isinstance(private, rsa.RSAPrivateKey)
        return jwt.encode(body, private, algorithm="RS256", headers={"kid": key["kid"], **header})

    async def __aenter__(self) -> OpenIdProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def walk(
    http: aiohttp.ClientSession,
    url: str,
    account: str,
    headers: dict[str, str] | None = None,
    until: Callable[[str], bool] = lambda url: False,
) -> tuple[str, aiohttp.ClientResponse | None]:
    """What a user's browser does from `url`: follow the redirects, sign in as `account` and consent on the
    provider's screens (its development login: any name signs in), until a redirect goes where `until` says
    (that URL, not visited), or a page is neither a redirect nor the provider's (that URL and the response,
    its body read). `http` is the browser: its cookie jar (unsafe, for 127.0.0.1) carries every cookie;
    `headers` go with the first request only."""
    for step in range(20):
        async with http.get(url, allow_redirects=False, headers=headers if step == 0 else None) as response:
            await response.read()
            if response.status in (301, 302, 303, 307):
                url = urljoin(url, response.headers["Location"])
                if until(url):
                    return url, None
                continue
            if response.status != 200 or "/interaction/" not in url:
                return url, response  # not one of the provider's sign-in or consent screens: where it ended
            page = await response.text()
        form = re.search(r'<form[^>]*action="([^"]+)"', page)
        assert form is not None, page[:500]
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
        if 'name="login"' in page:  # the login screen; the next one is consent
            fields.update(login=account, password=secrets.token_hex(4))
        async with http.post(urljoin(url, form.group(1)), data=fields, allow_redirects=False) as response:
            assert "Location" in response.headers, await response.text()
            url = urljoin(url, response.headers["Location"])
        if until(url):
            return url, None
    raise AssertionError(f"the authorization did not end: {url}")


async def authorize(
    http: aiohttp.ClientSession, url: str, account: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    """A browser's whole authorization from `url` (a router route that sends it to a provider) to wherever
    the provider's redirect back leads: that last response."""
    _, response = await walk(http, url, account, headers)
    assert response is not None
    return response


def _has_code(url: str) -> bool:
    return "code" in parse_qs(urlsplit(url).query)


async def sign_in(authorization_url: str, user: str) -> dict[str, str]:
    """What a user does in the browser: sign in as `user`, consent; returns the parameters (code,
    state, iss) the provider sends to the client's redirect URI (not followed: the client is not a
    web server)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        url, _ = await walk(http, authorization_url, user, until=_has_code)
        assert _has_code(url), f"the sign-in did not end at the redirect URI: {url}"
        return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


# -- an MCP client that signs its user in ---------------------------------------------------------------


class MemoryStorage:
    """The MCP client's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def signed_in_client(url: str, user: str) -> tuple[OAuthClientProvider, MemoryStorage]:
    """The MCP SDK's own OAuth client, with `user` signing in headlessly when the provider asks."""
    codes: list[AuthorizationCodeResult] = []

    async def redirect(authorization_url: str) -> None:
        codes.append(AuthorizationCodeResult.model_validate(await sign_in(authorization_url, user)))

    async def callback() -> AuthorizationCodeResult:
        return codes.pop()

    storage = MemoryStorage()
    metadata = OAuthClientMetadata(
        client_name="pier-test", redirect_uris=["http://127.0.0.1:9/callback"],
        grant_types=["authorization_code"], response_types=["code"], token_endpoint_auth_method="none",
    )  # fmt: skip
    return OAuthClientProvider(url, metadata, storage, redirect, callback), storage


# -- connected accounts: the upstream provider and the router's client there ----------------------------

UPSTREAM_CLIENT = "pier"
UPSTREAM_SECRET_ENV = "UPSTREAM_CLIENT_SECRET"
UPSTREAM_RESOURCE = "https://api.upstream.test"


EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


def router_client(base: str, secret: str, *grants: str) -> dict[str, Any]:
    """The router as a confidential client of the company's identity provider (the portal's sign-in at
    `base`), allowed the authorization code and `grants` (refresh, token exchange)."""
    return {
        "client_id": "pier-router", "client_secret": secret, "redirect_uris": [f"{base}/portal/callback"],
        "grant_types": ["authorization_code", *grants], "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
    }  # fmt: skip


def upstream_client(redirect_uri: str, secret: str) -> dict[str, Any]:
    """The router as a confidential client of the upstream provider, allowed refresh tokens."""
    return {
        "client_id": UPSTREAM_CLIENT, "client_secret": secret, "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
    }  # fmt: skip


def upstream_oauth(issuer: str, **delivery: str) -> dict[str, Any]:
    """A profile's `upstream_oauth` at the test's upstream provider (`env=…`, `file=…`)."""
    return {
        "issuer": issuer, "client_id": UPSTREAM_CLIENT, "client_secret_env": UPSTREAM_SECRET_ENV,
        "scopes": ["mcp", "offline_access"], "resource": UPSTREAM_RESOURCE, **delivery,
    }  # fmt: skip


def unseal(redis_value: bytes | str, key: str, secrets_key: str) -> dict[str, Any]:
    """What the router sealed in Redis under `key` (the test holds PIER_SECRETS_KEY)."""
    from pier.router.usersecrets import Sealer

    opened: dict[str, Any] = json.loads(Sealer(secrets_key).open(redis_value, key))
    return opened


def digest(value: str) -> str:
    """What the demo server's `env_hash` answers for a variable holding `value`."""
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()[:16]
