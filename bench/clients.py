"""The clients that drive the load: lean hand-written ones, and the `mcp` SDK's own client.

Lean clients hold one keep-alive connection each and write JSON-RPC by hand, so what is
measured is the path under test, not client machinery. They all parse every answer and check
it is the echo (a benchmark that counts errors as calls would flatter a broken path). The SDK
client shows what a typical application sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson

PROTOCOL_VERSION = "2025-06-18"
MESSAGE = "bench"
EXPECTED = f"Echo: {MESSAGE}"
ACCEPT_BOTH = "application/json, text/event-stream"  # what the spec requires clients to send
CLIENT_INFO = {"name": "pier-bench", "version": "1"}
_TIMEOUT = aiohttp.ClientTimeout(total=60)
# JSON-RPC ids unique across every HTTP client of this process: callers that share one MCP
# session must never reuse each other's ids (the server would answer the wrong request).
_HTTP_IDS = itertools.count(1)


class BenchError(RuntimeError):
    """A call that did not come back as the expected echo."""


class Caller(Protocol):
    """One client: `echo()` makes one echo tool call and checks its answer."""

    async def echo(self) -> None: ...

    async def close(self) -> None: ...


def check_echo(result: Any) -> None:
    try:
        text = result["content"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise BenchError(f"not a tool result: {str(result)[:300]}") from None
    if result.get("isError") or text != EXPECTED:
        raise BenchError(f"unexpected tool result: {str(result)[:300]}")


def _echo_params() -> dict[str, Any]:
    return {"name": "echo", "arguments": {"message": MESSAGE}}


def _connector() -> aiohttp.TCPConnector:
    # One connection, kept alive: the client never opens a second one behind the caller's back.
    return aiohttp.TCPConnector(limit=1, keepalive_timeout=300, force_close=False)


# -- direct stdio: the physical baseline -------------------------------------------------------


class StdioClient:
    """A minimal asyncio JSON-RPC client on a server's stdin/stdout (newline-delimited JSON).

    Requests may be pipelined (concurrent `echo()` calls share the pipe); a reader task matches
    answers to requests by id. Notifications from the server are read and dropped.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, command: list[str]) -> StdioClient:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            limit=16 * 1024 * 1024,
            start_new_session=True,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = orjson.loads(line)
            future = self._pending.pop(message.get("id"), None) if "method" not in message else None
            if future is not None and not future.done():
                future.set_result(message)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BenchError("the server closed its stdout"))

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(message) + b"\n")

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        message = await asyncio.wait_for(future, 60)
        if "error" in message:
            raise BenchError(f"{method} failed: {message['error']}")
        result: dict[str, Any] = message["result"]
        return result

    async def initialize(self) -> dict[str, Any]:
        result = await self.request(
            "initialize", {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        )
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def echo(self) -> None:
        check_echo(await self.request("tools/call", _echo_params()))

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


# -- lean HTTP clients -------------------------------------------------------------------------


def _sse_messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages in an SSE body (`data:` lines of each event, joined)."""
    messages = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if data:
            messages.append(orjson.loads(data))
    return messages


class StreamableHttpClient:
    """Hand-written MCP Streamable HTTP: POST JSON-RPC, read a JSON or an SSE answer.

    `accept` is the spec's "application/json, text/event-stream" by default; "application/json"
    alone shows what the server's SSE framing costs (servers may answer either way).
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        session_id: str | None = None,
        accept: str = ACCEPT_BOTH,
    ) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(connector=_connector(), timeout=_TIMEOUT)
        self.headers = {"Content-Type": "application/json", "Accept": accept, **(headers or {})}
        if session_id is not None:
            self.headers["Mcp-Session-Id"] = session_id
            self.headers["MCP-Protocol-Version"] = PROTOCOL_VERSION

    @property
    def session_id(self) -> str | None:
        return self.headers.get("Mcp-Session-Id")

    async def _post(self, message: dict[str, Any]) -> tuple[aiohttp.ClientResponse, list[dict[str, Any]]]:
        async with self.http.post(self.url, data=orjson.dumps(message), headers=self.headers) as response:
            body = await response.read()
            if response.status >= 400:
                raise BenchError(f"HTTP {response.status}: {body[:300]!r}")
            if not body:
                return response, []
            if response.content_type == "text/event-stream":
                return response, _sse_messages(body)
            payload = orjson.loads(body)
            return response, payload if isinstance(payload, list) else [payload]

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(_HTTP_IDS)
        _, messages = await self._post({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        for message in messages:
            if message.get("id") == request_id and "method" not in message:
                if "error" in message:
                    raise BenchError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
        raise BenchError(f"no answer to {method} in {str(messages)[:300]}")

    async def initialize(self) -> str:
        """Open an MCP session; returns its id (later requests carry it)."""
        params = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        response, messages = await self._post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params})
        if not messages or "result" not in messages[0]:
            raise BenchError(f"initialize failed: {messages}")
        session_id = response.headers.get("Mcp-Session-Id")
        if session_id:
            self.headers["Mcp-Session-Id"] = session_id
        self.headers["MCP-Protocol-Version"] = messages[0]["result"].get("protocolVersion", PROTOCOL_VERSION)
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return session_id or ""

    async def echo(self) -> None:
        check_echo(await self.request("tools/call", _echo_params()))

    async def close(self) -> None:
        await self.http.close()


class ModernHttpClient(StreamableHttpClient):
    """MCP 2026-07-28 by hand: no session, each POST one request carrying its own `_meta` envelope
    and the headers the spec mirrors from the body (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`)."""

    VERSION = "2026-07-28"
    META = {
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
    }

    async def initialize(self) -> str:
        return ""  # stateless: nothing to open

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(_HTTP_IDS)
        headers = {**self.headers, "MCP-Protocol-Version": self.VERSION, "Mcp-Method": method}
        if "name" in params:
            headers["Mcp-Name"] = params["name"]
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": self.META}}
        async with self.http.post(self.url, data=orjson.dumps(message), headers=headers) as response:
            body = await response.read()
            if response.status >= 400:
                raise BenchError(f"HTTP {response.status}: {body[:300]!r}")
            messages = _sse_messages(body) if response.content_type == "text/event-stream" else [orjson.loads(body)]
        for answer in messages:
            if answer.get("id") == request_id:
                if "error" in answer:
                    raise BenchError(f"{method} failed: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
        raise BenchError(f"no answer to {method} in {str(messages)[:300]}")


class _CallPoster:
    """A JSON POST that runs `echo` and answers `{"status": "completed", "result": ...}` (Pier's call APIs)."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(connector=_connector(), timeout=_TIMEOUT)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.body = orjson.dumps(body)

    async def echo(self) -> None:
        async with self.http.post(self.url, data=self.body, headers=self.headers) as response:
            payload = orjson.loads(await response.read())
        if response.status != 200 or payload.get("status") != "completed":
            raise BenchError(f"HTTP {response.status}: {str(payload)[:300]}")
        check_echo(payload["result"])

    async def connect(self, url: str) -> None:
        """Open the keep-alive connection (a GET of `url` on the same host) before any call."""
        async with self.http.get(url) as response:
            await response.read()

    async def close(self) -> None:
        await self.http.close()


class RestClient(_CallPoster):
    """Pier's router REST call: `POST /v1/users/{user}/servers/{server}/tools/echo/call`."""

    def __init__(self, base: str, user: str, server: str, headers: dict[str, str] | None = None) -> None:
        url = f"{base}/v1/users/{user}/servers/{server}/tools/echo/call"
        super().__init__(url, {"arguments": {"message": MESSAGE}}, headers)


class CallApiClient(_CallPoster):
    """The bridge's internal call API: `POST /v1/calls` (what the router itself uses)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        body = {"tool": "echo", "arguments": {"message": MESSAGE}, "wait_s": 30}
        super().__init__(f"{base}/v1/calls", body, headers)


# -- the SDK ---------------------------------------------------------------------------------


class SdkClient:
    """The `mcp` SDK's `Client` (legacy mode: no 2026 discovery probe before initialize)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def echo(self) -> None:
        result = await self.client.call_tool("echo", {"message": MESSAGE})
        check_echo(result.model_dump(mode="json", by_alias=True, exclude_none=True))

    async def close(self) -> None:
        pass  # the context manager that made it closes it


@contextlib.asynccontextmanager
async def sdk_client(target: str | list[str], headers: dict[str, str] | None = None) -> AsyncIterator[SdkClient]:
    """An SDK client on a Streamable HTTP URL (with extra headers, e.g. a key), or a stdio command."""
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with contextlib.AsyncExitStack() as stack:
        server: Any
        if isinstance(target, list):
            server = StdioServerParameters(command=target[0], args=target[1:])
        elif headers:
            # The SDK's own default HTTP client (its timeouts), with our headers on every request.
            http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
            server = streamable_http_client(target, http_client=http)
        else:
            server = target
        client = await stack.enter_async_context(Client(server, mode="legacy", read_timeout_seconds=60))
        yield SdkClient(client)
