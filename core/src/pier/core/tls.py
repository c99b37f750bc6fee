"""TLS for the router (HTTPS, optional client certificates) and for router/job pool ↔ bridge mTLS.

Certificates are re-read when their files change (cert-manager and Secret rotations), so new
connections use the new certificate without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

from aiohttp import web

log = logging.getLogger("pier.core.tls")


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """An HTTPS server context; with `client_ca`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting `ca` (else the system store), presenting `cert` when given."""
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def peer_subject(request: web.Request) -> str | None:
    """The verified client certificate's subject, as `CN=alice,O=acme` (None without mTLS)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    parts = [f"{name}={value}" for rdn in cert.get("subject", ()) for name, value in rdn]
    return ",".join(parts) or None


def common_name(subject: str) -> str | None:
    for part in subject.split(","):
        name, _, value = part.partition("=")
        if name == "commonName":
            return value
    return None


class CertReloader:
    """Watches certificate files and reloads them into a live SSL context."""

    def __init__(self, context: ssl.SSLContext, cert: Path, key: Path, every_s: float = 10.0) -> None:
        self.context = context
        self.cert = cert
        self.key = key
        self.every_s = every_s
        self._stamp = self._mtimes()
        self._task: asyncio.Task[None] | None = None

    def _mtimes(self) -> tuple[float, float]:
        return (self.cert.stat().st_mtime, self.key.stat().st_mtime)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="pier-cert-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            with contextlib.suppress(OSError):
                stamp = self._mtimes()
                if stamp != self._stamp:
                    try:
                        self.context.load_cert_chain(self.cert, self.key)
                    except (ssl.SSLError, OSError) as exc:
                        log.error("new certificate not loaded; keeping the old one", extra={"error": str(exc)})
                        continue
                    self._stamp = stamp
                    log.info("certificate reloaded", extra={"cert": str(self.cert)})
