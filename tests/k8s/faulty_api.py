"""A proxy in front of the test cluster's API server that can make it fail on demand: the one place a fake
stands in for part of the API server, because no real one can be told to answer 429 and 500 for 30 s.

Everything else is the real kube-apiserver: requests pass through unchanged (TLS both ways, the client's own
credentials, watches streamed), until `fail_for(seconds)`: then every request is answered 429 (with a
`Retry-After`) or 500, alternately, as an overloaded or broken API server answers, and open watches are cut.

    async with FaultyApi(control_plane) as proxy:
        kubeconfig = proxy.kubeconfig(control_plane.token_kubeconfig("pier", "pier-operator"))
        proxy.fail_for(30)
"""

from __future__ import annotations

import itertools
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.k8s.cluster import ControlPlane

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


class FaultyApi:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.failing_until = 0.0
        self.answered: dict[int, int] = {}  # HTTP status → how many requests got it
        self._turn = itertools.count()
        self._streams: set[aiohttp.ClientResponse] = set()  # upstream answers being streamed (watches)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> FaultyApi:
        upstream = ssl.create_default_context(cafile=str(self.cp.ca_file))
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=upstream, limit=0), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        # The API server's own certificate: its names include 127.0.0.1, where the proxy listens.
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(str(self.cp.pki / "apiserver.crt"), str(self.cp.pki / "apiserver.key"))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=serving)
        await site.start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def kubeconfig(self, original: Path) -> Path:
        """A copy of `original` (a token kubeconfig: the proxy passes credentials on) that goes through the proxy."""
        config = json.loads(original.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = self.url
        path = original.with_name(f"faulty-{original.name}")
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def fail_for(self, seconds: float) -> None:
        """From now on, for `seconds`, answer every request 429 or 500; cut the watches that are open."""
        self.failing_until = time.monotonic() + seconds
        for upstream in list(self._streams):
            upstream.close()  # its relay ends, and the client's connection with it

    @property
    def failing(self) -> bool:
        return time.monotonic() < self.failing_until

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.failing:
            return self._fault()
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with self._http.request(
            request.method, f"{self.cp.server}{request.path_qs}", headers=headers, data=body or None,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=900),
        ) as upstream:  # fmt: skip
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP:
                    response.headers[key] = value
            self.answered[upstream.status] = self.answered.get(upstream.status, 0) + 1
            await response.prepare(request)
            self._streams.add(upstream)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, ConnectionResetError):
                response.force_close()  # cut: the client sees its stream end without a proper end
                return response
            finally:
                self._streams.discard(upstream)
            if upstream.closed and self.failing:
                response.force_close()
                return response
            await response.write_eof()
            return response

    def _fault(self) -> web.Response:
        status = 429 if next(self._turn) % 2 == 0 else 500
        self.answered[status] = self.answered.get(status, 0) + 1
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
            "reason": "TooManyRequests" if status == 429 else "InternalError",
            "message": "the test's fault proxy refuses this request",
        }  # fmt: skip
        headers = {"Retry-After": "1"} if status == 429 else {}
        return web.json_response(body, status=status, headers=headers)
