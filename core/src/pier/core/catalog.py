"""The profile catalog: which MCP servers exist, written by the platform team, never by callers."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pier.core import defaults
from pier.core.errors import PierError
from pier.core.names import PROFILE_NAME, anchored
from pier.core.policy import ToolRules

SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class UserSecret(BaseModel):
    """A secret each user supplies for their own sessions of a profile (their own token, say)."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    required: bool = True


class Profile(BaseModel):
    """One server the platform offers: how to run it and how to treat its calls."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=anchored(PROFILE_NAME))
    description: str = ""
    command: list[str] = Field(min_length=1, description="stdio server command and arguments")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    image: str | None = Field(default=None, description="Kubernetes: run the server in its own container")
    call_timeout_s: float | None = Field(default=None, gt=0, description="hand-off threshold")
    max_concurrent_calls: int = Field(default=defaults.MAX_CONCURRENT_CALLS, ge=1)
    ttl_s: float | None = Field(default=None, ge=0, description="idle TTL; 0 = never reaped")
    warm_pool: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="sessions kept started and bound to no user: a new user's first use is instant",
    )
    user_secrets: dict[str, UserSecret] = Field(
        default_factory=dict,
        description="secrets each user supplies, given to that user's server as environment variables",
    )
    trust_annotations: bool = Field(
        default=False, description="treat the server's readOnlyHint/idempotentHint tools as retry-safe"
    )
    retry_safe_tools: list[str] = Field(default_factory=list, description="tools always safe to retry")
    task_support: dict[str, Literal["forbidden", "optional", "required"]] = Field(
        default_factory=dict,
        description=(
            "MCP tasks of Pier's own (the job pool) by tool, '*' for the others: optional and required run as a "
            "task at once for a caller that takes tasks (required: for no other caller, -32021), forbidden never; "
            "unset: a call becomes a task when it overruns its timeout. A server with tasks of its own decides itself"
        ),
    )
    webhook_url: str | None = None
    policy_url: str | None = Field(default=None, description="policy hook for this profile (overrides the global)")
    tools: ToolRules | None = Field(default=None, description="built-in allow/deny lists of tools")
    resources: dict[str, Any] | None = Field(default=None, description="Kubernetes resources of the server")
    egress: list[dict[str, Any]] | None = Field(
        default=None, description="Kubernetes: egress rules (NetworkPolicy) of its session pods; the Helm chart's"
    )

    @property
    def pooled(self) -> bool:
        """Whether sessions of this profile are kept warm (see `warm_pool`).

        Never when users supply secrets: a session started before its user asked cannot carry them.
        """
        return self.warm_pool > 0 and not self.user_secrets

    @property
    def carries_user_credentials(self) -> bool:
        """Whether its sessions hold something of one user's own (their secrets) that others must not read."""
        return bool(self.user_secrets)

    @field_validator("user_secrets")
    @classmethod
    def _secret_names(cls, secrets: dict[str, UserSecret]) -> dict[str, UserSecret]:
        for name in secrets:
            if not SECRET_NAME.fullmatch(name) or name.upper().startswith("PIER_"):
                raise ValueError(f"{name!r} is not a usable environment variable name (nor may it start with PIER_)")
        return secrets

    def idle_ttl_s(self, default: float) -> float:
        """How long an idle session of this profile lives (0: forever); `default` when it sets none."""
        return self.ttl_s if self.ttl_s is not None else default

    def retry_safe(self, tool: str, spec: dict[str, Any] | None) -> bool:
        """May a call of `tool` run again after a transport failure?"""
        if tool in self.retry_safe_tools:
            return True
        if not self.trust_annotations or spec is None:
            return False
        hints = spec.get("annotations") or {}
        return bool(hints.get("readOnlyHint") or hints.get("idempotentHint"))

    def task_mode(self, tool: str) -> str | None:
        """How `tool` runs as one of Pier's MCP tasks (`task_support`); None: a task only when it overruns."""
        return self.task_support.get(tool, self.task_support.get("*"))

    def public(self) -> dict[str, Any]:
        """What callers may see of a profile (never its command or environment)."""
        return {
            "name": self.name,
            "description": self.description,
            "call_timeout_s": self.call_timeout_s,
            "ttl_s": self.ttl_s,
            "max_concurrent_calls": self.max_concurrent_calls,
        }


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)


def demo_profile() -> Profile:
    """The demo server shipped with Pier (`examples/demo_server.py`)."""
    return Profile(
        name="demo",
        description="Pier's demo server: echo, slow, counter, count, fail, crash, env_hash",
        command=[sys.executable, "-m", "pier.examples.demo_server"],
        trust_annotations=True,
        task_support={"slow": "optional"},  # a caller that takes tasks gets one at once
    )


def inline_profile(command: str, args: list[str]) -> Profile:
    """A profile for a caller-chosen command (bridgekit's mcp_config); only when the operator allows it."""
    digest = hashlib.sha256("\0".join([command, *args]).encode()).hexdigest()[:12]
    return Profile(name=f"inline-{digest}", description="inline command", command=[command, *args])


class Catalog:
    """Profiles by name."""

    def __init__(self, profiles: list[Profile]) -> None:
        self.profiles = {p.name: p for p in profiles}

    @classmethod
    def parse(cls, text: str, source: str = "catalog") -> Catalog:
        try:
            data = CatalogFile.model_validate(yaml.safe_load(text) or {})
            return cls([Profile.model_validate({"name": name, **spec}) for name, spec in data.profiles.items()])
        except (yaml.YAMLError, ValidationError) as exc:
            raise ValueError(f"invalid profile catalog {source}: {exc}") from exc

    @classmethod
    def load(cls, path: Path | None, inline: str | None = None) -> Catalog:
        catalog = cls([])
        if path is not None:
            catalog.profiles.update(cls.parse(path.read_text(), str(path)).profiles)
        if inline:
            catalog.profiles.update(cls.parse(inline, "PIER_PROFILES_INLINE").profiles)
        return catalog

    def add(self, profile: Profile) -> None:
        self.profiles.setdefault(profile.name, profile)

    def get(self, name: str) -> Profile:
        profile = self.profiles.get(name)
        if profile is None:
            raise PierError("UNKNOWN_SERVER", f"no server profile {name!r}", {"servers": sorted(self.profiles)})
        return profile
