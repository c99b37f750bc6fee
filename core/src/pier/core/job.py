"""Job records as stored in Redis, and the views callers see."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts is not None else None


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class JobRecord(BaseModel):
    """Everything a worker needs to finish a job, and everything a caller may ask about it."""

    job_id: str
    status: JobStatus = "queued"
    user: str
    server: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    call_id: str = Field(description="the bridge call this job follows")
    endpoint: str
    endpoint_token: str | None = Field(default=None, description="secret: never shown to callers")
    retry_safe: bool = False
    attempts: int = 1
    idempotency_key: str | None = None
    request_digest: str | None = Field(
        default=None, description="digest of tool and arguments: a key reused for another call is refused"
    )
    webhook_url: str | None = None
    policy_url: str | None = Field(default=None, description="policy hook that must allow the result")
    identity: dict[str, Any] = Field(default_factory=dict, description="who asked (for policy and audit)")
    webhook_state: Literal["pending", "delivered", "dead"] = "pending"
    result: dict[str, Any] | None = None
    error: JobError | None = None
    progress: dict[str, Any] | None = None
    progress_count: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def view(self) -> dict[str, Any]:
        """`GET /v1/jobs/{id}`."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "user_id": self.user,
            "server": self.server,
            "tool": self.tool,
            "result": self.result,
            "error": self.error.model_dump() if self.error else None,
            "progress": self.progress,
            "progress_count": self.progress_count,
            "attempts": self.attempts,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }

    def completion_event(self) -> dict[str, Any]:
        """The completion payload of SSE, webhooks and bridgekit's `/mcp/events` (bridgekit's fields)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "result": self.result,
            "error": self.error.model_dump() if self.error else None,
            "user_id": self.user,
            "server": self.server,
            "tool": self.tool,
            "completed_at": iso(self.finished_at),
        }
