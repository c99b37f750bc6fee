"""Operator settings (`PIER_*` environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIER_", extra="ignore")

    namespace: str = Field(default="default", description="the namespace whose MCPSessions are served")
    kubeconfig: Path | None = Field(default=None, description="outside a cluster: the kubeconfig to use")
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
    session_priority_class: str | None = Field(default=None, description="PriorityClass of session pods")
    session_readiness_period_s: int = Field(
        default=2, ge=1, le=300, description="how often the kubelet asks a session's bridge whether it is ready"
    )
    session_liveness_period_s: int = Field(default=10, ge=1, le=300, description="and whether it is alive")
    node_loss_toleration_s: int = Field(
        default=30,
        ge=0,
        description="how long session pods stay bound to a NotReady or unreachable node before the node's taints "
        "evict them (Kubernetes' default is 300 s); the operator usually replaces them earlier (node_lost_after_s)",
    )
    node_lost_after_s: float = Field(
        default=10.0, ge=0, description="a node NotReady (or gone) this long loses its session pods: replaced at once"
    )
    metrics_port: int = Field(default=8082, ge=0, le=65535, description="the operator's /metrics; 0: none")
    sync_interval_s: float = Field(default=5.0, gt=0, description="period of the pass over every cached session")
    replace_backoff_s: float = Field(default=2.0, gt=0, description="first delay before replacing a failed pod")
    replace_backoff_max_s: float = Field(default=300.0, gt=0)
    workers: int = Field(default=16, ge=1, le=256, description="sessions reconciled at once (each makes API calls)")
    api_qps: float = Field(default=100.0, ge=0, description="API requests a second at most, on average (0: no limit)")
    api_burst: int = Field(default=200, ge=1, description="API requests at once above that average")
    bridge_poll_concurrency: int = Field(default=32, ge=1, le=1024, description="bridges asked for status at once")
    bridge_refresh_s: float = Field(
        default=60.0, gt=0, description="how often a Ready session's bridge is asked for its status at most"
    )
    status_activity_resolution_s: float = Field(
        default=300.0,
        ge=0,
        description="status.lastActivityTime is rewritten when activity moved on by this much (an API write)",
    )
    lease_name: str = Field(default="pier-operator", description="the Lease replicas elect their leader with")
    lease_duration_s: float = Field(default=15.0, gt=0, description="a silent leader is replaced after this")
    identity: str = Field(default="", description="this replica's name in the Lease (default: host name and pid)")
    log_level: str = "INFO"
