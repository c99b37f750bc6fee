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
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from pier.cli.redis_server import free_port
from tests.servers import NODE_MODULES, ROOT, wait_until

PROVIDER = ROOT / "tests" / "oidc" / "provider.mjs"


def new_key(kid: str) -> dict[str, Any]:
    """An RS256 signing key as a private JWK."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


class OpenIdProvider:
    """The provider as a process; its keys are the test's, so it can rotate them (`restart`)."""

    def __init__(self, work: Path, keys: list[dict[str, Any]] | None = None) -> None:
        self.work = work
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.keys = keys or [new_key("k1")]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        keys = self.work / "jwks.json"
        keys.write_text(json.dumps({"keys": self.keys}))
        env = {**os.environ, "PORT": str(self.port), "KEYS": str(keys), "NODE_MODULES": str(NODE_MODULES)}
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


async def sign_in(authorization_url: str, user: str) -> dict[str, str]:
    """What a user does in the browser: sign in as `user`, consent; returns the parameters (code,
    state, iss) the provider sends to the client's redirect URI (not followed: the client is not a
    web server)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        url = authorization_url
        for _ in range(10):
            async with http.get(url, allow_redirects=False) as response:
                if response.status in (302, 303):
                    url = urljoin(url, response.headers["Location"])
                    query = parse_qs(urlsplit(url).query)
                    if "code" in query:
                        return {name: values[0] for name, values in query.items()}
                    continue
                page = await response.text()
            form = re.search(r'<form[^>]*action="([^"]+)"', page)
            assert form is not None, page[:500]
            fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
            if 'name="login"' in page:  # the login screen; the next one is consent
                fields.update(login=user, password=secrets.token_hex(4))
            async with http.post(urljoin(url, form.group(1)), data=fields, allow_redirects=False) as response:
                assert "Location" in response.headers, await response.text()
                url = urljoin(url, response.headers["Location"])
            query = parse_qs(urlsplit(url).query)
            if "code" in query:
                return {name: values[0] for name, values in query.items()}
        raise AssertionError(f"the sign-in did not end at the redirect URI: {url}")
