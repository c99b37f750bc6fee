"""A bridge in the caller's own process, behind the same handle as one reached over HTTP.

The router's local sessions run their bridge app on the router's event loop (`PIER_LOCAL_BRIDGES=
inprocess`). The app still serves HTTP on loopback — for the MCP relay and the job pool — but the
router's own calls go straight to the `Bridge`: no second HTTP hop. Answers and errors are those
of `HttpBridge`, and so are the time bounds: a bridge that never answers is unreachable, never
awaited forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pier.core.callapi import (
    SLACK_S,
    BridgeStatus,
    BridgeUnreachable,
    CallAnswer,
    CallRequest,
    ClientState,
    Endpoint,
)
from pier.sidecar.app import Bridge


class InProcessBridge:
    """A `BridgeHandle` (see `pier.core.callapi`) on a `Bridge` object of this process."""

    def __init__(self, bridge: Bridge, endpoint: Endpoint) -> None:
        self.bridge = bridge
        self.endpoint = endpoint
        self.mcp = bridge.mcp

    async def start_call(self, request: CallRequest) -> CallAnswer:
        try:
            async with asyncio.timeout(request.wait_s + SLACK_S):
                return await self.bridge.start_call(request)
        except TimeoutError as exc:
            raise BridgeUnreachable(self.endpoint, exc) from exc

    async def get_call(
        self, call_id: str, wait_s: float = 0, progress_after: int | None = None, input_after: int | None = None
    ) -> CallAnswer:
        return await self.bridge.get_call(
            call_id,
            wait_s,
            -1 if progress_after is None else progress_after,
            -1 if input_after is None else input_after,
        )

    async def cancel_call(self, call_id: str) -> CallAnswer:
        return self.bridge.cancel_call(call_id)

    async def answer_call(self, call_id: str, responses: dict[str, Any]) -> CallAnswer:
        return self.bridge.answer_call(call_id, responses)

    async def tools(self, timeout: float) -> list[dict[str, Any]]:
        try:
            return await asyncio.wait_for(self.bridge.tools(), timeout)
        except TimeoutError as exc:
            raise BridgeUnreachable(self.endpoint, exc) from exc

    async def status(self, timeout: float = 5.0) -> BridgeStatus:
        return self.bridge.status()

    async def resume_client(self, state: ClientState, timeout: float = SLACK_S) -> bool:
        try:
            return await asyncio.wait_for(self.bridge.resume_client(state), timeout)
        except TimeoutError as exc:
            raise BridgeUnreachable(self.endpoint, exc) from exc
