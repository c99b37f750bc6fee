"""Client of a bridge's call API, used by the router and the job pool (keep-alive, timeouts)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from pier.core.errors import PierError
from pier.core.jsonrpc import dumps, loads
from pier.sidecar.calls import CallRequest

if TYPE_CHECKING:
    from pier.sidecar.app import Bridge

# Beyond a long-poll's own wait, how long the network may take.
_SLACK_S = 10.0


@dataclass(frozen=True)
class Endpoint:
    """Where a session's bridge listens, and the token it wants."""

    url: str
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class BridgeUnreachable(PierError):
    """The bridge did not answer: the session is gone (or going)."""

    def __init__(self, endpoint: Endpoint, exc: BaseException) -> None:
        super().__init__("SESSION_LOST", f"the session's bridge is unreachable: {exc or type(exc).__name__}")
        self.endpoint = endpoint


class BridgeClient:
    """Calls into bridges over one shared connection pool, or directly when they run in this process.

    A bridge in `local` (the router's in-process local sessions) is still served over HTTP, for
    the MCP relay and the job pool's workers; this client just skips the HTTP round trip to it.
    """

    def __init__(self, http: aiohttp.ClientSession, ssl_context: ssl.SSLContext | None = None) -> None:
        self.http = http
        # mTLS to the bridges when configured; the default context otherwise (https endpoints).
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.local: dict[str, Bridge] = {}  # endpoint URL → a bridge running in this process

    async def _request(
        self, method: str, endpoint: Endpoint, path: str, timeout: float, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        try:
            async with self.http.request(
                method,
                endpoint.url + path,
                data=dumps(body) if body is not None else None,
                headers={**endpoint.headers(), "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=self.ssl,
            ) as response:
                raw = await response.read()
                return response.status, loads(raw) if raw else {}
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise BridgeUnreachable(endpoint, exc) from exc
        except ValueError as exc:  # not JSON: not a bridge
            raise BridgeUnreachable(endpoint, exc) from exc

    async def start_call(
        self, endpoint: Endpoint, tool: str, arguments: dict[str, Any], call_id: str, wait_s: float
    ) -> tuple[int, dict[str, Any]]:
        """Start (or join) a call; 200/4xx/5xx when it finished in `wait_s`, 202 while it runs."""
        body = {"tool": tool, "arguments": arguments, "call_id": call_id, "wait_s": wait_s}
        bridge = self.local.get(endpoint.url)
        if bridge is not None:
            try:  # the same bound as over HTTP: a bridge that never answers is unreachable, not awaited forever
                async with asyncio.timeout(wait_s + _SLACK_S):
                    return await _direct_call(bridge, body)
            except TimeoutError as exc:
                raise BridgeUnreachable(endpoint, exc) from exc
        return await self._request("POST", endpoint, "/v1/calls", wait_s + _SLACK_S, body)

    async def get_call(
        self, endpoint: Endpoint, call_id: str, wait_s: float = 0, progress_after: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        query = f"?wait_s={wait_s}"
        if progress_after is not None:
            query += f"&progress_after={progress_after}"
        return await self._request("GET", endpoint, f"/v1/calls/{call_id}{query}", wait_s + _SLACK_S)

    async def cancel_call(self, endpoint: Endpoint, call_id: str) -> tuple[int, dict[str, Any]]:
        return await self._request("DELETE", endpoint, f"/v1/calls/{call_id}", _SLACK_S)

    async def tools(self, endpoint: Endpoint, timeout: float) -> list[dict[str, Any]]:
        bridge = self.local.get(endpoint.url)
        if bridge is not None:
            try:
                return await asyncio.wait_for(bridge.tools(), timeout)
            except TimeoutError as exc:
                raise BridgeUnreachable(endpoint, exc) from exc
        status, body = await self._request("GET", endpoint, "/v1/tools", timeout)
        if status != 200:
            raise PierError.from_dict(body.get("error") or {"code": "SESSION_START_FAILED"})
        return body["tools"]

    async def status(self, endpoint: Endpoint, timeout: float = 5.0) -> dict[str, Any]:
        bridge = self.local.get(endpoint.url)
        if bridge is not None:
            return bridge.status()
        _, body = await self._request("GET", endpoint, "/v1/status", timeout)
        return body


async def _direct_call(bridge: Bridge, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """`POST /v1/calls` on a bridge in this process: the same checks and answer, no HTTP."""
    try:
        call = await bridge.start_call(CallRequest.parse(body))
    except PierError as err:
        return err.http_status, {"error": err.to_dict()}
    return call.http_status, call.to_dict()
