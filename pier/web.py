"""HTTP pieces shared by the bridge and the router: JSON and error responses, SSE, origins."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from pier.errors import PierError
from pier.jsonrpc import dumps

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(payload), content_type="application/json", headers=headers)


def error_response(err: PierError, headers: dict[str, str] | None = None) -> web.Response:
    """`{"error": {"code", "message", "details"}}` with the code's HTTP status (and Retry-After if due)."""
    headers = dict(headers or {})
    retry_after = err.details.get("retry_after_s")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return json_response({"error": err.to_dict()}, err.http_status, headers)


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    """DNS-rebinding protection: browsers may call only from local or explicitly allowed origins."""
    if "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).hostname in _LOCAL_HOSTS
