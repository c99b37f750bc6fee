"""Bridge settings: `PIER_SIDECAR_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class SidecarSettings(BaseSettings):
    """Everything one bridge needs to know; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="PIER_SIDECAR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    command: list[str] = Field(default_factory=list, description="stdio server command (child mode)")
    attach_dir: Path | None = Field(default=None, description="FIFO directory (attach mode)")
    cwd: Path | None = None

    max_concurrent_calls: int = Field(default=16, ge=1)
    max_queued_calls: int = Field(default=256, ge=0, description="calls waiting for a slot before refusing")
    max_message_bytes: int = Field(default=16 * MiB, ge=1024)

    start_timeout_s: float = Field(default=30.0, gt=0, description="server start + initialize deadline")
    restart_backoff_initial_s: float = Field(default=0.2, ge=0)
    restart_backoff_max_s: float = Field(default=30.0, ge=0)
    max_restarts: int = Field(default=10, ge=0, description="consecutive failed runs before giving up; 0 = never")
    stable_after_s: float = Field(default=30.0, ge=0, description="uptime after which a run counts as healthy")
    write_timeout_s: float = Field(default=30.0, gt=0, description="how long a server may stop reading")

    shutdown_grace_s: float = Field(default=20.0, ge=0, description="SIGTERM: time for in-flight calls")
    kill_timeout_s: float = Field(default=5.0, ge=0, description="server stop: EOF → SIGTERM → SIGKILL steps")

    allowed_origins: list[str] = Field(
        default_factory=list, description="Origins allowed besides localhost ones; '*' allows any"
    )
    token: SecretStr | None = Field(default=None, description="bearer token required on /mcp and /v1")
    tls_cert: Path | None = Field(default=None, description="serve HTTPS with this certificate")
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(default=None, description="require client certificates signed by this CA")

    call_retention_s: float = Field(default=600.0, gt=0, description="how long finished calls stay readable")
    max_retained_calls: int = Field(default=10_000, ge=1)
    client_idle_s: float = Field(default=3600.0, gt=0, description="MCP client sessions idle this long end")
    max_clients: int = Field(default=10_000, ge=1)
    stderr_tail_lines: int = Field(default=200, ge=1)
    log_level: str = "INFO"
