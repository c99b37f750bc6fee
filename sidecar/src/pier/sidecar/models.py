"""Schemas of the bridge's internal call API answers (the bridge itself builds them as plain dicts;
these describe them for the router, the job pool and the tests). Requests: `calls.CallRequest`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

CallStatus = Literal["running", "completed", "failed", "cancelled"]


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
