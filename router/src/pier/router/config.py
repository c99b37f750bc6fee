"""Router settings: `PIER_*` environment variables (see the README's configuration table)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pier.router.auth.oidc import IssuerConfig

MiB = 1024 * 1024


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    processes: int = Field(
        default=1, ge=1, le=64, description="router processes sharing the port; each user's local sessions in one"
    )
    backend: Literal["local", "kubernetes"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    profiles: Path | None = Field(default=None, description="YAML profile catalog")
    profiles_inline: str | None = Field(default=None, description="catalog YAML given in the environment")
    default_profile: str = Field(default="demo", description="profile of bridgekit-style calls naming none")
    allow_inline_commands: bool = Field(default=False, description="let bridgekit callers choose a command")

    call_timeout_s: float = Field(default=25.0, gt=0, description="hand-off threshold (profile may override)")
    max_call_timeout_s: float = Field(default=120.0, gt=0, description="cap on a request's own timeout_s")
    result_ttl_s: int = Field(default=3600, ge=60, description="how long job results are kept")
    handoff_grace_s: float = Field(
        default=10.0, gt=0, description="how long a hand-off waits for an unreachable Redis before cancelling the call"
    )
    webhook_url: str | None = Field(default=None, description="where finished jobs are POSTed (profile may override)")

    policy_url: str | None = Field(default=None, description="policy hook (minibridge Policer format)")
    policy_token: SecretStr | None = Field(default=None, description="bearer token sent to the policy hook")
    policy_fail_open: bool = Field(default=False, description="allow when the policy hook is unreachable")
    policy_timeout_s: float = Field(default=5.0, gt=0)
    audit_log: bool = Field(default=True, description="one `pier.core.audit` record per tool call")

    public_url: str | None = Field(
        default=None, description="the router's URL as callers reach it (token audience, OAuth metadata)"
    )
    oidc_issuer: str | None = Field(default=None, description="a trusted OpenID issuer: its JWTs are accepted")
    oidc_audience: str | None = Field(default=None, description="the `aud` its tokens must name (default: public URL)")
    oidc_user_claim: str = Field(default="sub", description="the claim naming the Pier user")
    oidc_scopes: list[str] = Field(default_factory=list, description="scopes every token must carry")
    oidc_issuers: list[IssuerConfig] = Field(
        default_factory=list, description="more trusted issuers: objects with issuer, audience, user_claim, scopes"
    )
    secrets_key: SecretStr | None = Field(
        default=None,
        description="base64 of 32 random bytes: encrypts users' secrets and connected accounts' tokens in Redis",
    )
    oidc_client_id: str | None = Field(
        default=None, description="the router's client id at PIER_OIDC_ISSUER: the portal's sign-in, token exchange"
    )
    oidc_client_secret: SecretStr | None = Field(default=None, description="its client secret (none: a public client)")
    portal_session_ttl_s: int = Field(default=28800, ge=60, description="how long a portal sign-in lasts")
    oauth_flow_ttl_s: int = Field(
        default=600, ge=30, le=3600, description="how long an authorization in progress (its `state`) stays usable"
    )
    oauth_timeout_s: float = Field(default=10.0, gt=0, description="timeout of each request to an authorization server")
    oauth_refresh_margin_s: float = Field(
        default=300.0, ge=0, description="refresh a token this long before it expires (at most half its lifetime)"
    )
    registry_namespace: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z0-9.-]+$",
        description="reverse-DNS namespace of the catalog's names in the registry API (default: from the public URL)",
    )
    keys_file: Path | None = Field(default=None, description="YAML/JSON file: app_keys, user_keys")
    app_keys: list[SecretStr] = Field(default_factory=list, description="keys that may act for any user")
    user_keys: dict[str, str] = Field(default_factory=dict, description="user key → the one user_id it serves")
    rate_limit_app_per_min: int = Field(default=0, ge=0, description="per user, via app keys; 0 = off")
    rate_limit_user_per_min: int = Field(default=60, ge=0, description="per user, via user keys; 0 = off")
    rate_limit_open_per_min: int = Field(default=0, ge=0, description="per user when no keys are set")

    mcp_session_ttl_s: float = Field(
        default=86400, ge=1, description="an idle MCP client session id lives this long (outliving its server session)"
    )
    max_sessions: int = Field(default=100, ge=1, description="local backend: pool limit")
    session_ttl_s: float = Field(default=3600, ge=0, description="idle TTL when the profile sets none; 0 = never")
    session_start_timeout_s: float = Field(default=60, gt=0, description="a new session must be ready within")
    max_concurrent_starts: int = Field(
        default=8, ge=1, description="local backend: sessions starting at once; more wait their turn"
    )
    reap_interval_s: float = Field(default=5.0, gt=0, description="how often idle sessions are looked for")
    sidecar_log_level: str = Field(default="WARNING", description="log level of the bridges the router starts")
    local_bridges: Literal["inprocess", "process"] = Field(
        default="inprocess", description="local backend: bridges in the router's process, or one process each"
    )
    local_isolation: Literal["auto", "sandbox", "uid", "none"] = Field(
        default="auto", description="local backend: how sessions are kept apart; auto = the strongest available"
    )
    local_single_user: bool = Field(
        default=False, description="declares a one-person machine: unisolated sessions may then hold users' secrets"
    )
    local_uids: str = Field(
        default="1200000-1265535", pattern=r"^\d+-\d+$", description="as root: the uids (and gids) sessions run under"
    )
    local_sessions_dir: Path | None = Field(
        default=None, description="sessions' homes (default /var/lib/pier/sessions as root, else ~/.local/state/…)"
    )
    local_sandbox_paths: list[str] = Field(
        default_factory=list, description="read-only paths sandboxed servers see besides the system's and Pier's"
    )

    max_retries: int = Field(default=2, ge=0, description="retries of retry-safe calls on transport failure")
    retry_backoff_s: float = Field(default=0.25, ge=0, description="first retry delay; doubles each time")
    max_body_bytes: int = Field(default=16 * MiB, ge=1024, description="larger request bodies get 413")
    header_timeout_s: float = Field(
        default=30.0, gt=0, description="a connection's request headers must arrive within; also the keep-alive limit"
    )
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request's body must arrive within (else 408)")
    tls_cert: Path | None = Field(default=None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(default=None, description="its private key")
    tls_client_ca: Path | None = Field(default=None, description="mTLS: require client certificates from this CA")
    cert_user_auth: bool = Field(default=False, description="mTLS: a client certificate's CN acts as a user key")
    tls_reload_s: float = Field(default=10.0, gt=0, description="how often certificate files are checked")
    internal_tls_ca: Path | None = Field(default=None, description="CA of router/job pool ↔ bridge mTLS")
    internal_tls_cert: Path | None = Field(default=None, description="certificate for bridge mTLS (both ends)")
    internal_tls_key: Path | None = None
    ws_max_in_flight: int = Field(default=64, ge=1, description="requests in flight on one WebSocket; more are refused")
    ws_max_in_flight_per_user: int = Field(
        default=256, ge=1, description="requests in flight over all of one user's WebSockets; more are refused"
    )
    allowed_origins: list[str] = Field(default_factory=list, description="browser origins allowed on /mcp")
    log_level: str = "INFO"

    # Kubernetes backend
    namespace: str = Field(default="default", description="namespace of the MCPSessions (kubernetes backend)")
    kubeconfig: Path | None = Field(default=None, description="outside a cluster: the kubeconfig to use")
    kube_ready_timeout_s: float = Field(default=120, gt=0, description="a new MCPSession must be Ready within")
    bridge_token: SecretStr | None = Field(default=None, description="token the bridges require (kubernetes)")

    def local_uid_range(self) -> tuple[int, int]:
        """The first and last uid of `local_uids`."""
        first, last = (int(part) for part in self.local_uids.split("-"))
        return first, last

    @model_validator(mode="after")
    def _uids_are_users(self) -> RouterSettings:
        first, last = self.local_uid_range()
        if not 1000 <= first <= last < 2**32 - 1:
            raise ValueError("PIER_LOCAL_UIDS must be FIRST-LAST with 1000 <= FIRST <= LAST < 4294967295")
        return self

    def issuers(self) -> list[IssuerConfig]:
        """Every trusted issuer: `PIER_OIDC_ISSUER` (with its siblings' settings) and `PIER_OIDC_ISSUERS`."""
        issuers = list(self.oidc_issuers)
        if self.oidc_issuer:
            issuers.insert(
                0,
                IssuerConfig(
                    issuer=self.oidc_issuer, audience=self.oidc_audience, user_claim=self.oidc_user_claim,
                    scopes=self.oidc_scopes,
                ),
            )  # fmt: skip
        return issuers
