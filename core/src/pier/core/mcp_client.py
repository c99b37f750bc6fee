"""A client-side MCP Streamable HTTP session that carries raw JSON-RPC messages.

Used where Pier relays another transport onto Streamable HTTP: `pier connect` (stdio → the
router) and the router's WebSocket endpoint (WebSocket → the session's bridge). It remembers the
client's `initialize`, so when the far end is replaced (404: unknown session) it initializes
again by itself and resends; network failures are retried with backoff until `retry_for_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from pier.core import tracing
from pier.core.jsonrpc import Message, dumps, error_response, loads

log = logging.getLogger("pier.core.mcp_client")

Deliver = Callable[[Message], Awaitable[None]]
_ACCEPT = "application/json, text/event-stream"


class SessionGone(Exception):
    """The far end no longer knows our MCP session (HTTP 404)."""


class HttpSession:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        deliver: Deliver,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | bool = True,
        retry_for_s: float = 60.0,
    ) -> None:
        self.http = http
        self.url = url
        self.deliver = deliver
        self.headers = headers or {}
        self.ssl = ssl_context
        self.retry_for_s = retry_for_s
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._initialize: Message | None = None
        self._reinit = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None

    async def send(self, message: Message) -> None:
        """Send one message; whatever answers it (and comes before) goes to `deliver`."""
        if message.get("method") == "initialize" and "id" in message:
            self._initialize = message
            await self._post(message, deliver=True)
            self._start_listening()
            return
        generation = self.session_id
        try:
            await self._post(message, deliver=True)
        except SessionGone:
            await self._initialize_again(generation)
            await self._post(message, deliver=True)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self.session_id is not None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.http.delete(
                    self.url, headers=self._headers(), ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=5)
                ):
                    pass

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {**self.headers, **extra}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    async def _initialize_again(self, generation: str | None) -> None:
        """The far end was replaced: start a new MCP session with the client's own initialize."""
        async with self._reinit:
            if self.session_id != generation or self._initialize is None:
                return  # another sender did it already
            log.info("MCP session lost; initializing again")
            self.session_id = None
            await self._post(self._initialize, deliver=False)
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, deliver=False)

    async def _post(self, message: Message, deliver: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for_s
        backoff = 0.1
        while True:
            try:
                await self._post_once(message, deliver)
                return
            except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
                if loop.time() + backoff > deadline:
                    if deliver and "id" in message and "method" in message:
                        await self.deliver(error_response(message["id"], -32000, f"unreachable: {exc}"))
                        return
                    raise
                log.warning("far end unreachable; retrying", extra={"in_s": backoff, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _post_once(self, message: Message, deliver: bool) -> None:
        async with self.http.post(
            self.url,
            data=dumps(message),
            headers=self._headers(**{"Content-Type": "application/json", "Accept": _ACCEPT}, **tracing.headers()),
            ssl=self.ssl,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as response:
            if response.status == 404 and self.session_id is not None:
                raise SessionGone
            if message.get("method") == "initialize" and response.headers.get("Mcp-Session-Id"):
                self.session_id = response.headers["Mcp-Session-Id"]
            if response.status == 202:
                return
            async for answer in _messages(response):
                if message.get("method") == "initialize" and "result" in answer:
                    self.protocol_version = answer["result"].get("protocolVersion")
                if deliver:
                    await self.deliver(answer)

    def _start_listening(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="pier-mcp-listen")

    async def _listen(self) -> None:
        """The GET stream: server notifications not tied to a request. Reopened when it drops."""
        backoff = 0.1
        while True:
            try:
                async with self.http.get(
                    self.url,
                    headers=self._headers(Accept="text/event-stream"),
                    ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                ) as response:
                    if response.status == 405:
                        return  # the far end offers no GET stream
                    if response.status == 200:
                        backoff = 0.1
                        async for message in _messages(response):
                            await self.deliver(message)
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


async def _messages(response: aiohttp.ClientResponse) -> Any:
    """The JSON-RPC messages of a response: a JSON body (one or a batch) or an SSE stream."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                payload = "\n".join(data)
                data = []
                with contextlib.suppress(ValueError):
                    yield loads(payload)
        return
    raw = await response.read()
    if not raw:
        return
    try:
        payload = loads(raw)
    except ValueError:
        return
    for item in payload if isinstance(payload, list) else [payload]:
        if isinstance(item, dict):
            yield item


async def ask(
    http: aiohttp.ClientSession,
    url: str,
    requests: list[tuple[str, dict[str, Any]]],
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | bool = True,
    timeout_s: float = 30.0,
) -> list[Message]:
    """Open an MCP session at `url`, send each request in turn, close it; their answers, in order.

    For the router's own short questions to a bridge (what a server offers, one prompt): no
    notifications or server requests are expected, and none is waited for.
    """
    base = {**(headers or {}), "Content-Type": "application/json", "Accept": _ACCEPT}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "pier-router"}}

    async def post(message: Message, session_id: str | None) -> tuple[list[Message], str | None]:
        extra = {"Mcp-Session-Id": session_id, **tracing.headers()} if session_id else tracing.headers()
        async with http.post(
            url, data=dumps(message), headers={**base, **extra}, ssl=ssl_context, timeout=timeout
        ) as r:
            return [m async for m in _messages(r)], r.headers.get("Mcp-Session-Id", session_id)

    answers, session_id = await post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}, None)
    if not answers or "result" not in answers[0]:
        raise ValueError(f"{url} did not initialize: {answers[:1]}")
    await post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id)
    results: list[Message] = []
    for n, (method, params) in enumerate(requests, start=1):
        replies, _ = await post({"jsonrpc": "2.0", "id": n, "method": method, "params": params}, session_id)
        results.append(next((m for m in replies if m.get("id") == n), {"error": {"message": "no answer"}}))
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with http.delete(
            url, headers={**base, "Mcp-Session-Id": session_id or ""}, ssl=ssl_context, timeout=timeout
        ):
            pass
    return results
