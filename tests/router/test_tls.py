"""HTTPS on the router, client certificates (mTLS) as identity, bridge mTLS, certificate reload."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp
import pytest

from tests.certs import CertificateAuthority
from tests.servers import router_app, wait_until


def _client(ca, issued=None) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=ca.path)
    if issued is not None:
        context.load_cert_chain(issued.cert, issued.key)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


async def _echo(session: aiohttp.ClientSession, url: str, headers: dict | None = None) -> tuple[int, dict]:
    async with session.post(
        f"{url}/tools/echo/call", json={"arguments": {"message": "over tls"}}, headers=headers or {}
    ) as response:
        return response.status, await response.json()


async def test_https_with_client_certificates(redis_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pier.core.audit")
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("router")
    alice = ca.issue("alice")
    rogue = CertificateAuthority(tmp_path / "rogue", "rogue-ca").issue("alice", "rogue-alice")
    async with router_app(
        redis_server.url, tls_cert=server.cert, tls_key=server.key, tls_client_ca=ca.path, app_keys=["app-key"]
    ) as running:
        assert running.url.startswith("https://")
        url = running.user_url("alice")
        async with _client(ca, alice) as session:
            status, body = await _echo(session, url, {"X-API-Key": "app-key"})
            assert (status, body["result"]["content"][0]["text"]) == (200, "Echo: over tls")
        for certificate in (None, rogue):
            async with _client(ca, certificate) as session:
                with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                    await _echo(session, url, {"X-API-Key": "app-key"})
    [audit] = [r.audit for r in caplog.records if r.name == "pier.core.audit"]
    assert audit["who"]["subject"] == "commonName=alice"


async def test_a_client_certificate_can_act_as_a_user_key(redis_server, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    server, alice = ca.issue("router"), ca.issue("alice")
    async with (
        router_app(
            redis_server.url, tls_cert=server.cert, tls_key=server.key, tls_client_ca=ca.path,
            app_keys=["app-key"], cert_user_auth=True,
        ) as running,
        _client(ca, alice) as session,
    ):  # fmt: skip
        assert (await _echo(session, running.user_url("alice")))[0] == 200
        status, body = await _echo(session, running.user_url("bob"))
        assert (status, body["error"]["code"]) == (403, "FORBIDDEN")


async def test_router_to_bridge_traffic_uses_mtls(redis_server, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    internal = ca.issue("pier-internal")
    async with (
        router_app(
            redis_server.url, internal_tls_ca=ca.path, internal_tls_cert=internal.cert, internal_tls_key=internal.key
        ) as running,
        aiohttp.ClientSession() as plain,
    ):
        status, _ = await _echo(plain, running.user_url("alice"))
        assert status == 200
        [session] = running.router.backend.list("alice")
        assert session.endpoint.url.startswith("https://")
        # The bridge refuses anyone without a certificate from the internal CA, even with its token.
        async with _client(ca) as no_cert:
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                async with no_cert.get(f"{session.endpoint.url}/v1/status", headers=session.endpoint.headers()):
                    pass


async def test_certificates_are_reloaded_without_a_restart(redis_server, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    first = ca.issue("router")
    async with router_app(redis_server.url, tls_cert=first.cert, tls_key=first.key, tls_reload_s=0.1) as running:
        port = int(running.url.rsplit(":", 1)[1])
        served = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
        assert served.strip() == first.cert.read_text().strip()
        renewed = ca.issue("router-renewed", "renewed")
        first.cert.write_bytes(renewed.cert.read_bytes())
        first.key.write_bytes(renewed.key.read_bytes())

        async def serves_the_new_one() -> bool:
            served = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
            return served.strip() == renewed.cert.read_text().strip()

        await wait_until(serves_the_new_one)
