"""Schemas of the bridge's internal call API (used by the router and the job pool)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CallStatus = Literal["running", "completed", "failed", "cancelled"]


class CallRequest(BaseModel):
    """`POST /v1/calls`: start a tool call (or join the one with the same `call_id`)."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    call_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    wait_s: float = Field(default=30.0, ge=0, le=300, description="how long to wait before answering 202")


class Progress(BaseModel):
    progress: float
    total: float | None = None
    message: str | None = None
    at: float


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class CallRecord(BaseModel):
    """A call's state, as `/v1/calls` answers it (200 finished, 202 running, 4xx/5xx failed)."""

    call_id: str
    tool: str
    status: CallStatus
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None
    progress: list[Progress] = Field(default_factory=list)
    progress_count: int = 0
    created_at: float
    finished_at: float | None = None
