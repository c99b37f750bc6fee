"""The MCP registry's server.json (schema 2025-12-11) into catalog profiles, and profiles out as server.json:
what each registry type runs, where arguments and variables go, and what is refused and why."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pier.core.catalog import Catalog
from pier.core.registry import SCHEMA, Refused, documents, namespace_of, profile_name, to_profile, to_server_json

pytestmark = pytest.mark.unit


def server(*packages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"$schema": SCHEMA, "name": "io.github.acme/Weather-Server", "description": "Weather forecasts",
            "version": "1.4.0", "packages": list(packages), **fields}  # fmt: skip


NPM = {
    "registryType": "npm", "identifier": "@acme/weather-mcp", "version": "1.4.0", "transport": {"type": "stdio"},
    "runtimeHint": "npx",
    "runtimeArguments": [{"type": "named", "name": "--node-options", "value": "--max-old-space-size=256"}],
    "packageArguments": [
        {"type": "positional", "valueHint": "data_dir", "value": "/data/{region}",
         "variables": {"region": {"default": "eu", "description": "region"}}},
        {"type": "named", "name": "--units", "default": "metric"},
        {"type": "named", "name": "--verbose"},
    ],
    "environmentVariables": [
        {"name": "WEATHER_API_KEY", "description": "your API key", "isSecret": True, "isRequired": True},
        {"name": "WEATHER_ACCOUNT", "description": "your account id", "isRequired": True},
        {"name": "WEATHER_TRACE", "description": "tracing", "isSecret": True},
        {"name": "WEATHER_MODE", "default": "fast"},
        {"name": "WEATHER_DEBUG", "description": "not needed"},
    ],
}  # fmt: skip


def test_an_npm_package_runs_with_npx_its_arguments_and_each_users_secrets():
    [doc] = documents(server(NPM))
    profile = to_profile(doc)
    assert profile.name == "weather-server"
    assert profile.command == [
        "npx", "--node-options=--max-old-space-size=256", "@acme/weather-mcp@1.4.0", "/data/eu", "--units=metric",
    ]  # fmt: skip
    assert profile.env == {"WEATHER_MODE": "fast"}
    assert {name: (s.required, s.description) for name, s in profile.user_secrets.items()} == {
        "WEATHER_API_KEY": (True, "your API key"), "WEATHER_ACCOUNT": (True, "your account id"),
        "WEATHER_TRACE": (False, "tracing"),
    }  # fmt: skip
    assert (profile.version, profile.registry_name, profile.description) == (
        "1.4.0", "io.github.acme/Weather-Server", "Weather forecasts",
    )  # fmt: skip
    # What the importer prints loads back as a catalog.
    dumped = profile.model_dump(mode="json", exclude_defaults=True, exclude={"name"})
    assert Catalog.parse(json.dumps({"profiles": {profile.name: dumped}})).profiles[profile.name] == profile


def test_pypi_and_oci_packages_and_given_values():
    pypi = {"registryType": "pypi", "registryBaseUrl": "https://pypi.internal.example", "identifier": "weather-mcp",
            "version": "2.0.1", "transport": {"type": "stdio"},
            "packageArguments": [{"type": "positional", "valueHint": "city", "isRequired": True}]}  # fmt: skip
    profile = to_profile(documents(server(pypi))[0], name="weather", values={"city": "Lisbon"})
    assert profile.command == ["uvx", "--index-url", "https://pypi.internal.example", "weather-mcp==2.0.1", "Lisbon"]
    with pytest.raises(Refused, match=r"argument city needs a value \(--value city=…\)"):
        to_profile(documents(server(pypi))[0])

    oci = {"registryType": "oci", "identifier": "ghcr.io/acme/weather:1.4.0", "transport": {"type": "stdio"},
           "environmentVariables": [{"name": "WEATHER_API_KEY", "isSecret": True}],
           "runtimeArguments": [{"type": "named", "name": "--network", "value": "host"}]}  # fmt: skip
    profile = to_profile(documents(server(oci))[0])
    assert profile.command == [
        "docker", "run", "--rm", "-i", "-e", "WEATHER_API_KEY", "--network=host", "ghcr.io/acme/weather:1.4.0",
    ]  # fmt: skip
    assert set(profile.user_secrets) == {"WEATHER_API_KEY"}


def test_what_cannot_run_is_refused_with_the_reason():
    remote = server(remotes=[{"type": "streamable-http", "url": "https://weather.example.com/mcp"}])
    remote.pop("packages")
    with pytest.raises(Refused, match=r"remote-only .*https://weather\.example\.com/mcp.*Pier runs stdio servers"):
        to_profile(documents(remote)[0])
    nuget = {"registryType": "nuget", "identifier": "Acme.Weather", "version": "1.0.0", "transport": {"type": "stdio"}}
    mcpb = {"registryType": "mcpb", "identifier": "https://example.com/w.mcpb", "transport": {"type": "stdio"}}
    with pytest.raises(Refused, match=r"no package Pier can run: nuget \(stdio\), mcpb \(stdio\)"):
        to_profile(documents(server(nuget, mcpb))[0])
    http_npm = {**NPM, "transport": {"type": "streamable-http", "url": "http://localhost:3000/mcp"}}
    with pytest.raises(Refused, match=r"npm \(streamable-http\)"):
        to_profile(documents(server(http_npm))[0])
    with pytest.raises(Refused, match="neither packages nor remotes"):
        to_profile(documents(server())[0])
    secret_argument = {**NPM, "packageArguments": [{"type": "named", "name": "--token", "isSecret": True}]}
    with pytest.raises(Refused, match=r"argument --token is a secret"):
        to_profile(documents(server(secret_argument))[0])
    with pytest.raises(Refused, match=r"not a server\.json document: name"):
        documents({"description": "x", "version": "1"})
    # The first package Pier can run is taken, whatever comes before it.
    assert to_profile(documents(server(nuget, NPM))[0]).command[0] == "npx"


def test_registry_answers_are_unwrapped():
    one = server(NPM)
    assert [d.name for d in documents({"server": one, "_meta": {}})] == [one["name"]]
    listing = {
        "servers": [{"server": one}, {"server": {**one, "name": "io.github.acme/other"}}],
        "metadata": {"count": 2},
    }
    assert [d.name for d in documents(listing)] == [one["name"], "io.github.acme/other"]


def test_names_and_namespaces():
    assert profile_name("io.github.acme/Weather_Server.v2") == "weather-server-v2"
    assert profile_name("x/" + "a" * 80) == "a" * 40
    assert namespace_of("https://pier.example.com:8443/x") == "com.example.pier"
    assert namespace_of("http://127.0.0.1:8000") == namespace_of("http://localhost") == "local.pier"


def test_a_profile_goes_out_as_a_remote_on_the_router():
    profile = to_profile(documents(server(NPM))[0])
    out = to_server_json(profile, "https://pier.example.com", "com.example.pier", keyed=True).document()
    assert out["$schema"] == SCHEMA
    assert (out["name"], out["version"], out["title"]) == ("com.example.pier/weather-server", "1.4.0", "weather-server")
    [remote] = out["remotes"]
    assert (remote["type"], remote["url"]) == (
        "streamable-http",
        "https://pier.example.com/v1/me/servers/weather-server/mcp",
    )
    assert remote["headers"][0]["name"] == "Authorization"
    assert out["_meta"]["dev.pier/profile"]["imported_from"] == "io.github.acme/Weather-Server"
    assert "command" not in json.dumps(out)
    assert "@acme" not in json.dumps(out)
    # And it is a valid server.json itself.
    assert documents(out)[0].name == out["name"]
