"""Prometheus metrics of a job-pool worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pier.core import tracing


class JobMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter(
            "pier_jobs_finished_total", "jobs finished, by profile and status", ["profile", "status"], registry=r
        )
        self.running = Gauge("pier_jobs_running", "jobs this worker is following", registry=r)
        self.duration = Histogram(
            "pier_job_duration_seconds", "from hand-off to the end of the job", ["profile"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r,
        )  # fmt: skip
        self.reclaimed = Counter("pier_jobs_reclaimed_total", "entries reclaimed from silent workers", registry=r)
        self.reruns = Counter(
            "pier_jobs_reruns_total", "retry-safe jobs re-run after their session lost them", ["profile"], registry=r
        )
        self.webhooks = Counter(
            "pier_webhook_deliveries_total", "webhook attempts, by outcome", ["outcome"], registry=r
        )
        # The backlog autoscalers scale workers on (the same value from every worker: it is the stream's).
        self.queue_lag = Gauge(
            "pier_jobs_queue_lag", "jobs handed off that no worker has taken yet (the consumer group's lag)", registry=r
        )
        self.oldest_queued = Gauge(
            "pier_jobs_oldest_queued_age_seconds", "age of the oldest job no worker has taken yet (0: none)", registry=r
        )
        self.stream_length = Gauge("pier_jobs_stream_length", "jobs queued or being followed", registry=r)
        self.redis_errors = Counter("pier_jobs_redis_errors_total", "Redis operations that failed", registry=r)
        self.redis_up = Gauge(
            "pier_jobs_redis_up", "1 when Redis answered this worker's last look (at a scrape)", registry=r
        )
        r.register(tracing.span_metrics())
