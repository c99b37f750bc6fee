"""Gateway error codes shared by every component, and the HTTP status each maps to.

A tool result with ``isError: true`` is the tool's answer, never one of these: these are
failures of Pier or of the server process, reported as
``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any

HTTP_STATUS: dict[str, int] = {
    "BAD_REQUEST": 400,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "INLINE_COMMANDS_DISABLED": 403,
    "POLICY_DENIED": 403,
    "NOT_FOUND": 404,
    "UNKNOWN_SERVER": 404,
    "UNKNOWN_TOOL": 404,
    "JOB_NOT_FOUND": 404,
    "CALL_NOT_FOUND": 404,
    "REQUEST_TIMEOUT": 408,
    "CANCELLED": 409,
    "SECRETS_REQUIRED": 409,
    "CONNECTION_REQUIRED": 409,
    "JOB_RUNNING": 409,
    "IDEMPOTENCY_KEY_REUSED": 422,
    "PAYLOAD_TOO_LARGE": 413,
    "INVALID_ARGUMENTS": 422,
    "RATE_LIMITED": 429,
    "INTERNAL": 500,
    "SESSION_START_FAILED": 502,
    "SERVER_EXITED": 502,
    "SESSION_LOST": 502,
    "SERVER_ERROR": 502,
    "CONNECTION_FAILED": 502,
    "SESSION_CAPACITY": 503,
    "SESSION_STARTING": 503,
    "CALL_QUEUE_FULL": 503,
    "SERVER_UNAVAILABLE": 503,
    "SHUTTING_DOWN": 503,
    "STORE_UNAVAILABLE": 503,
    "UPSTREAM_TIMEOUT": 504,
}


class PierError(Exception):
    """An error with a stable code, a human message and structured details."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PierError:
        return cls(str(data.get("code", "INTERNAL")), str(data.get("message", "")), data.get("details") or {})


class ConfigError(Exception):
    """A setting or catalog Pier refuses to start with; its message is the one line an operator reads."""
