"""Job pool settings (`PIER_*`; shares PIER_REDIS_URL, PIER_RESULT_TTL_S and the webhook settings)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class JobsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIER_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    jobs_host: str = "127.0.0.1"
    jobs_port: int = Field(default=8001, ge=0, le=65535, description="the worker's /healthz and /metrics")
    max_jobs: int = Field(default=500, ge=1, description="jobs one worker follows at once")
    visibility_timeout_s: float = Field(default=30.0, gt=0, description="a silent worker's jobs are reclaimed after")
    poll_wait_s: float = Field(default=20.0, gt=0, description="long-poll of a bridge call")
    result_ttl_s: int = Field(default=3600, ge=60)
    max_reruns: int = Field(default=2, ge=0, description="re-runs of a retry-safe job whose session lost it")
    relocate_timeout_s: float = Field(
        default=300.0, gt=0, description="how long such a re-run waits for its session to run again elsewhere"
    )
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = Field(default=None, description="Standard Webhooks secret (whsec_…)")
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_attempts: int = Field(default=5, ge=1)
    webhook_backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each time")
    policy_token: SecretStr | None = Field(default=None, description="bearer token sent to the policy hook")
    policy_fail_open: bool = Field(default=False, description="allow when the policy hook is unreachable")
    policy_timeout_s: float = Field(default=5.0, gt=0)
    internal_tls_ca: Path | None = Field(default=None, description="CA of job pool ↔ bridge mTLS")
    internal_tls_cert: Path | None = Field(default=None, description="client certificate for bridge mTLS")
    internal_tls_key: Path | None = None
    log_level: str = "INFO"
