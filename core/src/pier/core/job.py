"""A job: a call the router handed off (or a keyed call it runs), its record in Redis, and the one
place its state changes.

States: ``queued`` (handed off, no worker yet) → ``running`` (a worker follows it; a call the router
runs itself under an Idempotency-Key starts here) → ``completed`` | ``failed`` | ``cancelled``. A job
handed off while its session was still starting has no call yet (`started` false): the router that
starts the session reports its endpoint (`session_ready`), and a worker starts the call (`call_started`). A
running job may be re-run (a new call id, one more attempt) when its session lost it, if it is
retry-safe and was not the suspect of its server's crash; when the session's bridge itself is gone (its pod
was replaced, its node lost), the re-run waits for the session's new endpoint (`relocate`), which a router
reports as for a starting session. An ended job never changes again (but for
its webhook's delivery state). Every change goes through a method below, which says whether it
applied; `JobStore.update` applies one atomically.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from pier.core import tracing
from pier.core.errors import PierError
from pier.core.policy import Caller

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
    started: bool = Field(default=True, description="false while its session starts: no call exists yet")
    session_deadline: float | None = Field(
        default=None, description="until when a worker waits for the starting session's endpoint"
    )
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
    input_requests: dict[str, Any] = Field(
        default_factory=dict, description="what the server asked the caller and still waits for (an MCP task's input)"
    )
    input_version: int = Field(default=0, description="the bridge's count of changes to input_requests")
    traceparent: str | None = Field(default=None, description="W3C trace context of its hand-off: workers join it")
    tracestate: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def trace(self) -> tracing.TraceContext | None:
        """Where its hand-off stands in the caller's trace (None: not traced, or unreadable)."""
        return tracing.parse(self.traceparent, self.tracestate)

    def traced(self, context: tracing.TraceContext | None) -> None:
        """Carry `context` (set before the job is saved: not a state change)."""
        if context is not None:
            self.traceparent, self.tracestate = context.traceparent, context.state or None

    def caller(self) -> Caller:
        """Who asked for this call, as the policy hook judges its result."""
        key_id = str(self.identity.get("key_id") or "")
        return Caller(self.identity, key_id, self.user, self.server, self.policy_url, via="job")

    # -- transitions ---------------------------------------------------------------------------

    def take(self) -> bool:
        """queued → running: a worker starts following the call."""
        if self.status != "queued":
            return False
        self.status = "running"
        return True

    def session_ready(self, endpoint: str, token: str | None, retry_safe: bool) -> bool:
        """The session a not-yet-started job waited for is up: where its call will run."""
        if self.done or self.started or self.endpoint:
            return False
        self.endpoint, self.endpoint_token, self.retry_safe = endpoint, token, retry_safe
        return True

    def call_started(self) -> bool:
        """A worker started the call on its session (under the job's id: it cannot start twice)."""
        if self.done or self.started:
            return False
        self.started = True
        return True

    def note_progress(self, latest: dict[str, Any] | None, count: int) -> bool:
        """The call's latest progress, while it runs."""
        if self.done:
            return False
        self.progress, self.progress_count = latest, count
        return True

    def note_input(self, requests: dict[str, Any], version: int) -> bool:
        """What the call waits for from its caller now (as of the bridge's `version` of it: older news
        never overwrites newer)."""
        if self.done or version <= self.input_version:
            return False
        self.input_requests, self.input_version = requests, version
        return True

    def may_rerun(self, max_reruns: int, suspect: bool) -> bool:
        """May this job's call run again after its session lost it?

        Only a retry-safe call, within `max_reruns`, and never the suspect of its server's exit (the
        newest call in flight when the server ended by itself may be what killed it).
        """
        return self.retry_safe and not suspect and not self.done and self.attempts <= max_reruns

    def rerun(self, call_id: str) -> bool:
        """The job now follows a new run of its call, `call_id`."""
        if self.done:
            return False
        self.call_id, self.attempts = call_id, self.attempts + 1
        return True

    def relocate(self, call_id: str, deadline: float) -> bool:
        """The session lost the call and its bridge is gone (a new pod, another node): the re-run, `call_id`,
        starts once a router reports where the session runs now (`session_ready`), if before `deadline`."""
        if self.done:
            return False
        self.call_id, self.attempts = call_id, self.attempts + 1
        self.started, self.endpoint, self.endpoint_token, self.session_deadline = False, "", None, deadline
        return True

    def finish(
        self, status: Literal["completed", "failed", "cancelled"], result: dict[str, Any] | None = None,
        error: PierError | None = None,
    ) -> bool:  # fmt: skip
        """→ completed / failed / cancelled, once: an ended job stays as it ended."""
        if self.done:
            return False
        self.status = status
        self.result = result
        self.error = JobError(**error.to_dict()) if error else None
        self.finished_at = time.time()
        self.input_requests = {}
        return True

    def webhook_sent(self, delivered: bool) -> bool:
        """The completion webhook was delivered, or dead-lettered after its last attempt."""
        self.webhook_state = "delivered" if delivered else "dead"
        return True

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
