"""One tool call through the router: session, bridge, retry if safe, hand off if slow.

A call is started on the session's bridge with the job id as its call id and waited for up to
the timeout. Done in time → the result. Not done → a job record and a stream entry, and the
call keeps running in the session (the job pool follows it; it is never run twice).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pier import logs
from pier.errors import PierError
from pier.jobs.models import JobError, JobRecord
from pier.jobs.store import JobStore
from pier.router.backends.base import Session, SessionBackend
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.profiles import Profile
from pier.sidecar.client import BridgeClient, BridgeUnreachable

log = logging.getLogger("pier.router.calls")

# The call never reached the server: retrying cannot run it twice.
_NOT_STARTED = frozenset({"SERVER_UNAVAILABLE", "CALL_QUEUE_FULL"})
# The session failed under the call: retry only what is safe to run again.
_TRANSPORT = frozenset({"SERVER_EXITED", "SESSION_LOST"})


@dataclass
class CallResult:
    status: int
    body: dict[str, Any]


def queued_body(job_id: str) -> dict[str, Any]:
    return {
        "status": "queued",
        "job_id": job_id,
        "poll_url": f"/v1/jobs/{job_id}",
        "events_url": f"/v1/jobs/{job_id}/events",
    }


class CallService:
    def __init__(
        self,
        settings: RouterSettings,
        backend: SessionBackend,
        bridge: BridgeClient,
        store: JobStore,
        metrics: RouterMetrics,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.bridge = bridge
        self.store = store
        self.metrics = metrics
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.total = 0
        self.errors = 0

    def timeout_for(self, profile: Profile, requested: float | None) -> float:
        timeout = requested or profile.call_timeout_s or self.settings.call_timeout_s
        return min(timeout, self.settings.max_call_timeout_s)

    async def call(
        self,
        user: str,
        profile: Profile,
        tool: str,
        arguments: dict[str, Any],
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> CallResult:
        started = time.monotonic()
        timeout = self.timeout_for(profile, timeout_s)
        job_id = uuid.uuid4().hex
        logs.bind(job_id=job_id)
        outcome = "error"
        try:
            if idempotency_key:
                existing = await self.store.claim_idempotency(user, profile.name, idempotency_key, job_id)
                if existing is not None:
                    outcome = "replayed"
                    return await self._replay(existing, timeout)
                await self.store.save(self._record(job_id, user, profile, tool, arguments, idempotency_key))
            result = await self._run(job_id, user, profile, tool, arguments, timeout, idempotency_key)
            outcome = result.body["status"]
            return result
        except PierError as err:
            outcome = err.code
            if idempotency_key and outcome != "replayed":
                await self._settle(job_id, "failed", error=err)
            raise
        finally:
            elapsed = time.monotonic() - started
            # Only calls that reached a real tool name it in a label: callers cannot grow the label set.
            label = tool if outcome in ("completed", "queued", "replayed") else "other"
            self.metrics.call_duration.labels(profile.name, label).observe(elapsed)
            self.metrics.calls.labels(profile.name, outcome).inc()
            self.total += 1
            self.errors += label == "other"
            self.recent.appendleft(
                {
                    "at": time.time(),
                    "user": user,
                    "server": profile.name,
                    "tool": tool,
                    "outcome": outcome,
                    "duration_ms": round(elapsed * 1000, 1),
                }
            )

    async def _run(
        self,
        job_id: str,
        user: str,
        profile: Profile,
        tool: str,
        arguments: dict[str, Any],
        timeout: float,
        idempotency_key: str | None,
    ) -> CallResult:
        attempt = 0
        while True:
            call_id = job_id if attempt == 0 else f"{job_id}.{attempt}"
            session: Session | None = None
            try:
                async with self.backend.use(user, profile) as session:
                    retry_safe = bool(idempotency_key) or profile.retry_safe(tool, session.tools.get(tool))
                    status, body = await self.bridge.start_call(session.endpoint, tool, arguments, call_id, timeout)
                    if status == 202:
                        return await self._hand_off(
                            job_id,
                            user,
                            profile,
                            tool,
                            arguments,
                            session,
                            body,
                            retry_safe,
                            attempt,
                            idempotency_key,
                        )
            except BridgeUnreachable as exc:
                if session is not None:
                    await self.backend.forget(session, "unreachable")
                error: PierError = exc
                retry_safe = bool(idempotency_key) or profile.retry_safe(
                    tool, session.tools.get(tool) if session else None
                )
            else:
                if body.get("status") == "completed":
                    if idempotency_key:
                        await self._settle(job_id, "completed", result=body["result"])
                    return CallResult(200, {"status": "completed", "result": body["result"]})
                if body.get("status") == "cancelled":
                    raise PierError("CANCELLED", "the call was cancelled")
                error = PierError.from_dict(body.get("error") or {})
            retryable = error.code in _NOT_STARTED or (error.code in _TRANSPORT and retry_safe)
            if not retryable or attempt >= self.settings.max_retries:
                if error.code in _TRANSPORT and not retry_safe:
                    error.details.setdefault("retried", False)
                    error.details.setdefault(
                        "why_not_retried",
                        "the tool is not trusted as read-only/idempotent and the call has no Idempotency-Key",
                    )
                raise error
            attempt += 1
            self.metrics.retries.labels(profile.name).inc()
            log.warning("retrying call", extra={"tool": tool, "attempt": attempt, "why": error.code})
            await asyncio.sleep(self.settings.retry_backoff_s * 2 ** (attempt - 1))

    def _record(
        self, job_id: str, user: str, profile: Profile, tool: str, arguments: dict[str, Any], key: str | None
    ) -> JobRecord:
        return JobRecord(
            job_id=job_id,
            status="running",
            user=user,
            server=profile.name,
            tool=tool,
            arguments=arguments,
            call_id=job_id,
            endpoint="",
            idempotency_key=key,
            webhook_url=profile.webhook_url or self.settings.webhook_url,
            created_at=time.time(),
            started_at=time.time(),
        )

    async def _hand_off(
        self,
        job_id: str,
        user: str,
        profile: Profile,
        tool: str,
        arguments: dict[str, Any],
        session: Session,
        call: dict[str, Any],
        retry_safe: bool,
        attempt: int,
        idempotency_key: str | None,
    ) -> CallResult:
        record = self._record(job_id, user, profile, tool, arguments, idempotency_key)
        record.status = "queued"
        record.call_id = call["call_id"]
        record.endpoint = session.endpoint.url
        record.endpoint_token = session.endpoint.token
        record.retry_safe = retry_safe
        record.attempts = attempt + 1
        if call.get("progress"):
            record.progress = call["progress"][-1]
            record.progress_count = call.get("progress_count", 0)
        await self.store.enqueue(record)
        self.metrics.handoffs.labels(profile.name).inc()
        log.info("call handed to the job pool", extra={"job_id": job_id, "tool": tool})
        return CallResult(202, queued_body(job_id))

    async def _settle(
        self, job_id: str, status: str, result: dict[str, Any] | None = None, error: PierError | None = None
    ) -> None:
        """Finish the record of an idempotent call that ended without the job pool."""

        def change(record: JobRecord) -> bool:
            if record.done:
                return False
            record.status = status  # type: ignore[assignment]
            record.result = result
            record.error = JobError(**error.to_dict()) if error else None
            record.finished_at = time.time()
            return True

        record = await self.store.update(job_id, change)
        if record is not None:
            await self.store.publish(job_id, {"type": "completed", **record.completion_event()})

    async def _replay(self, job_id: str, timeout: float) -> CallResult:
        """A repeated Idempotency-Key: the first call's outcome (waited for up to the timeout)."""
        record = await self.store.get(job_id)
        if record is not None and not record.done:
            async for event in self.store.events(job_id, timeout):
                if event.get("type") == "completed":
                    break
            record = await self.store.get(job_id)
        if record is None:
            raise PierError("JOB_NOT_FOUND", "the call this Idempotency-Key started has expired")
        if record.status == "completed":
            return CallResult(200, {"status": "completed", "result": record.result, "job_id": job_id})
        if record.done:
            error = record.error or JobError(code="CANCELLED", message="the call was cancelled")
            raise PierError(error.code, error.message, {**error.details, "job_id": job_id})
        return CallResult(202, queued_body(job_id))
