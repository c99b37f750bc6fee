"""The profile catalog: which MCP servers exist, written by the platform team, never by callers."""

from __future__ import annotations

import hashlib
import posixpath
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _env_name(name: str) -> str:
    if not SECRET_NAME.fullmatch(name) or name.upper().startswith("PIER_"):
        raise ValueError(f"{name!r} is not a usable environment variable name (nor may it start with PIER_)")
    return name


class TokenDelivery(BaseModel):
    """Where a user's upstream access token reaches their server: an environment variable, a file, or both.

    The file is rewritten in place when the token is refreshed (the server reads it when it needs it);
    a server that only takes the variable is restarted, once idle, to take a new token.
    """

    model_config = ConfigDict(extra="forbid")

    env: str | None = Field(default=None, description="the server's environment variable that receives the token")
    file: str | None = Field(
        default=None, description="an absolute path where the server reads the token (rewritten in place on refresh)"
    )

    @field_validator("env")
    @classmethod
    def _env(cls, env: str | None) -> str | None:
        return None if env is None else _env_name(env)

    @field_validator("file")
    @classmethod
    def _file(cls, file: str | None) -> str | None:
        if file is None:
            return None
        clean = posixpath.normpath(file)
        if not file.startswith("/") or clean != file or clean.count("/") < 2 or "\0" in file:
            raise ValueError(
                f"{file!r}: the token file is a clean absolute path below a directory, e.g. /run/pier/token"
            )
        return file

    @model_validator(mode="after")
    def _somewhere(self) -> TokenDelivery:
        if self.env is None and self.file is None:
            raise ValueError("say where the token goes: `env` (a variable of the server), `file` (a path), or both")
        return self


class UpstreamOAuth(TokenDelivery):
    """Each user connects their own account at a third-party OAuth provider (authorization code + PKCE).

    The provider is an issuer found by discovery (RFC 8414 / OpenID), or its endpoints given here. The
    client secret is never in the catalog: `client_secret_env` names the router's environment variable
    holding it (the Helm chart fills it from a Secret); a public client has none.
    """

    issuer: str | None = Field(default=None, description="the provider's issuer URL (its metadata is discovered)")
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    revocation_endpoint: str | None = Field(default=None, description="RFC 7009; discovered with the issuer")
    client_id: str = Field(min_length=1)
    client_secret_env: str | None = Field(
        default=None, description="the router's environment variable that holds the client secret"
    )
    scopes: list[str] = Field(default_factory=list)
    resource: str | None = Field(default=None, description="RFC 8707 resource indicator of the upstream API")
    authorization_params: dict[str, str] = Field(
        default_factory=dict,
        description="more parameters of the authorization request (e.g. prompt: consent, access_type: offline)",
    )

    @field_validator("client_secret_env")
    @classmethod
    def _secret_env(cls, name: str | None) -> str | None:
        return None if name is None else _env_name(name)

    @model_validator(mode="after")
    def _provider(self) -> UpstreamOAuth:
        endpoints = self.authorization_endpoint is not None and self.token_endpoint is not None
        if self.issuer is None and not endpoints:
            raise ValueError(
                "name the provider: `issuer` (discovery), or `authorization_endpoint` and `token_endpoint`"
            )
        for name in ("issuer", "authorization_endpoint", "token_endpoint", "revocation_endpoint", "resource"):
            url = getattr(self, name)
            if url is not None and not re.match(r"^https?://[^\s/?#]+", url):
                raise ValueError(f"{name} must be an http(s) URL, not {url!r}")
        reserved = {"response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method"}
        clash = sorted(reserved & set(self.authorization_params))
        if clash:
            raise ValueError(f"authorization_params may not set {', '.join(clash)}: Pier sets them")
        return self


class TokenExchange(TokenDelivery):
    """RFC 8693: the caller's own token from the company's identity provider is exchanged there for one
    aimed at the upstream (for upstreams that trust that provider), cached until it expires."""

    audience: str = Field(min_length=1, description="the upstream the exchanged token is for")
    scope: str | None = Field(default=None, description="the scope asked for (space-separated)")


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
    upstream_oauth: UpstreamOAuth | None = Field(
        default=None,
        description="each user connects their own account at an OAuth provider (README: Connected accounts)",
    )
    token_exchange: TokenExchange | None = Field(
        default=None,
        description="the caller's identity-provider token exchanged for one aimed at the upstream (RFC 8693)",
    )
    allowed_groups: list[str] = Field(
        default_factory=list,
        description="identity-provider groups whose members may use it (app keys always may); empty: everyone",
    )
    version: str | None = Field(default=None, description="the server's version (the registry API shows it)")
    registry_name: str | None = Field(
        default=None, description="its name in the MCP registry (reverse DNS), when it was imported from there"
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
        return self.warm_pool > 0 and not self.carries_user_credentials

    @property
    def carries_user_credentials(self) -> bool:
        """Whether its sessions hold something of one user's own (their secrets, their upstream token)
        that others must not read."""
        return bool(self.user_secrets) or self.token_delivery is not None

    @property
    def token_delivery(self) -> TokenDelivery | None:
        """Where a user's upstream token goes, when the profile gives its sessions one."""
        return self.upstream_oauth or self.token_exchange

    def usable_by(self, groups: tuple[str, ...] | None) -> bool:
        """May a caller in `groups` use it? None: a caller whose groups do not matter (an app key, an open router)."""
        return groups is None or not self.allowed_groups or bool(set(self.allowed_groups) & set(groups))

    @field_validator("user_secrets")
    @classmethod
    def _secret_names(cls, secrets: dict[str, UserSecret]) -> dict[str, UserSecret]:
        for name in secrets:
            _env_name(name)
        return secrets

    @model_validator(mode="after")
    def _one_token(self) -> Profile:
        if self.upstream_oauth is not None and self.token_exchange is not None:
            raise ValueError("a profile's upstream token comes from `upstream_oauth` or `token_exchange`, not both")
        delivery = self.token_delivery
        if delivery is not None and delivery.env is not None and delivery.env in self.user_secrets:
            raise ValueError(f"{delivery.env} is both a user secret and where the upstream token goes")
        return self

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
            "connection": self.connection_kind,
        }

    @property
    def connection_kind(self) -> str | None:
        """How a user's upstream token is had: `oauth` (they connect their account), `token_exchange`, or None."""
        if self.upstream_oauth is not None:
            return "oauth"
        return "token_exchange" if self.token_exchange is not None else None


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
