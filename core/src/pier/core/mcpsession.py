"""The MCPSession resource: pydantic models, the one source of truth for the CRD's schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUP = "pier.dev"
VERSION = "v1alpha1"
PLURAL = "mcpsessions"
KIND = "MCPSession"
SESSION_LABEL = "pier.dev/session"
USER_LABEL = "pier.dev/user"
PROFILE_LABEL = "pier.dev/profile"

Phase = Literal["Pending", "Starting", "Ready", "Failed", "Terminating"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ServerSpec(Strict):
    """Which MCP server runs: a profile of the platform's catalog, or an inline command."""

    # The schema says what the validator below enforces, so the API server refuses it too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["profile"]}, {"required": ["command"]}]})

    profile: str | None = Field(
        default=None, description="name of a profile in the platform's catalog",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
    )  # fmt: skip
    command: list[str] | None = Field(default=None, description="stdio server command and arguments", min_length=1)
    env: list[dict[str, Any]] | None = Field(
        default=None,
        description="EnvVar list (valueFrom secretKeyRef allowed)",
        json_schema_extra={"kubernetes": "env"},
    )
    env_from: list[dict[str, Any]] | None = Field(
        default=None, alias="envFrom", description="EnvFromSource list", json_schema_extra={"kubernetes": "envFrom"}
    )
    image: str | None = Field(default=None, description="run the server in its own container (FIFO-attached)")
    resources: dict[str, Any] | None = Field(
        default=None, description="ResourceRequirements of the server", json_schema_extra={"kubernetes": "resources"}
    )

    @model_validator(mode="after")
    def _one_source(self) -> ServerSpec:
        if (self.profile is None) == (self.command is None):
            raise ValueError("server needs exactly one of profile or command")
        return self


class MCPSessionSpec(Strict):
    user_id: str = Field(
        alias="userId", description="tenant key", min_length=1, max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$",
    )  # fmt: skip
    server: ServerSpec
    ttl_seconds: int = Field(default=3600, alias="ttlSeconds", ge=0, description="idle TTL; 0 = never reaped")
    call_timeout_seconds: int = Field(
        default=25, alias="callTimeoutSeconds", ge=1, le=3600, description="router's hand-off threshold"
    )
    max_concurrent_calls: int = Field(default=16, alias="maxConcurrentCalls", ge=1, le=1024)


class ServerInfo(Strict):
    name: str | None = None
    version: str | None = None
    protocol_version: str | None = Field(default=None, alias="protocolVersion")


class Condition(Strict):
    type: Literal["Ready", "ServerRunning"]
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = Field(default=None, alias="lastTransitionTime")


class MCPSessionStatus(Strict):
    phase: Phase | None = None
    endpoint: str | None = None
    pod_name: str | None = Field(default=None, alias="podName")
    server_info: ServerInfo | None = Field(default=None, alias="serverInfo")
    tools: int | None = None
    last_activity_time: str | None = Field(default=None, alias="lastActivityTime")
    restarts: int | None = None
    replacements: int | None = Field(default=None, description="pods replaced after failing or vanishing")
    last_replace_time: str | None = Field(default=None, alias="lastReplaceTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: list[Condition] | None = None
