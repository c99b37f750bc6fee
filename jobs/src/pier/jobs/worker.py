"""`pier jobs`: consumer-group workers that see handed-off calls through to the end.

A worker never executes a tool itself: it follows the call that is already running in the
user's session (long-polling the bridge by call id), so a job whose worker dies is simply
followed again by another worker (XAUTOCLAIM) and the tool still runs exactly once. Only when
the session lost the call is it run again, and only if that is safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError, ResponseError

from pier.core import logs
from pier.core.bridge import BridgeClient, BridgeUnreachable, Endpoint
from pier.core.errors import PierError
from pier.core.job import JobRecord
from pier.core.jobstore import GROUP, STREAM, JobStore, connect
from pier.core.policy import Policer, PolicyContext, PolicyDenied, PolicyMetrics
from pier.core.tls import client_context
from pier.core.web import json_response, serve
from pier.jobs.config import JobsSettings
from pier.jobs.metrics import JobMetrics
from pier.jobs.webhooks import WebhookSender

log = logging.getLogger("pier.jobs.worker")

_PROGRESS_SAVE_S = 0.5  # progress is published at once but saved to the record at most this often
_UNREACHABLE_TRIES = 3  # a bridge that does not answer this many times running has lost the call


class Worker:
    def __init__(self, settings: JobsSettings) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self.metrics = JobMetrics()
        self.redis = connect(settings.redis_url)
        self.store = JobStore(self.redis, settings.result_ttl_s)
        self.http: aiohttp.ClientSession | None = None
        self.bridge: BridgeClient
        self.webhooks: WebhookSender
        self.policer: Policer
        self.following: dict[str, asyncio.Task[None]] = {}  # stream entry id → its task
        self._slots = asyncio.Semaphore(settings.max_jobs)
        self._loops: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        s = self.settings
        bridge_ssl = (
            client_context(s.internal_tls_ca, s.internal_tls_cert, s.internal_tls_key)
            if (s.internal_tls_cert is not None)
            else None
        )
        self.bridge = BridgeClient(self.http, bridge_ssl)
        secret = self.settings.webhook_secret.get_secret_value() if self.settings.webhook_secret else None
        if self.settings.webhook_url and not secret:
            log.warning("webhooks will be sent unsigned: set PIER_WEBHOOK_SECRET")
        policy_token = self.settings.policy_token.get_secret_value() if self.settings.policy_token else None
        self.policer = Policer(
            self.http,
            PolicyMetrics(self.metrics.registry),
            policy_token,
            self.settings.policy_fail_open,
            self.settings.policy_timeout_s,
        )
        self.webhooks = WebhookSender(
            self.http, self.redis, self.metrics, secret, self.settings.webhook_timeout_s,
            self.settings.webhook_attempts, self.settings.webhook_backoff_s,
        )  # fmt: skip
        self._loops = [
            asyncio.create_task(self._read_forever(), name="pier-jobs-read"),
            asyncio.create_task(self._reclaim_forever(), name="pier-jobs-reclaim"),
            asyncio.create_task(self._heartbeat_forever(), name="pier-jobs-heartbeat"),
        ]
        log.info("job worker started", extra={"worker": self.name})

    async def stop(self) -> None:
        """Stop reading; jobs being followed are left unacknowledged for another worker to reclaim."""
        for task in [*self._loops, *self.following.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self.following.values(), return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        await self.redis.aclose()

    @property
    def healthy(self) -> bool:
        return all(not task.done() for task in self._loops)

    # -- the stream ------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.1
        group_ready = False
        while True:
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                await self._slots.acquire()  # wait for room before taking more work
                self._slots.release()
                entries = await self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=50, block=5000)
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
        while True:
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
        while True:
            await asyncio.sleep(self.settings.visibility_timeout_s / 3)
            if not self.following:
                continue
            try:
                await self.redis.xclaim(STREAM, GROUP, self.name, 0, list(self.following), justid=True)
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, 0)

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
                await self._follow(job_id)
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

    async def _follow(self, job_id: str) -> None:
        record = await self.store.get(job_id)
        if record is None:
            log.warning("job record expired before it was followed")
            return
        if record.done:
            await self._after_finish(record)  # a reclaimed job whose webhook may not have gone out
            return
        record = await self.store.update(job_id, _mark_running) or record
        seen = record.progress_count
        last_save = 0.0
        unreachable = 0
        while True:
            endpoint = Endpoint(record.endpoint, record.endpoint_token)
            try:
                status, call = await self.bridge.get_call(
                    endpoint, record.call_id, self.settings.poll_wait_s, progress_after=seen
                )
                unreachable = 0
            except BridgeUnreachable as exc:
                unreachable += 1
                if unreachable < _UNREACHABLE_TRIES:
                    await asyncio.sleep(0.5 * unreachable)
                    continue
                record = await self._session_lost(record, f"the session is gone: {exc.message}")
                if record is None:
                    return
                continue
            if status == 404:
                record = await self._session_lost(record, "the session was replaced and no longer knows the call")
                if record is None:
                    return
                continue
            state = call.get("status")
            if state == "running":
                seen = await self._progress(record, call, seen)
                if time.monotonic() - last_save >= _PROGRESS_SAVE_S:
                    last_save = time.monotonic()
                    latest = call["progress"][-1] if call.get("progress") else record.progress
                    record = await self.store.update(job_id, _progress_change(latest, seen)) or record
                    if record.done:  # cancelled meanwhile
                        return
                continue
            if state == "completed":
                await self._finish(job_id, "completed", result=call.get("result"))
            elif state == "cancelled":
                await self._finish(job_id, "cancelled", error=PierError("CANCELLED", "the call was cancelled"))
            elif (call.get("error") or {}).get("code") == "SERVER_EXITED":
                error = call["error"]
                suspect = bool((error.get("details") or {}).get("suspect"))
                record = await self._session_lost(record, error["message"], suspect)
                if record is None:
                    return
                continue
            else:
                await self._finish(job_id, "failed", error=PierError.from_dict(call.get("error") or {}))
            return

    async def _progress(self, record: JobRecord, call: dict[str, Any], seen: int) -> int:
        """Publish progress the bridge reported since `seen`; returns the new count."""
        count = call.get("progress_count", seen)
        for item in call.get("progress", []):
            await self.store.publish(record.job_id, {"type": "progress", "job_id": record.job_id, **item})
        return count

    async def _session_lost(self, record: JobRecord, why: str, suspect: bool = False) -> JobRecord | None:
        """The call died with its server or session: run it again if safe, else fail the job.

        A `suspect` call (the newest in flight when its server exited) may have killed the server
        itself: it is not run again.
        """
        if record.retry_safe and not suspect and record.attempts <= self.settings.max_retries:
            call_id = f"{record.job_id}.{record.attempts}"
            endpoint = Endpoint(record.endpoint, record.endpoint_token)
            try:
                status, _ = await self.bridge.start_call(endpoint, record.tool, record.arguments, call_id, 0)
            except BridgeUnreachable:
                status = 0
            if status in (200, 202):
                self.metrics.reruns.labels(record.server).inc()
                log.warning("re-running a retry-safe job its session lost", extra={"why": why, "call_id": call_id})

                def rerun(r: JobRecord) -> bool:
                    if r.done:
                        return False
                    r.call_id, r.attempts = call_id, r.attempts + 1
                    return True

                updated = await self.store.update(record.job_id, rerun)
                return None if updated is None or updated.done else updated
        details = {"reason": why, "retry_safe": record.retry_safe, "attempts": record.attempts, "suspect": suspect}
        await self._finish(record.job_id, "failed", error=PierError("SESSION_LOST", why, details))
        return None

    async def _finish(
        self, job_id: str, status: str, result: dict[str, Any] | None = None, error: PierError | None = None
    ) -> None:
        if status == "completed":
            record = await self.store.get(job_id)
            if record is not None:
                try:
                    context = PolicyContext(
                        record.user, record.server, f"{record.user}/{record.server}", record.identity
                    )
                    response = {"jsonrpc": "2.0", "id": job_id, "result": result}
                    await self.policer.check(record.policy_url, "Output", [response], context)
                except PolicyDenied as denied:  # the result is withheld from the caller
                    status, result, error = "failed", None, denied
        record = await self.store.finish(job_id, status, result=result, error=error)
        if record is None:
            return  # ended by someone else (a cancel) first
        assert record.finished_at is not None
        self.metrics.finished.labels(record.server, record.status).inc()
        self.metrics.duration.labels(record.server).observe(record.finished_at - record.created_at)
        await self._after_finish(record)

    async def _after_finish(self, record: JobRecord) -> None:
        url = record.webhook_url or self.settings.webhook_url
        if not url or record.webhook_state != "pending":
            return
        delivered = await self.webhooks.deliver(url, record)
        state = "delivered" if delivered else "dead"

        def change(r: JobRecord) -> bool:
            r.webhook_state = state  # type: ignore[assignment]
            return True

        await self.store.update(record.job_id, change)


def _mark_running(record: JobRecord) -> bool:
    if record.status != "queued":
        return False
    record.status = "running"
    return True


def _progress_change(latest: dict[str, Any] | None, count: int) -> Any:
    def change(record: JobRecord) -> bool:
        if record.done:
            return False
        record.progress, record.progress_count = latest, count
        return True

    return change


# -- the process -------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return json_response({"status": "ok" if worker.healthy else "failed"}, 200 if worker.healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return web.Response(body=generate_latest(worker.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


WORKER = web.AppKey("worker", Worker)


async def run(settings: JobsSettings) -> None:
    """Run one worker (with /healthz and /metrics) until SIGTERM/SIGINT."""
    worker = Worker(settings)
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def lifespan(_: web.Application) -> Any:
        await worker.start()
        yield
        await worker.stop()

    app.cleanup_ctx.append(lifespan)
    await serve(
        app, settings.jobs_host, settings.jobs_port, on_ready=lambda url: log.info("worker health", extra={"url": url})
    )
