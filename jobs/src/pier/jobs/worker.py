"""`pier jobs`: consumer-group workers that see handed-off calls through to the end.

A worker never executes a tool itself: it follows the call that is already running in the
user's session (long-polling the bridge by call id), so a job whose worker dies is simply
followed again by another worker (XAUTOCLAIM) and the tool still runs exactly once. Only when
the session lost the call is it run again, and only if that is safe: in the same bridge when its
server crashed, or, when the bridge itself is gone (its pod replaced, its node lost), wherever the
session runs next — a router finds it and reports its endpoint (`pier.router.wanted`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError, ResponseError

from pier.core import logs, tracing
from pier.core.callapi import BridgeUnreachable, CallAnswer, CallRequest, Endpoint, HttpBridge
from pier.core.errors import PierError
from pier.core.job import JobRecord
from pier.core.jobstore import JobStore, QueueStats, connect
from pier.core.policy import Gate, Policer, PolicyDenied, PolicyMetrics
from pier.core.redis_keys import GROUP, STREAM
from pier.core.tls import client_context
from pier.core.web import json_response, serve
from pier.jobs.config import JobsSettings
from pier.jobs.metrics import JobMetrics
from pier.jobs.webhooks import WebhookSender

log = logging.getLogger("pier.jobs.worker")

_PROGRESS_SAVE_S = 0.5  # progress is published at once but saved to the record at most this often
_UNREACHABLE_TRIES = 3  # a bridge that does not answer this many times running has lost the call
_SESSION_POLL_S = 0.25  # how often a job waiting for its session looks for the endpoint
_MEASURE_S = 5.0  # how often the stream's backlog is measured


@dataclass
class _Following:
    """One job as a worker follows its call: its record, the progress seen, when progress was last saved,
    and how many long-polls running the bridge did not answer."""

    record: JobRecord
    seen: int
    last_save: float = 0.0
    unreachable: int = 0


class Worker:
    def __init__(self, settings: JobsSettings) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self.metrics = JobMetrics()
        self.redis = connect(settings.redis_url)
        self.store = JobStore(self.redis, settings.result_ttl_s)
        self.http: aiohttp.ClientSession | None = None
        self.bridge_ssl: ssl.SSLContext | bool = True
        self.webhooks: WebhookSender
        self.gate: Gate
        self.following: dict[str, asyncio.Task[None]] = {}  # stream entry id → its task
        self._slots = asyncio.Semaphore(settings.max_jobs)
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False  # the loops end on it too: redis-py can swallow a cancellation
        self.queue = QueueStats(0, 0, 0, 0.0)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        tracing.start("pier-jobs")
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        s = self.settings
        if s.internal_tls_cert is not None:
            self.bridge_ssl = client_context(s.internal_tls_ca, s.internal_tls_cert, s.internal_tls_key)
        secret = self.settings.webhook_secret.get_secret_value() if self.settings.webhook_secret else None
        if self.settings.webhook_url and not secret:
            log.warning("webhooks will be sent unsigned: set PIER_WEBHOOK_SECRET")
        policy_token = self.settings.policy_token.get_secret_value() if self.settings.policy_token else None
        policer = Policer(
            self.http,
            PolicyMetrics(self.metrics.registry),
            policy_token,
            self.settings.policy_fail_open,
            self.settings.policy_timeout_s,
        )
        self.gate = Gate(policer, audit_log=False)  # the router audited the call when it handed it off
        self.webhooks = WebhookSender(
            self.http, self.redis, self.metrics, secret, self.settings.webhook_timeout_s,
            self.settings.webhook_attempts, self.settings.webhook_backoff_s,
        )  # fmt: skip
        self._loops = [
            asyncio.create_task(self._read_forever(), name="pier-jobs-read"),
            asyncio.create_task(self._reclaim_forever(), name="pier-jobs-reclaim"),
            asyncio.create_task(self._heartbeat_forever(), name="pier-jobs-heartbeat"),
            asyncio.create_task(self._measure_forever(), name="pier-jobs-queue"),
        ]
        log.info("job worker started", extra={"worker": self.name})

    async def stop(self) -> None:
        """Stop reading; jobs being followed are left unacknowledged for another worker to reclaim."""
        self._stopping = True
        for task in [*self._loops, *self.following.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self.following.values(), return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        await self.redis.aclose()
        await asyncio.to_thread(tracing.stop)

    @property
    def healthy(self) -> bool:
        return all(not task.done() for task in self._loops)

    # -- the stream ------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.1
        group_ready = False
        while not self._stopping:
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                await self._slots.acquire()  # wait for room before taking more work
                self._slots.release()
                reply = await self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=50, block=5000)
                entries = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply)  # RESP2
                backoff = 0.1
            except ResponseError as exc:
                group_ready = "NOGROUP" not in str(exc)  # Redis came back empty: recreate the group
                await self._redis_trouble(exc, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _stream, messages in entries or []:
                for entry_id, fields in messages:
                    self._follow_entry(entry_id.decode(), fields)

    async def _reclaim_forever(self) -> None:
        """Take over entries whose worker has gone silent past the visibility timeout."""
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        while not self._stopping:
            await asyncio.sleep(self.settings.visibility_timeout_s / 2)
            try:
                start = "0-0"
                while True:
                    start, messages, *_ = await self.redis.xautoclaim(
                        STREAM, GROUP, self.name, min_idle_time=idle_ms, start_id=start, count=100
                    )
                    for entry_id, fields in messages:
                        entry = entry_id.decode()
                        if entry not in self.following:
                            self.metrics.reclaimed.inc()
                            log.info("reclaimed a job from a silent worker", extra={"entry": entry})
                            self._follow_entry(entry, fields)
                    if start in (b"0-0", "0-0"):
                        break
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, 0)

    async def _heartbeat_forever(self) -> None:
        """Keep our own entries fresh, so a long job is not mistaken for an abandoned one."""
        while not self._stopping:
            await asyncio.sleep(self.settings.visibility_timeout_s / 3)
            if not self.following:
                continue
            try:
                await self.redis.xclaim(STREAM, GROUP, self.name, 0, list(self.following), justid=True)
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, 0)

    async def _measure_forever(self) -> None:
        """The stream's backlog as gauges (what autoscalers scale workers on), every few seconds."""
        while not self._stopping:
            try:
                self.queue = await self.store.queue_stats()
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, 0)
            else:
                self.metrics.queue_lag.set(self.queue.queued)
                self.metrics.oldest_queued.set(self.queue.oldest_queued_s)
                self.metrics.stream_length.set(self.queue.length)
            await asyncio.sleep(_MEASURE_S)

    async def _redis_trouble(self, exc: BaseException, pause: float) -> None:
        self.metrics.redis_errors.inc()
        log.warning("Redis unavailable; retrying", extra={"error": str(exc)})
        await asyncio.sleep(pause)

    def _follow_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        if entry_id in self.following:
            return
        job_id = fields.get(b"job_id", b"").decode()
        self.following[entry_id] = asyncio.create_task(self._run_entry(entry_id, job_id), name=f"pier-job-{job_id}")

    async def _run_entry(self, entry_id: str, job_id: str) -> None:
        async with self._slots:
            self.metrics.running.inc()
            token = logs.bind(job_id=job_id)
            try:
                await self._follow(job_id, entry_id)
                await self._ack(entry_id)
            except (RedisError, OSError) as exc:
                # Unacknowledged: this worker or another one takes it up again after the timeout.
                log.warning("job interrupted by a Redis error; it will be reclaimed", extra={"error": str(exc)})
            except Exception:
                log.exception("job follower failed; it will be reclaimed")
            finally:
                logs.unbind(token)
                self.metrics.running.dec()
                self.following.pop(entry_id, None)

    async def _ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)  # the stream's length is then the work outstanding
            await pipe.execute()

    # -- one job ---------------------------------------------------------------------------

    def _bridge(self, record: JobRecord) -> HttpBridge:
        assert self.http is not None
        return HttpBridge(self.http, Endpoint(record.endpoint, record.endpoint_token), self.bridge_ssl)

    async def _follow(self, job_id: str, entry_id: str) -> None:
        """Follow a job's call to its end (re-running it if its session lost it and that is safe).

        Under a consumer span in the trace of the call's hand-off (the record carries its context), linked
        to it: a worker that takes the job over joins the same trace."""
        record = await self.store.get(job_id)
        if record is None:
            log.warning("job record expired before it was followed")
            return
        handoff = record.trace()
        attributes = {
            "messaging.system": "redis", "messaging.operation.type": "process", "messaging.destination.name": STREAM,
            "messaging.consumer.group.name": GROUP, "messaging.message.id": entry_id, "pier.job.id": job_id,
            "pier.profile": record.server, "pier.user": record.user, "gen_ai.tool.name": record.tool[:64],
        }  # fmt: skip
        with tracing.span(f"process {STREAM}", "consumer", attributes, parent=handoff, links=[handoff]):
            taken = await self._take(record)
            if taken is None:
                return
            following = _Following(taken, taken.progress_count)
            while await self._follow_once(following):
                pass

    async def _take(self, record: JobRecord) -> JobRecord | None:
        """The job's record, taken (queued → running), its call started if its session was starting;
        None when there is nothing to follow."""
        job_id = record.job_id
        if record.done:
            await self._after_finish(record)  # a reclaimed job whose webhook may not have gone out
            return None
        record = (await self.store.update(job_id, JobRecord.take))[0] or record
        if not record.started:
            return await self._start_when_the_session_is_up(record)
        return record

    async def _follow_once(self, following: _Following) -> bool:
        """One long-poll of the call; False once the job has ended."""
        record = following.record
        try:
            answer = await self._bridge(record).get_call(
                record.call_id, self.settings.poll_wait_s, following.seen, record.input_version
            )
            following.unreachable = 0
        except BridgeUnreachable as exc:
            following.unreachable += 1
            if following.unreachable < _UNREACHABLE_TRIES:
                await asyncio.sleep(0.5 * following.unreachable)
                return True
            return await self._rerun_or_fail(following, f"the session is gone: {exc.message}")
        except PierError as err:  # CALL_NOT_FOUND
            return await self._rerun_or_fail(following, f"the session no longer knows the call: {err.message}")
        if answer.status == "running":
            if answer.input_version > record.input_version and not await self._note_input(following, answer):
                return False
            return await self._note_progress(following, answer)
        return await self._call_ended(following, answer)

    async def _note_input(self, following: _Following, answer: CallAnswer) -> bool:
        """The call waits for its caller's input (or got it): the record says so, for `tasks/get` on
        any replica. False when the job ended meanwhile."""
        note = functools.partial(JobRecord.note_input, requests=answer.input_requests, version=answer.input_version)
        saved, _ = await self.store.update(following.record.job_id, note)
        following.record = saved or following.record
        return not following.record.done

    async def _note_progress(self, following: _Following, answer: CallAnswer) -> bool:
        """Publish the call's new progress, and save it to the record now and then; False when the job
        ended meanwhile (cancelled)."""
        record = following.record
        following.seen = await self._progress(record, answer, following.seen)
        if time.monotonic() - following.last_save >= _PROGRESS_SAVE_S:
            following.last_save = time.monotonic()
            latest = answer.progress[-1] if answer.progress else record.progress
            note = functools.partial(JobRecord.note_progress, latest=latest, count=following.seen)
            saved, _ = await self.store.update(record.job_id, note)
            following.record = saved or record
            if following.record.done:  # cancelled meanwhile
                return False
        return True

    async def _call_ended(self, following: _Following, answer: CallAnswer) -> bool:
        """The call ended: so does the job, unless its server's exit lost it (then a re-run, if safe)."""
        record, failure = following.record, answer.failure
        if answer.status == "completed":
            await self._finish(record, "completed", result=answer.result)
        elif answer.status == "cancelled":
            await self._finish(record, "cancelled", error=PierError("CANCELLED", "the call was cancelled"))
        elif failure is not None and failure.code == "SERVER_EXITED":
            return await self._rerun_or_fail(following, failure.message, bool(failure.details.get("suspect")))
        else:
            await self._finish(record, "failed", error=failure)
        return False

    async def _rerun_or_fail(self, following: _Following, why: str, suspect: bool = False) -> bool:
        """The session lost the call: follow its re-run (True), or the job has failed (False)."""
        rerun = await self._session_lost(following.record, why, suspect)
        if rerun is None:
            return False
        following.record, following.seen, following.unreachable = rerun, 0, 0  # a new call: its own progress
        return True

    async def _start_when_the_session_is_up(self, record: JobRecord, lost: str = "") -> JobRecord | None:
        """A job handed off while its session was starting (or whose session was `lost` and is being found
        again): wait for a router to report the session's endpoint, then start the call there (under the
        job's call id, so a worker that takes this job over joins the same call). None when the job ended."""
        while not record.endpoint:
            if record.done:
                return None
            if time.time() > (record.session_deadline or 0):
                if lost:
                    details = {"reason": lost, "retry_safe": record.retry_safe, "attempts": record.attempts}
                    error = PierError("SESSION_LOST", f"{lost}; it did not come back in time", details)
                else:
                    error = PierError(
                        "SESSION_START_FAILED", "the session did not start in time (or its router went away)"
                    )
                await self._finish(record, "failed", error=error)
                return None
            await asyncio.sleep(_SESSION_POLL_S)
            current = await self.store.get(record.job_id)
            if current is None:
                return None
            record = current
        try:
            await self._bridge(record).start_call(CallRequest(record.tool, record.arguments, record.call_id, 0))
        except PierError as refused:  # never ran: unreachable, unknown tool, bad arguments, full queue…
            await self._finish(record, "failed", error=refused)
            return None
        updated, _ = await self.store.update(record.job_id, JobRecord.call_started)
        return updated

    async def _progress(self, record: JobRecord, answer: CallAnswer, seen: int) -> int:
        """Publish progress the bridge reported since `seen`; returns the new count."""
        for item in answer.progress:
            await self.store.publish(record.job_id, {"type": "progress", "job_id": record.job_id, **item})
        return answer.progress_count

    async def _session_lost(self, record: JobRecord, why: str, suspect: bool = False) -> JobRecord | None:
        """The call died with its server or session: run it again if safe, else fail the job.

        Returns the record to go on following (its new run), or None once the job has ended.
        """
        if record.may_rerun(self.settings.max_reruns, suspect):
            call_id = f"{record.job_id}.{record.attempts}"
            try:
                await self._bridge(record).start_call(CallRequest(record.tool, record.arguments, call_id, 0))
            except BridgeUnreachable:  # the bridge itself is gone: the session runs elsewhere now, or will
                return await self._relocate(record, call_id, why)
            except PierError as refused:  # refused: it cannot run there again
                why = f"{why}; the re-run was refused: {refused.message}"
            else:
                self.metrics.reruns.labels(record.server).inc()
                log.warning("re-running a retry-safe job its session lost", extra={"why": why, "call_id": call_id})
                updated, _ = await self.store.update(record.job_id, lambda r: r.rerun(call_id))
                return None if updated is None or updated.done else updated
        details = {"reason": why, "retry_safe": record.retry_safe, "attempts": record.attempts, "suspect": suspect}
        await self._finish(record, "failed", error=PierError("SESSION_LOST", why, details))
        return None

    async def _relocate(self, record: JobRecord, call_id: str, why: str) -> JobRecord | None:
        """Re-run a retry-safe job wherever its session runs now: a router finds it (starting it again if it
        must) and reports its endpoint; the call starts there once. None once the job has ended."""
        deadline = time.time() + self.settings.relocate_timeout_s
        updated, _ = await self.store.update(record.job_id, lambda r: r.relocate(call_id, deadline))
        if updated is None or updated.done:
            return None
        await self.store.want_session(updated, record.endpoint)
        self.metrics.reruns.labels(record.server).inc()
        log.warning("re-running a retry-safe job where its session runs now", extra={"why": why, "call_id": call_id})
        return await self._start_when_the_session_is_up(updated, lost=why)

    async def _finish(
        self,
        record: JobRecord,
        status: Literal["completed", "failed", "cancelled"],
        result: dict[str, Any] | None = None,
        error: PierError | None = None,
    ) -> None:
        if status == "completed" and record.policy_url:
            try:  # the result passes the policy hook before its caller sees it, as through the router
                await self.gate.check_output(record.caller(), {"jsonrpc": "2.0", "id": record.job_id, "result": result})
            except PolicyDenied as denied:  # withheld
                status, result, error = "failed", None, denied
        ended = await self.store.finish(record.job_id, status, result=result, error=error)
        span = tracing.current_span()
        span.set("pier.job.status", ended.status if ended is not None else "ended elsewhere")
        if error is not None:
            tracing.record_error(span, error)
        if ended is None:
            return  # ended by someone else (a cancel) first
        assert ended.finished_at is not None
        self.metrics.finished.labels(ended.server, ended.status).inc()
        self.metrics.duration.labels(ended.server).observe(ended.finished_at - ended.created_at)
        await self._after_finish(ended)

    async def _after_finish(self, record: JobRecord) -> None:
        url = record.webhook_url or self.settings.webhook_url
        if not url or record.webhook_state != "pending":
            return
        delivered = await self.webhooks.deliver(url, record)
        await self.store.update(record.job_id, lambda r: r.webhook_sent(delivered))


# -- the process -------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return json_response({"status": "ok" if worker.healthy else "failed"}, 200 if worker.healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    try:
        await asyncio.wait_for(worker.redis.ping(), 2)
        worker.metrics.redis_up.set(1)
    except (RedisError, TimeoutError, OSError):
        worker.metrics.redis_up.set(0)
    return web.Response(body=generate_latest(worker.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def queue(request: web.Request) -> web.Response:
    """The stream's backlog as JSON (KEDA's metrics-api scaler reads it: no Prometheus needed)."""
    stats = request.app[WORKER].queue
    return json_response({"queued": stats.queued, "oldest_queued_seconds": round(stats.oldest_queued_s, 3),
                          "following": stats.following, "length": stats.length})  # fmt: skip


WORKER = web.AppKey("worker", Worker)


async def run(settings: JobsSettings) -> None:
    """Run one worker (with /healthz and /metrics) until SIGTERM/SIGINT."""
    worker = Worker(settings)
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/queue", queue)

    async def lifespan(_: web.Application) -> Any:
        await worker.start()
        yield
        await worker.stop()

    app.cleanup_ctx.append(lifespan)
    await serve(
        app, settings.jobs_host, settings.jobs_port, on_ready=lambda url: log.info("worker health", extra={"url": url})
    )
