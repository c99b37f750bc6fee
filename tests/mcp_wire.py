"""MCP on the wire, by hand: 2026-07-28 requests with their envelope and headers, posted raw (no SDK
smoothing things over), as several test folders send them."""

from __future__ import annotations

import json
from typing import Any

from pier.core.protocol import MODERN, TASKS_EXTENSION

# A 2026-07-28 client's capabilities when it takes tasks (the tasks extension).
TASKS: dict[str, Any] = {"extensions": {TASKS_EXTENSION: {}}}
ACCEPT = {"Accept": "application/json, text/event-stream"}


def modern_request(request_id, method: str, params: dict | None = None, capabilities: dict | None = None) -> dict:
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": capabilities or {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**(params or {}), "_meta": meta}}


def modern_headers(message: dict) -> dict[str, str]:
    headers = {**ACCEPT, "MCP-Protocol-Version": MODERN, "Mcp-Method": message["method"]}
    params = message.get("params") or {}
    for key in ("name", "uri", "taskId"):
        if key in params:
            headers["Mcp-Name"] = str(params[key])
            break
    return headers


async def post(http, url: str, message: dict, headers: dict | None = None) -> tuple[int, dict]:
    async with http.post(url, json=message, headers=headers or modern_headers(message)) as response:
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = [
                json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: ")
            ]
            return response.status, next(e for e in events if e.get("id") == message["id"])
        return response.status, await response.json()
