"""Webhook delivery, signed per Standard Webhooks; retried with backoff, then dead-lettered."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from standardwebhooks import Webhook

from pier.core import tracing
from pier.core.job import JobRecord
from pier.core.jsonrpc import dumps
from pier.core.redis_keys import DEAD_LETTERS
from pier.jobs.metrics import JobMetrics

log = logging.getLogger("pier.jobs.webhooks")

DEAD_LETTERS_KEEP = 1000


def signed_headers(secret: str | None, message_id: str, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers (no signature without a secret)."""
    now = dt.datetime.now(dt.UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
    }
    if secret:
        headers["webhook-signature"] = Webhook(secret).sign(message_id, now, body.decode())
    return headers


class WebhookSender:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        redis: aioredis.Redis,
        metrics: JobMetrics,
        secret: str | None,
        timeout_s: float,
        attempts: int,
        backoff_s: float,
    ) -> None:
        self.http = http
        self.redis = redis
        self.metrics = metrics
        self.secret = secret
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s

    async def deliver(self, url: str, record: JobRecord) -> bool:
        """POST the completion event until a 2xx; dead-letter it after the last attempt."""
        with tracing.span("webhook delivery", attributes={"pier.job.id": record.job_id}) as span:
            delivered = await self._deliver(url, record)
            if not delivered:
                span.fail("WEBHOOK_DEAD_LETTERED", "every attempt failed")
            return delivered

    async def _deliver(self, url: str, record: JobRecord) -> bool:
        body = dumps(record.completion_event())
        # One id for every attempt: receivers deduplicate on it.
        headers = signed_headers(self.secret, record.job_id, body)
        error = ""
        # The receiver's address only: its URL may be a credential (hooks.example/T0/B0/SECRET).
        attributes = tracing.http_client_attributes("POST", url) if tracing.enabled() else None
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            with tracing.span("POST", "client", attributes) as span:
                span.set("http.request.resend_count", attempt)
                error = await self._attempt(url, body, {**headers, **tracing.headers()}, span)
            if not error:
                self.metrics.webhooks.labels("delivered").inc()
                return True
            self.metrics.webhooks.labels("retried").inc()
            log.warning(
                "webhook delivery failed", extra={"job_id": record.job_id, "attempt": attempt + 1, "why": error}
            )
        self.metrics.webhooks.labels("dead_lettered").inc()
        entry = {"job_id": record.job_id, "url": url, "error": error, "at": time.time(), "attempts": self.attempts}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(DEAD_LETTERS, dumps(entry))
                pipe.ltrim(DEAD_LETTERS, 0, DEAD_LETTERS_KEEP - 1)
                await pipe.execute()
        except RedisError:
            log.error("could not record a dead letter", extra=entry)
        log.error("webhook dead-lettered", extra=entry)
        return False

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str], span: tracing.Span) -> str:
        """One POST: "" when the receiver took it, else why not."""
        try:
            async with self.http.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                span.set("http.response.status_code", response.status)
                if 200 <= response.status < 300:
                    return ""
                span.fail(str(response.status))
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            span.fail(type(exc).__name__)
            return f"{type(exc).__name__}: {exc}"
