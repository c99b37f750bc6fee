"""Profiles that give sessions users' upstream tokens (`upstream_oauth`, `token_exchange`): what the catalog
accepts, and what it refuses with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pier.core.catalog import Profile

pytestmark = pytest.mark.unit

OAUTH = {"issuer": "https://auth.example.com", "client_id": "pier", "env": "GITHUB_TOKEN"}


def profile(**fields: Any) -> Profile:
    return Profile.model_validate({"name": "github", "command": ["github-mcp"], **fields})


def test_a_connected_account_profile_carries_user_credentials_and_is_never_pooled():
    github = profile(upstream_oauth=OAUTH, warm_pool=2)
    assert github.carries_user_credentials
    assert not github.pooled
    assert github.connection_kind == "oauth"
    assert github.public()["connection"] == "oauth"
    exchange = profile(token_exchange={"audience": "https://api.example.com", "file": "/run/pier/token"})
    assert exchange.carries_user_credentials
    assert exchange.connection_kind == "token_exchange"
    given = {"authorization_endpoint": "https://a.example/authorize", "token_endpoint": "https://a.example/token"}
    endpoints = profile(upstream_oauth={**given, "client_id": "x", "env": "T"})
    assert endpoints.upstream_oauth is not None
    assert not profile().carries_user_credentials


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"upstream_oauth": {**OAUTH, "issuer": None}}, "name the provider"),
        ({"upstream_oauth": {**OAUTH, "env": None}}, "say where the token goes"),
        ({"upstream_oauth": {**OAUTH, "file": "run/token"}}, "clean absolute path"),
        ({"upstream_oauth": {**OAUTH, "file": "/run/../etc/token"}}, "clean absolute path"),
        ({"upstream_oauth": {**OAUTH, "file": "/token"}}, "below a directory"),
        ({"upstream_oauth": {**OAUTH, "env": "PIER_TOKEN"}}, "usable environment variable"),
        ({"upstream_oauth": {**OAUTH, "client_secret_env": "PIER_APP_KEYS"}}, "usable environment variable"),
        ({"upstream_oauth": {**OAUTH, "issuer": "ftp://auth.example.com"}}, "http(s) URL"),
        ({"upstream_oauth": {**OAUTH, "authorization_params": {"state": "x"}}}, "Pier sets them"),
        ({"upstream_oauth": {**OAUTH, "client_secret": "in the catalog"}}, "Extra inputs are not permitted"),
        ({"upstream_oauth": OAUTH, "token_exchange": {"audience": "a", "env": "T"}}, "not both"),
        ({"upstream_oauth": OAUTH, "user_secrets": {"GITHUB_TOKEN": {}}}, "both a user secret"),
    ],
)
def test_what_the_catalog_refuses(fields: dict[str, Any], why: str):
    with pytest.raises(ValidationError, match=why.replace("(", r"\(").replace(")", r"\)")):
        profile(**fields)


def test_allowed_groups():
    admins = profile(allowed_groups=["admins", "sre"])
    assert admins.usable_by(("sre",))
    assert not admins.usable_by(("staff",))
    assert not admins.usable_by(())
    assert admins.usable_by(None)  # an app key, an open router
    assert profile().usable_by(())
