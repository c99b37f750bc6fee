"""One tool call through the router: session, bridge, retry if safe, hand off if slow.

One deadline per request: the timeout counts from the moment the router received it, and covers
identity, rate limiting, finding or starting the session and the call. The call is started on the
session's bridge with the job id as its call id and waited for until the deadline. Done in time →
the result. Not done → a job record and a stream entry, and the call keeps running in the session
(the job pool follows it; it is never run twice). Still no session at the deadline → the same 202
at once: the session keeps starting, this router reports its endpoint to the job when it is up,
and a worker starts the call then (under the job's id: once). The steps around it — rules, policy,
audit, accounting — are the ingress pipeline's (`auth.ingress`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from pier.core import audit, logs, tracing
from pier.core.callapi import BridgeUnreachable, CallAnswer, CallRequest
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.job import JobError, JobRecord
from pier.core.jobstore import JobStore
from pier.core.policy import Caller, PolicyDenied
from pier.core.redis_keys import STREAM
from pier.router.auth.ingress import Ingress
from pier.router.backends.base import Session, SessionBackend, hold
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics

log = logging.getLogger("pier.router.calls")

# The call never reached the server: retrying cannot run it twice.
_NOT_STARTED = frozenset({"SERVER_UNAVAILABLE", "CALL_QUEUE_FULL"})
# The session failed under the call: retry only what is safe to run again.
_TRANSPORT = frozenset({"SERVER_EXITED", "SESSION_LOST"})
# Errors after which a keyed call has certainly not run (to its end): its key is released, so a
# resend runs it rather than replaying the error.
_NEVER_RAN = _NOT_STARTED | {
    "UNKNOWN_TOOL", "INVALID_ARGUMENTS", "POLICY_DENIED", "SESSION_CAPACITY", "SESSION_START_FAILED",
    "SHUTTING_DOWN", "STORE_UNAVAILABLE",
}  # fmt: skip
_HANDOFF_POLL_S = 0.5  # while a hand-off waits for Redis, how often the call is looked at
_LEASE_SLACK_S = 60  # beyond a call's timeout and hand-off grace, before its keyed record expires
_CLOSE_WAIT_S = 2.0


@dataclass(frozen=True)
class TaskCall:
    """An MCP task's call: its job's id (known before the call starts), and what the server may ask its caller."""

    job_id: str
    capabilities: dict[str, Any] | None = None


@dataclass
class CallResult:
    status: int
    body: dict[str, Any]


@dataclass
class ToolCall:
    """Everything about one call the router is handling."""

    caller: Caller
    profile: Profile
    tool: str
    arguments: dict[str, Any]
    timeout: float
    deadline: float  # time.monotonic() by which the caller gets an answer or a job
    idempotency_key: str | None = None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    capabilities: dict[str, Any] | None = None  # what the server may ask the caller (an MCP task's)

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    @property
    def user(self) -> str:
        return self.caller.user


def _call_attributes(call: ToolCall) -> dict[str, str]:
    attributes = {
        "gen_ai.operation.name": "execute_tool", "pier.profile": call.profile.name, "pier.user": call.user,
        "pier.via": call.caller.via, "pier.job.id": call.job_id,
    }  # fmt: skip
    if tracing.span_name("call", call.tool) != "call":
        attributes["gen_ai.tool.name"] = call.tool
    return attributes


def queued_body(job_id: str) -> dict[str, Any]:
    return {
        "status": "queued",
        "job_id": job_id,
        "poll_url": f"/v1/jobs/{job_id}",
        "events_url": f"/v1/jobs/{job_id}/events",
    }


def _why_not_retried(error: PierError, retry_safe: bool) -> str | None:
    """Why a failed attempt must not be made again, or None when it may."""
    if error.code in _NOT_STARTED:
        return None  # it never reached the server
    if error.code not in _TRANSPORT:
        return "the call ran and failed"
    if not retry_safe:
        return "the tool is not trusted as read-only/idempotent and the call has no Idempotency-Key"
    if error.details.get("suspect"):
        return "it was the newest call in flight when the server exited, so it may have caused the exit"
    return None


class CallService:
    def __init__(
        self,
        settings: RouterSettings,
        backend: SessionBackend,
        store: JobStore,
        ingress: Ingress,
        metrics: RouterMetrics,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.ingress = ingress
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()  # outcomes waiting for Redis, sessions starting

    def timeout_for(self, profile: Profile, requested: float | None) -> float:
        timeout = requested or profile.call_timeout_s or self.settings.call_timeout_s
        return min(timeout, self.settings.max_call_timeout_s)

    async def call(
        self,
        caller: Caller,
        profile: Profile,
        tool: str,
        arguments: dict[str, Any],
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        received_at: float | None = None,
        task: TaskCall | None = None,
    ) -> CallResult:
        """Run one call for an admitted caller: 200 with its result, or 202 with its job.

        `received_at` (time.monotonic()) is when the request arrived: the deadline counts from it.
        `task`: an MCP task's call (its job's id, known before the call starts; what the server may
        ask its caller, the questions then waiting in the job for `tasks/update`).
        """
        timeout = self.timeout_for(profile, timeout_s)
        start = received_at if received_at is not None else time.monotonic()
        call = ToolCall(caller, profile, tool, arguments, timeout, start + timeout, idempotency_key)
        if task is not None:
            call.job_id, call.capabilities = task.job_id, task.capabilities
        logs.bind(job_id=call.job_id)
        attributes = _call_attributes(call) if tracing.enabled() else None
        with tracing.span(tracing.span_name("call", tool), attributes=attributes) as span:
            result = await self._call(call, timeout_s is not None, start)
            if span.recording:
                span.set("pier.call.status", result.body["status"])
                if result.body["status"] == "completed" and result.body["result"].get("isError"):
                    span.fail("tool_error")  # the tool's own answer, an error all the same (MCP conventions)
            return result

    async def _call(self, call: ToolCall, timeout_given: bool, start: float) -> CallResult:
        caller, tool, arguments = call.caller, call.tool, call.arguments
        started = time.monotonic()
        outcome, denied = "error", None
        claimed = False  # this call's idempotency key is bound to it
        try:
            await self.ingress.gate.check_call(caller, tool, arguments, request_id=call.job_id)
            if call.idempotency_key:
                replayed = await self._claim(call)
                if replayed is not None:
                    outcome = "replayed"
                    return replayed
                claimed = True
            result = await self._run(call, timeout_given, start)
            outcome = result.body["status"]
            if outcome == "completed" and result.body["result"].get("isError"):
                outcome = "tool_error"
            return result
        except PierError as err:
            outcome = err.code
            denied = err if isinstance(err, PolicyDenied) else None
            if claimed:
                if err.code in _NEVER_RAN:
                    self._settle(call, self.store.release, self._record(call))
                else:
                    self._settle(call, self.store.finish, call.job_id, "failed", error=err)
            raise
        finally:
            self.ingress.finish(caller, tool, arguments, outcome, started, denied)

    async def _run(self, call: ToolCall, timeout_given: bool, start: float) -> CallResult:
        attempt = 0
        retry_safe = bool(call.idempotency_key)
        while True:
            call_id = call.job_id if attempt == 0 else f"{call.job_id}.{attempt}"
            session: Session | None = None
            try:
                session = await self._session_by_deadline(call)
                if session is None:
                    return await self._hand_off_starting(call)
                async with hold(session):
                    retry_safe = self._fit(call, session, timeout_given, start)
                    answer = await session.bridge.start_call(
                        CallRequest(call.tool, call.arguments, call_id, call.remaining(), call.capabilities)
                    )
                    if not answer.done:
                        return await self._hand_off(call, session, answer, retry_safe, attempt)
            except BridgeUnreachable as exc:
                if session is not None:
                    await self.backend.forget(session, "unreachable")
                error: PierError = exc
            except PierError as refused:  # the bridge refused to start it
                error = refused
            else:
                if answer.status != "failed":
                    return await self._answered(call, answer)
                error = answer.failure or PierError("INTERNAL", "the call failed without a reason")
            attempt = await self._next_attempt(call, error, retry_safe, attempt)

    def _fit(self, call: ToolCall, session: Session, timeout_given: bool, start: float) -> bool:
        """Fit the call to its session (an MCPSession's own threshold); whether it is safe to run again."""
        if session.call_timeout_s and not timeout_given:
            call.timeout = min(session.call_timeout_s, self.settings.max_call_timeout_s)
            call.deadline = start + call.timeout
        spec = session.tools.get(call.tool)
        return bool(call.idempotency_key) or call.profile.retry_safe(call.tool, spec)

    async def _next_attempt(self, call: ToolCall, error: PierError, retry_safe: bool, attempt: int) -> int:
        """After a failed attempt: `error` raised when the call must not run again, else (after a
        backoff) the next attempt's number."""
        why_not = _why_not_retried(error, retry_safe)
        if why_not is not None or attempt >= self.settings.max_retries:
            if why_not is not None and error.code in _TRANSPORT:
                error.details.setdefault("retried", False)
                error.details.setdefault("why_not_retried", why_not)
            raise error
        attempt += 1
        self.metrics.retries.labels(call.profile.name).inc()
        tracing.add_event("retry", {"pier.attempt": attempt, "pier.error.code": error.code})
        log.warning("retrying call", extra={"tool": call.tool, "attempt": attempt, "why": error.code})
        await asyncio.sleep(self.settings.retry_backoff_s * 2 ** (attempt - 1))
        return attempt

    async def _session_by_deadline(self, call: ToolCall) -> Session | None:
        """The user's session, or None when the deadline comes while it is still starting.

        The start goes on regardless (the backend runs it on its own): whoever asks next, or the
        hand-off below, gets the same session.
        """
        session = self.backend.ready(call.user, call.profile)
        if session is not None:  # the usual case: no deadline to arm
            return session
        try:
            async with asyncio.timeout(call.remaining()):
                return await self.backend.acquire(call.user, call.profile)
        except TimeoutError:
            return None

    async def _hand_off_starting(self, call: ToolCall) -> CallResult:
        """The deadline came before the session was up: a job now, its call once the session is."""
        record = self._record(call)
        record.status = "queued"
        record.started = False
        record.session_deadline = time.time() + self.session_start_budget_s()
        await self._enqueue(record)
        self.metrics.handoffs.labels(call.profile.name).inc()
        log.info("session still starting at the deadline: call handed to the job pool", extra={"tool": call.tool})
        self._spawn(self._report_session(call), f"pier-session-for-{call.job_id}")
        return CallResult(202, queued_body(call.job_id))

    def session_start_budget_s(self) -> float:
        """How long a job waits for its session's endpoint before it fails (the backend's own bound, and slack)."""
        s = self.settings
        bound = s.kube_ready_timeout_s if s.backend == "kubernetes" else s.session_start_timeout_s
        return bound + _LEASE_SLACK_S

    async def _report_session(self, call: ToolCall) -> None:
        """Wait for the session the job waits for, then tell the job where its call is to run."""
        try:
            session = await self.backend.acquire(call.user, call.profile)
        except PierError as err:
            await self._write_when_redis_returns(call, self.store.finish, call.job_id, "failed", error=err)
            return
        retry_safe = bool(call.idempotency_key) or call.profile.retry_safe(call.tool, session.tools.get(call.tool))
        endpoint = session.endpoint

        async def report() -> None:
            await self.store.update(call.job_id, lambda r: r.session_ready(endpoint.url, endpoint.token, retry_safe))

        await self._write_when_redis_returns(call, report)

    async def _completed(self, call: ToolCall, result: dict[str, Any]) -> CallResult:
        if call.caller.policy_url:
            response = {"jsonrpc": "2.0", "id": call.job_id, "result": result}
            await self.ingress.gate.check_output(call.caller, response)
        if call.idempotency_key:
            self._settle(call, self.store.finish, call.job_id, "completed", result=result)
        return CallResult(200, {"status": "completed", "result": result})

    def _record(self, call: ToolCall) -> JobRecord:
        now = time.time()
        return JobRecord(
            job_id=call.job_id,
            status="running",
            user=call.user,
            server=call.profile.name,
            tool=call.tool,
            arguments=call.arguments,
            call_id=call.job_id,
            endpoint="",
            idempotency_key=call.idempotency_key,
            request_digest=audit.digest({"tool": call.tool, "arguments": call.arguments}),
            webhook_url=call.profile.webhook_url or self.settings.webhook_url,
            policy_url=call.caller.policy_url,
            identity=call.caller.identity,
            created_at=now,
            started_at=now,
        )

    # -- hand-off ------------------------------------------------------------------------------

    async def _hand_off(
        self, call: ToolCall, session: Session, running: CallAnswer, retry_safe: bool, attempt: int
    ) -> CallResult:
        """Give a call that overran its timeout to the job pool; it keeps running in its session.

        While Redis is unreachable the hand-off is retried for `handoff_grace_s`, and the call is
        watched meanwhile: if it finishes, the caller gets its answer directly. If Redis stays away,
        the call is cancelled and the caller told to retry (STORE_UNAVAILABLE): a call is never left
        running with no job through which its caller could get the result.
        """
        record = self._record(call)
        record.status = "queued"
        record.call_id = running.call_id
        record.endpoint = session.endpoint.url
        record.endpoint_token = session.endpoint.token
        record.retry_safe = retry_safe
        record.attempts = attempt + 1
        if running.progress:
            record.progress = running.progress[-1]
            record.progress_count = running.progress_count
        try:
            await self._enqueue(record)
        except RedisError as exc:
            log.warning("Redis unavailable at hand-off; holding the call", extra={"error": str(exc)})
            answer = await self._hand_off_when_redis_returns(call, session, record)
            if answer is not None:
                return answer
        self.metrics.handoffs.labels(call.profile.name).inc()
        log.info("call handed to the job pool", extra={"tool": call.tool})
        return CallResult(202, queued_body(call.job_id))

    async def _enqueue(self, record: JobRecord) -> None:
        """Save a job with its stream entry, under the producer span whose context the job carries: the
        worker that takes it joins the caller's trace."""
        attributes = {
            "messaging.system": "redis", "messaging.operation.type": "send", "messaging.destination.name": STREAM,
            "pier.job.id": record.job_id,
        }  # fmt: skip
        with tracing.span(f"send {STREAM}", "producer", attributes):
            record.traced(tracing.current())
            await self.store.enqueue(record)

    async def _hand_off_when_redis_returns(
        self, call: ToolCall, session: Session, record: JobRecord
    ) -> CallResult | None:
        """Retry the hand-off for `handoff_grace_s`; None once it is done, or the call's own answer
        if the call finished first. Cancels the call and raises STORE_UNAVAILABLE when time is up."""
        try:
            async with asyncio.timeout(self.settings.handoff_grace_s):
                while True:
                    self.metrics.redis_errors.labels("handoff").inc()
                    answer = await session.bridge.get_call(record.call_id, _HANDOFF_POLL_S)
                    if answer.done:
                        return await self._answered(call, answer)
                    try:
                        await self._enqueue(record)
                        return None
                    except RedisError:
                        continue
        except TimeoutError:
            with contextlib.suppress(PierError):
                await session.bridge.cancel_call(record.call_id)
            raise PierError(
                "STORE_UNAVAILABLE",
                "the call overran its timeout and could not be handed to the job pool (Redis is unreachable); "
                "it was cancelled: retry later",
                {"cancelled": True, "retry_after_s": 1},
            ) from None

    async def _answered(self, call: ToolCall, answer: CallAnswer) -> CallResult:
        """A finished call's answer: its result, or its failure raised (also for a call that finished
        while its hand-off waited for Redis: as if in time)."""
        if answer.status == "completed":
            assert answer.result is not None
            return await self._completed(call, answer.result)
        if answer.status == "cancelled":
            raise PierError("CANCELLED", "the call was cancelled")
        raise answer.failure or PierError("INTERNAL", "the call failed without a reason")

    # -- idempotency keys ----------------------------------------------------------------------

    def _settle(self, call: ToolCall, write: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any) -> None:
        """Write a keyed call's outcome to Redis, now or, if Redis is away, as soon as it is back.

        The caller does not wait for it: it has its answer. Retried until the record's lease ends
        (after which record and key have expired by themselves).
        """
        self._spawn(self._write_when_redis_returns(call, write, *args, **kwargs), f"pier-settle-{call.job_id}")

    async def _write_when_redis_returns(
        self, call: ToolCall, write: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any
    ) -> None:
        deadline = time.monotonic() + self.lease_s(call)
        backoff = 0.1
        while True:
            try:
                await write(*args, **kwargs)
                return
            except RedisError as exc:
                if time.monotonic() + backoff > deadline:
                    log.error("could not record a call's outcome; its record expires", extra={"error": str(exc)})
                    return
                self.metrics.redis_errors.labels("settle").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def lease_s(self, call: ToolCall) -> int:
        """How long a keyed call's record lives while the router owns the call (it may die meanwhile)."""
        return int(call.timeout + self.settings.handoff_grace_s + _LEASE_SLACK_S)

    async def close(self) -> None:
        """Give outcomes still waiting for Redis a last moment, then drop them (their leases expire).

        Jobs still waiting for a session this router was starting fail when their wait runs out.
        """
        if self._background:
            _, pending = await asyncio.wait(self._background, timeout=_CLOSE_WAIT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _claim(self, call: ToolCall) -> CallResult | None:
        """Bind the call's idempotency key to it; if the key was bound, the first call's outcome instead."""
        assert call.idempotency_key is not None
        record = self._record(call)
        while True:
            existing = await self.store.claim_idempotency(record, self.lease_s(call))
            if existing is None:
                return None
            first = await self.store.get(existing)
            if first is None:
                continue  # gone since the claim (released or expired): claim again
            if first.request_digest != record.request_digest:
                raise PierError(
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used for a different call (another tool or other arguments)",
                    {"job_id": existing},
                )
            replayed = await self._replay(existing, call.timeout)
            if replayed is not None:
                return replayed

    async def _replay(self, job_id: str, timeout: float) -> CallResult | None:
        """A repeated Idempotency-Key: the first call's outcome (waited for up to the timeout).

        None when the first call's job has gone meanwhile (it never ran and was released).
        """
        record = await self.store.get(job_id)
        if record is not None and not record.done:
            async for event in self.store.events(job_id, timeout):
                if event.get("type") == "completed":
                    break
            record = await self.store.get(job_id)
        if record is None:
            return None
        if record.status == "completed":
            return CallResult(200, {"status": "completed", "result": record.result, "job_id": job_id})
        if record.done:
            error = record.error or JobError(code="CANCELLED", message="the call was cancelled")
            raise PierError(error.code, error.message, {**error.details, "job_id": job_id})
        return CallResult(202, queued_body(job_id))
