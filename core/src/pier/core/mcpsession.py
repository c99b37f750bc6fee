"""The MCPSession resource: its schema (the CRD is generated from these models), its names and
labels, the body the router creates, and the status the operator writes and the router reads.

One source of truth for both ends: the router builds sessions with `new_session` and reads them with
`MCPSessionStatus`; the operator reads `MCPSessionSpec` and writes `MCPSessionStatus` (as a merge
patch of what changed, `status_patch`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pier.core import defaults
from pier.core.catalog import Profile
from pier.core.names import PROFILE_NAME, USER_ID, anchored
from pier.core.tracing import TraceContext

GROUP = "pier.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "mcpsessions"
KIND = "MCPSession"
SESSION_LABEL = "pier.dev/session"
USER_LABEL = "pier.dev/user"
PROFILE_LABEL = "pier.dev/profile"
POOL_LABEL = "pier.dev/pool"  # a warm pod of that profile, bound to no session yet
TRACE_ANNOTATION = "pier.dev/traceparent"  # the trace of the request that created it (W3C traceparent)

Phase = Literal["Pending", "Starting", "Ready", "Failed", "Terminating"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ServerSpec(Strict):
    """Which MCP server runs: a profile of the platform's catalog, or an inline command."""

    # The schema says what the validator below enforces, so the API server refuses it too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["profile"]}, {"required": ["command"]}]})

    profile: str | None = Field(
        default=None, description="name of a profile in the platform's catalog", pattern=anchored(PROFILE_NAME)
    )
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
        alias="userId", description="tenant key", min_length=1, max_length=128, pattern=anchored(USER_ID)
    )
    server: ServerSpec
    ttl_seconds: int = Field(
        default=defaults.SESSION_TTL_S, alias="ttlSeconds", ge=0, description="idle TTL; 0 = never reaped"
    )
    call_timeout_seconds: int | None = Field(
        default=None, alias="callTimeoutSeconds", ge=1, le=3600,
        description="the router's hand-off threshold for calls to this session (default: the profile's)",
    )  # fmt: skip
    max_concurrent_calls: int = Field(default=defaults.MAX_CONCURRENT_CALLS, alias="maxConcurrentCalls", ge=1, le=1024)


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

    @property
    def serving(self) -> bool:
        return self.phase == "Ready" and bool(self.endpoint)

    def ready_since(self) -> float:
        """When the session last became Ready (a POSIX time; 0.0 when it is not Ready).

        Its idle time counts from here at the earliest: a session nobody could reach yet is not idle,
        and a warm pod claimed now is not idle for all the time it waited in the pool.
        """
        for condition in self.conditions or []:
            if condition.type == "Ready" and condition.status == "True" and condition.last_transition_time:
                return parse_stamp(condition.last_transition_time).timestamp()
        return 0.0

    def not_ready_reason(self) -> str:
        """Why the session is not Ready, as its Ready condition says."""
        for condition in self.conditions or []:
            if condition.type == "Ready" and condition.status != "True":
                return f"{condition.reason}: {condition.message}"
        return f"phase {self.phase or 'Pending'}"

    def as_object(self) -> dict[str, Any]:
        """The status as the API server stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def stamp(when: dt.datetime) -> str:
    """A time as the status carries it (RFC 3339, UTC, whole seconds)."""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str) -> dt.datetime:
    """A time the status carries, timezone-aware."""
    return dt.datetime.fromisoformat(text)


def status_patch(old: MCPSessionStatus, new: MCPSessionStatus) -> dict[str, Any]:
    """A merge patch from `old` to `new`: the fields that changed, None for the ones removed."""
    before, after = old.as_object(), new.as_object()
    patch: dict[str, Any] = {key: value for key, value in after.items() if before.get(key) != value}
    patch.update({key: None for key in before.keys() - after.keys()})
    return patch


# -- names and labels ---------------------------------------------------------------------------


def session_name(user: str, profile: str) -> str:
    """A valid, deterministic object name: readable where it can be, unique always (a digest)."""
    digest = hashlib.sha256(f"{user}\0{profile}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{profile}-{user}".lower()).strip("-")[:40].strip("-")
    return f"{readable}-{digest}" if readable else f"s-{digest}"


CONNECTION_TOKEN_KEY = "token"  # the key of a connection Secret that sessions receive (nothing else of it)


def connection_secret_name(user: str, profile: str) -> str:
    """The Secret of a user's upstream token for a profile (connected account or token exchange): the router
    writes it, the session's pod takes its `token` key. Deterministic, valid, and no user id in clear."""
    return f"pier-conn-{profile}-" + hashlib.sha256(f"{user}\0{profile}".encode()).hexdigest()[:16]


def label_value(text: str) -> str:
    """A valid label value (≤ 63 characters of [A-Za-z0-9._-]) that still tells who it is."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._-")
    if len(cleaned) <= 63 and cleaned == text:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    prefix = cleaned[:50].strip("._-")
    return f"{prefix}-{digest}" if prefix else digest


def new_session(
    user: str, profile: Profile, ttl_s: float, secrets: str | None = None, trace: TraceContext | None = None
) -> dict[str, Any]:
    """The MCPSession the router creates for `user`'s first use of `profile`.

    `secrets`: the Secret holding the user's own secrets for it, referenced (never copied): its keys
    become the server's environment. `trace`: the request that creates it, whose trace the operator's
    reconciles join (`TRACE_ANNOTATION`).
    """
    env_from = [{"secretRef": {"name": secrets}}] if secrets else None
    spec = MCPSessionSpec(
        user_id=user,
        server=ServerSpec(profile=profile.name, env_from=env_from),
        ttl_seconds=int(ttl_s),
        max_concurrent_calls=profile.max_concurrent_calls,
    )
    metadata: dict[str, Any] = {
        "name": session_name(user, profile.name),
        "labels": {
            USER_LABEL: label_value(user),
            PROFILE_LABEL: profile.name,
            "app.kubernetes.io/managed-by": "pier-router",
        },
    }
    if trace is not None:
        metadata["annotations"] = {TRACE_ANNOTATION: trace.traceparent}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": spec.model_dump(by_alias=True, exclude_none=True),
    }
