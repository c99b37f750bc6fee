"""Client of a bridge's call API, used by the router and the job pool (keep-alive, timeouts)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from pier.errors import PierError
from pier.jsonrpc import dumps, loads

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
    """Calls into bridges over one shared connection pool."""

    def __init__(self, http: aiohttp.ClientSession, ssl_context: ssl.SSLContext | None = None) -> None:
        self.http = http
        # mTLS to the bridges when configured; the default context otherwise (https endpoints).
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

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
        status, body = await self._request("GET", endpoint, "/v1/tools", timeout)
        if status != 200:
            raise PierError.from_dict(body.get("error") or {"code": "SESSION_START_FAILED"})
        return body["tools"]

    async def status(self, endpoint: Endpoint, timeout: float = 5.0) -> dict[str, Any]:
        _, body = await self._request("GET", endpoint, "/v1/status", timeout)
        return body
