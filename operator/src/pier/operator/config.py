"""Operator settings (`PIER_*` environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIER_", extra="ignore")

    namespace: str = Field(default="default", description="the namespace whose MCPSessions are served")
    profiles: Path | None = Field(default=None, description="the profile catalog (the chart mounts it)")
    profiles_inline: str | None = None
    bridge_image: str = Field(default="ghcr.io/pier-dev/pier:0.1.0", description="image of the bridge container")
    bridge_command: list[str] = Field(default_factory=lambda: ["pier"], description="how that image runs pier")
    bridge_token_secret: str | None = Field(
        default=None, description="Secret (key `token`) whose value bridges require from router and job pool"
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets session pods pull images with")
    session_node_selector: dict[str, str] = Field(default_factory=dict, description="where session pods may run")
    session_tolerations: list[dict[str, Any]] = Field(default_factory=list, description="their tolerations")
    session_runtime_class: str | None = Field(
        default=None, description="RuntimeClass of session pods (a sandbox such as gVisor for untrusted servers)"
    )
    metrics_port: int = Field(default=8082, ge=0, le=65535, description="the operator's /metrics (warm pools); 0: none")
    sync_interval_s: float = Field(default=5.0, gt=0, description="status refresh and TTL check period")
    replace_backoff_s: float = Field(default=2.0, gt=0, description="first delay before replacing a failed pod")
    replace_backoff_max_s: float = Field(default=300.0, gt=0)
    log_level: str = "INFO"
