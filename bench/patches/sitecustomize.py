"""Prototypes of proposed changes, applied at interpreter start for `bench.experiments` only.

Loaded when this folder is on PYTHONPATH (Python imports `sitecustomize` by itself), so the
router and every bridge it starts get them. `BENCH_PATCHES` (comma-separated) says which:

- ``uvloop``    run asyncio on uvloop.
- ``lazyjson``  the bridge's /mcp answers a POST with plain JSON unless something other than the
  final response comes first (progress, a server request), and an SSE answer sends its headers
  with the first event and its last event with the end of the stream; the router's relay answers
  a JSON upstream with one `web.Response` (one write) instead of streaming it in three.
- ``inproc``    local sessions' bridges run inside the router process (their servers stay separate
  processes), and REST calls go straight to the bridge's call registry: no HTTP hop, no bridge
  process. The bridge app is still served on a loopback port for the MCP relay and the job pool.

Nothing here is Pier's code path unless an experiment asks for it; the product is untouched.
"""

from __future__ import annotations

import os

_PATCHES = {p.strip() for p in os.environ.get("BENCH_PATCHES", "").split(",") if p.strip()}


def _uvloop() -> None:
    import uvloop

    uvloop.install()


def _lazyjson() -> None:
    import aiohttp
    from aiohttp import web

    from pier.errors import PierError
    from pier.jsonrpc import dumps, gateway_error_response, loads
    from pier.router import relay
    from pier.sidecar import mcp_http
    from pier.sidecar.client import BridgeUnreachable
    from pier.web import SSE_HEADERS, json_response

    class CoalescedSSE(web.StreamResponse):
        # aiohttp then sends the headers with the first body write (as web.Response does).
        _send_headers_immediately = False

    async def _relay(self, request, client, requests, batch):  # type: ignore[no-untyped-def]
        answered, forwarded = [], []
        for message in requests:
            answer = self._local_answer(message)
            if answer is not None:
                self.metrics.requests.labels(message["method"], "ok").inc()
                answered.append(answer)
            else:
                forwarded.append(message)
        if not forwarded:
            return json_response(answered if batch else answered[0])
        stream = mcp_http.PostStream()
        waiting = 0
        for message in forwarded:
            try:
                pending = await self.upstream.begin(message, client, stream)
            except PierError as err:
                self.metrics.requests.labels(message["method"], err.code).inc()
                answered.append(gateway_error_response(message["id"], err))
                continue
            self._observe(message, pending)
            stream.attach(pending)
            waiting += 1
        sse_ok = "text/event-stream" in request.headers.get("Accept", "")
        first = None
        while waiting:
            message, final = await stream.queue.get()
            if final:
                answered.append(message)
                waiting -= 1
            elif sse_ok:
                first = message  # something before the answer: stream from here on
                break
        if first is None:
            return json_response(answered if batch else answered[0])
        response = CoalescedSSE(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            for message in answered:
                await response.write(mcp_http.sse_event(message))
            await response.write(mcp_http.sse_event(first))
            while waiting:
                message, final = await stream.queue.get()
                waiting -= final
                event = mcp_http.sse_event(message)
                await (response.write(event) if waiting else response.write_eof(event))
        except ConnectionResetError:
            pass
        return response

    mcp_http.StreamableHTTP._relay = _relay

    async def _forward(router, request, session, headers, body, exchange):  # type: ignore[no-untyped-def]
        try:
            upstream = await router.http.request(
                request.method,
                session.endpoint.url + "/mcp",
                headers={**headers, **session.endpoint.headers()},
                data=body,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                ssl=router.bridge.ssl,
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise BridgeUnreachable(session.endpoint, exc) from exc
        async with upstream:
            out_headers = {n: upstream.headers[n] for n in relay._RESPONSE_HEADERS if n in upstream.headers}
            is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            inspect = exchange.inspects_output and request.method != "DELETE"
            if not is_sse and request.method != "GET":
                # A JSON (or empty) answer is complete: one response, one write.
                raw = await upstream.read()
                messages = relay.parse_messages(raw) if inspect else None
                if messages:
                    checked = [await exchange.check_output(m) for m in messages]
                    raw = dumps(checked if isinstance(loads(raw), list) else checked[0])
                return web.Response(status=upstream.status, headers=out_headers, body=raw)
            response = CoalescedSSE(status=upstream.status, headers=out_headers)
            try:
                with router.streaming():
                    await response.prepare(request)
                    if inspect:
                        await relay._relay_sse(upstream, response, exchange)
                    else:
                        async for chunk in upstream.content.iter_any():
                            await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass
            return response

    relay._forward = _forward


def _inproc() -> None:
    import asyncio

    from aiohttp import web

    from pier.errors import PierError
    from pier.router.backends import local
    from pier.sidecar.app import BRIDGE, create_app
    from pier.sidecar.client import BridgeClient, Endpoint
    from pier.sidecar.config import SidecarSettings

    bridges: dict[str, object] = {}  # endpoint URL → the in-process Bridge

    class InProcess:
        """Stands in for a bridge process: the bridge app runs on the router's own event loop."""

        def __init__(self, runner: web.AppRunner) -> None:
            self.runner = runner
            self.returncode: int | None = None
            self._stopping: asyncio.Future[None] | None = None

        def send_signal(self, _sig: int) -> None:
            self.kill()

        def kill(self) -> None:
            if self._stopping is None:
                self._stopping = asyncio.ensure_future(self._stop())

        async def _stop(self) -> None:
            await self.runner.cleanup()
            self.returncode = 0

        async def wait(self) -> int:
            if self._stopping is not None:
                await self._stopping
            return self.returncode or 0

    async def _start(self, key, profile):  # type: ignore[no-untyped-def]
        await self._make_room()
        # Prototype only: the server inherits the router's environment here (the real change must not).
        settings = SidecarSettings(
            command=profile.command,
            host="127.0.0.1",
            port=0,
            cwd=profile.cwd,
            max_concurrent_calls=profile.max_concurrent_calls,
            start_timeout_s=self.settings.session_start_timeout_s,
        )
        app = create_app(settings)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)  # still served: the relay and the job pool use HTTP
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        bridge = app[BRIDGE]
        await bridge.upstream.wait_ready()
        bridges[url] = bridge
        session = local.LocalSession(key, Endpoint(url), {t["name"]: t for t in bridge.upstream.tools})
        session.proc = InProcess(runner)
        session.profile = profile
        self.sessions[key] = session
        self.metrics.sessions_started.labels(profile.name).inc()
        self.metrics.sessions_active.labels(profile.name).inc()
        return session

    local.LocalBackend._start = _start
    original = BridgeClient.start_call

    async def start_call(self, endpoint, tool, arguments, call_id, wait_s):  # type: ignore[no-untyped-def]
        bridge = bridges.get(endpoint.url)
        if bridge is None:
            return await original(self, endpoint, tool, arguments, call_id, wait_s)
        try:
            call = await bridge.calls.start(tool, arguments, call_id)
        except PierError as err:
            return err.http_status, {"error": err.to_dict()}
        await call.wait(wait_s)
        return call.http_status, call.to_dict()

    BridgeClient.start_call = start_call


if "uvloop" in _PATCHES:
    _uvloop()
if "lazyjson" in _PATCHES:
    _lazyjson()
if "inproc" in _PATCHES:
    _inproc()
