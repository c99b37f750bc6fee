"""HTTP pieces shared by the bridge and the router: JSON and error responses, SSE, origins."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from pier.core.errors import PierError
from pier.core.jsonrpc import dumps

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE_S = 15.0  # an SSE stream with nothing to say sends a comment this often (proxies drop silent ones)
PEER_POLL_S = 0.25  # how often a handler waiting without writing looks whether its caller is still there
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# aiohttp listens with a backlog of 128: a burst of a few hundred connections to a busy event loop
# overflows it, and a handshake dropped for long enough ends in a reset the client sees. The kernel
# caps this at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096
# The young generation is collected after this many new container objects, not Python's 700: a call makes a few
# hundred, nearly all freed by their reference count, and each collection is a pause every caller waits through.
YOUNG_COLLECTION_THRESHOLD = 35_000


class CoalescedSSE(web.StreamResponse):
    """An SSE response whose headers leave with its first event (as `web.Response` does),
    rather than in a write of their own."""

    _send_headers_immediately = False


def tcp_site(
    runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False
) -> web.TCPSite:
    """A listening site for `runner`, with room for bursts of connections (`LISTEN_BACKLOG`).

    `reuse_port`: several processes listen on the same port, the kernel spreading connections over them.
    """
    return web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)


def peer_gone(request: web.Request) -> bool:
    """Whether the client of `request` has closed its connection.

    aiohttp does not cancel a handler when its client goes away (and the router must not turn
    that on for every route), so a handler that waits long without writing looks now and then.
    """
    transport = request.transport
    return transport is None or transport.is_closing()


def sse_message(message: Any) -> bytes:
    """One SSE event carrying a JSON-RPC message."""
    return b"event: message\ndata: " + dumps(message) + b"\n\n"


async def write_or_gone(response: web.StreamResponse, data: bytes) -> bool:
    """Write `data` to a streaming response; False when the caller has gone (nothing raised)."""
    try:
        if data:
            await response.write(data)
    except (ConnectionResetError, RuntimeError):
        return False
    return True


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(payload), content_type="application/json", headers=headers)


def error_response(err: PierError, headers: dict[str, str] | None = None) -> web.Response:
    """`{"error": {"code", "message", "details"}}` with the code's HTTP status (and Retry-After if due)."""
    headers = dict(headers or {})
    retry_after = err.details.get("retry_after_s")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return json_response({"error": err.to_dict()}, err.http_status, headers)


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The request's body: PAYLOAD_TOO_LARGE over `limit` bytes, REQUEST_TIMEOUT when it trickles in.

    A slow body must not hold a handler (and its memory) forever; a declared Content-Length over
    the limit is refused before a byte of it is read.
    """
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        if request.content.is_eof():  # all of it came with the head (the usual small body): nothing to wait for
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except TimeoutError:
        raise PierError(
            "REQUEST_TIMEOUT", f"the request body did not arrive within {timeout_s:g} s", {"timeout_s": timeout_s}
        ) from None


def too_large(limit: int) -> PierError:
    return PierError("PAYLOAD_TOO_LARGE", f"the body exceeds {limit} bytes", {"limit": limit})


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    """DNS-rebinding protection: browsers may call only from local or explicitly allowed origins."""
    if "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).hostname in _LOCAL_HOSTS


def settle_collector() -> None:
    """Once a server has started: what start-up made (modules, the app, settings) is collected once and then
    frozen, so that no later collection walks it again, and the young generation is collected far less often.

    At 64 callers on 64 local sessions this cut the router's time in the collector tenfold and its p99 by a fifth
    (REST) to two fifths (the relay) (bench/README.md, "The collector").
    """
    gc.collect()  # garbage frozen would never be freed
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


async def serve(  # noqa: PLR0913 - keyword-only options of one listening site
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 10.0,
    on_ready: Callable[[str], None] | None = None,
    stop_when: Awaitable[object] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    attach: Callable[[web.AppRunner], contextlib.AbstractAsyncContextManager[None]] | None = None,
) -> None:
    """Serve `app` until SIGTERM/SIGINT (or `stop_when` completes), then shut it down cleanly.

    `on_ready` gets the URL actually bound (useful with port 0). `attach`: more ways in to the same
    app, open while it serves (the router's processes: a Unix socket, connections handed over).
    """
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        # Inside the stack: a start that fails half-way still closes what its cleanup contexts opened.
        await runner.setup()
        site = tcp_site(runner, host, port, ssl_context, reuse_port)
        await site.start()
        if attach is not None:
            await stack.enter_async_context(attach(runner))
        bound_host, bound_port = runner.addresses[0][:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        settle_collector()
        if on_ready is not None:
            on_ready(f"{'https' if ssl_context else 'http'}://{shown}:{bound_port}")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(stop.wait())}
        if stop_when is not None:
            waits.add(asyncio.ensure_future(stop_when))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
