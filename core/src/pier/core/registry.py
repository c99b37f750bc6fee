"""The MCP registry's formats, in and out: `server.json` (schema 2025-12-11) and the registry API's answers
(v0.1), as models, and the two conversions Pier makes.

- **In** (`pier catalog import`): a `server.json` becomes a catalog profile. Its first stdio package of a
  registry type Pier can run — npm (`npx`), pypi (`uvx`), oci (`docker run -i`) — gives the command, with
  the package's runtime and package arguments; its environment variables become the profile's `env`
  (fixed values) or, when secret or required without a value, `user_secrets` (each user supplies their
  own). What Pier cannot run is refused with the reason: remote-only servers (they are already HTTP
  servers: use them directly), registry types it does not know, inputs nobody gave a value for.
- **Out** (`GET /v0.1/servers`): a profile is a `server.json` whose remote is the user's own MCP endpoint
  on the router (`/v1/me/servers/{profile}/mcp`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pier.core.catalog import Profile, UserSecret

SCHEMA = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"
SUPPORTED_TYPES = ("npm", "pypi", "oci")
PIER_META = "dev.pier/profile"  # our own `_meta` key (reverse DNS, as the registry asks)
_DEFAULT_BASES = {"npm": "https://registry.npmjs.org", "pypi": "https://pypi.org"}
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Model(BaseModel):
    # Documents from elsewhere: unknown fields are theirs (a newer schema), kept out of the way, not refused.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Input(_Model):
    description: str | None = None
    is_required: bool = Field(default=False, alias="isRequired")
    format: Literal["string", "number", "boolean", "filepath"] = "string"
    value: str | None = None
    is_secret: bool = Field(default=False, alias="isSecret")
    default: str | None = None
    placeholder: str | None = None
    choices: list[str] | None = None
    variables: dict[str, Input] | None = None


class Argument(Input):
    type: Literal["positional", "named"]
    name: str | None = None
    value_hint: str | None = Field(default=None, alias="valueHint")
    is_repeated: bool = Field(default=False, alias="isRepeated")

    @property
    def label(self) -> str:
        return self.name or self.value_hint or "(unnamed)"


class KeyValueInput(Input):
    name: str


class Transport(_Model):
    type: Literal["stdio", "streamable-http", "sse"]
    url: str | None = None
    headers: list[KeyValueInput] | None = None
    variables: dict[str, Input] | None = None


class Package(_Model):
    registry_type: str = Field(alias="registryType")
    registry_base_url: str | None = Field(default=None, alias="registryBaseUrl")
    identifier: str = Field(min_length=1)
    version: str | None = None
    file_sha256: str | None = Field(default=None, alias="fileSha256")
    runtime_hint: str | None = Field(default=None, alias="runtimeHint")
    transport: Transport
    runtime_arguments: list[Argument] = Field(default_factory=list, alias="runtimeArguments")
    package_arguments: list[Argument] = Field(default_factory=list, alias="packageArguments")
    environment_variables: list[KeyValueInput] = Field(default_factory=list, alias="environmentVariables")


class Repository(_Model):
    url: str
    source: str
    id: str | None = None
    subfolder: str | None = None


class ServerJson(_Model):
    """A `server.json` document (what the registry's API calls ServerDetail)."""

    schema_url: str | None = Field(default=None, alias="$schema")
    name: str = Field(min_length=3, max_length=200, pattern=r"^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$")
    description: str = Field(min_length=1, max_length=100)
    title: str | None = Field(default=None, max_length=100)
    version: str = Field(max_length=255)
    website_url: str | None = Field(default=None, alias="websiteUrl")
    repository: Repository | None = None
    packages: list[Package] | None = None
    remotes: list[Transport] | None = None
    meta: dict[str, Any] | None = Field(default=None, alias="_meta")

    def document(self) -> dict[str, Any]:
        """As JSON, the registry's field names, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ServerResponse(_Model):
    server: ServerJson
    meta: dict[str, Any] | None = Field(default=None, alias="_meta")


class ListMetadata(_Model):
    next_cursor: str | None = Field(default=None, alias="nextCursor")
    count: int


class ServerList(_Model):
    servers: list[ServerResponse]
    metadata: ListMetadata | None = None


# -- in: server.json → profile --------------------------------------------------------------------------


class Refused(ValueError):
    """A server.json Pier cannot turn into a profile, and why (one line)."""


def documents(data: Any) -> list[ServerJson]:
    """The server.json documents in `data`: one, a registry API answer for one (`{"server": …}`), or a
    listing (`{"servers": [...]}`). Refused when it is none of these."""
    try:
        if isinstance(data, dict) and "servers" in data:
            return [item.server for item in ServerList.model_validate(data).servers]
        if isinstance(data, dict) and isinstance(data.get("server"), dict):
            return [ServerResponse.model_validate(data).server]
        return [ServerJson.model_validate(data)]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise Refused(f"not a server.json document: {problems}") from None


def profile_name(server_name: str) -> str:
    """A profile name from a registry name (`io.github.acme/Weather-Server` → `weather-server`)."""
    tail = server_name.rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", tail).strip("-")[:40].strip("-")
    return name or "server"


def to_profile(server: ServerJson, name: str | None = None, values: dict[str, str] | None = None) -> Profile:
    """The catalog profile that runs `server` (Refused with the reason when Pier cannot run it).

    `values`: inputs the server leaves to whoever installs it (arguments, environment variables), by name.
    """
    values = values or {}
    package = _runnable_package(server)
    env, secrets = _environment(package, values)
    profile = {
        "name": name or profile_name(server.name),
        "description": server.description,
        "command": _command(package, values),
        "env": env,
        "user_secrets": secrets,
        "version": server.version,
        "registry_name": server.name,
    }
    try:
        return Profile.model_validate(profile)
    except ValidationError as exc:
        raise Refused(f"{server.name}: {exc.errors()[0]['msg']}") from None


def _runnable_package(server: ServerJson) -> Package:
    packages = server.packages or []
    if not packages:
        if server.remotes:
            raise Refused(
                f"{server.name} is remote-only (served at {server.remotes[0].url}): Pier runs stdio servers; "
                "an MCP client can use the remote directly"
            )
        raise Refused(f"{server.name} has neither packages nor remotes: nothing to run")
    for package in packages:
        if package.registry_type in SUPPORTED_TYPES and package.transport.type == "stdio":
            return package
    kinds = ", ".join(f"{p.registry_type} ({p.transport.type})" for p in packages)
    raise Refused(
        f"{server.name} has no package Pier can run: {kinds}; Pier runs stdio packages from "
        + ", ".join(SUPPORTED_TYPES)
    )


def _command(package: Package, values: dict[str, str]) -> list[str]:
    runtime = [part for argument in package.runtime_arguments for part in _argument(argument, values)]
    arguments = [part for argument in package.package_arguments for part in _argument(argument, values)]
    base = package.registry_base_url
    if package.registry_type == "npm":
        if base and base.rstrip("/") != _DEFAULT_BASES["npm"]:
            runtime = ["--registry", base, *runtime]
        target = f"{package.identifier}@{package.version}" if package.version else package.identifier
        return [package.runtime_hint or "npx", *runtime, target, *arguments]
    if package.registry_type == "pypi":
        if base and base.rstrip("/") != _DEFAULT_BASES["pypi"]:
            runtime = ["--index-url", base, *runtime]
        target = f"{package.identifier}=={package.version}" if package.version else package.identifier
        return [package.runtime_hint or "uvx", *runtime, target, *arguments]
    # oci: the server's image, its stdio wired to ours; its variables passed on by name (docker -e NAME)
    passed = [part for variable in package.environment_variables for part in ("-e", variable.name)]
    return ["docker", "run", "--rm", "-i", *passed, *runtime, package.identifier, *arguments]


def _value(item: Input, label: str, values: dict[str, str]) -> str | None:
    """An input's value: given on the command line, fixed by the document, or its default (variables filled in)."""
    value = values.get(label, item.value if item.value is not None else item.default)
    if value is None:
        return None
    variables = item.variables or {}

    def fill(match: re.Match[str]) -> str:
        variable = variables.get(match.group(1))
        if variable is None:
            return match.group(0)  # the spec: an unknown {name} stays as it is
        filled = _value(variable, match.group(1), values)
        if filled is None:
            raise Refused(f"variable {match.group(1)} of {label} needs a value (--value {match.group(1)}=…)")
        return filled

    return _VARIABLE.sub(fill, value)


def _argument(argument: Argument, values: dict[str, str]) -> list[str]:
    value = _value(argument, argument.label, values)
    if argument.is_secret:
        raise Refused(f"argument {argument.label} is a secret: Pier gives users' secrets as environment variables only")
    if argument.type == "positional":
        if value is None:
            if argument.is_required:
                raise Refused(f"argument {argument.label} needs a value (--value {argument.label}=…)")
            return []
        return [value]
    if value is None:
        if argument.is_required:
            raise Refused(f"argument {argument.label} needs a value (--value {argument.label}=…)")
        return []
    assert argument.name is not None
    return [f"{argument.name}={value}"]


def _environment(package: Package, values: dict[str, str]) -> tuple[dict[str, str], dict[str, UserSecret]]:
    """Fixed values become the profile's env; secrets, and required values nobody fixed, each user's own."""
    env: dict[str, str] = {}
    secrets: dict[str, UserSecret] = {}
    for variable in package.environment_variables:
        value = None if variable.is_secret else _value(variable, variable.name, values)
        if value is not None:
            env[variable.name] = value
        elif variable.is_secret or variable.is_required:
            secrets[variable.name] = UserSecret(description=variable.description or "", required=variable.is_required)
    return env, secrets


# -- out: profile → server.json -------------------------------------------------------------------------


def namespace_of(url: str) -> str:
    """A registry namespace from the router's URL: its host reversed (`pier.example.com` → `com.example.pier`)."""
    host = re.sub(r":\d+$", "", re.sub(r"^[a-z]+://", "", url).split("/")[0]).lower()
    if not host or host == "localhost" or re.fullmatch(r"[0-9.]+|\[[0-9a-f:]+\]", host):
        return "local.pier"
    return ".".join(reversed(host.split(".")))


def to_server_json(profile: Profile, base_url: str, namespace: str, keyed: bool) -> ServerJson:
    """A profile as the registry shows it: a remote server, the user's own endpoint on this router.

    `keyed`: callers authenticate with keys only (no identity provider to sign in with): the endpoint
    then asks for an Authorization header.
    """
    headers = None
    if keyed:
        headers = [KeyValueInput(name="Authorization", description="Bearer <your Pier user key>", isRequired=True,
                                 isSecret=True)]  # fmt: skip
    remote = Transport(type="streamable-http", url=f"{base_url}/v1/me/servers/{profile.name}/mcp", headers=headers)
    pier: dict[str, Any] = {"profile": profile.name, "connection": profile.connection_kind,
                            "user_secrets": sorted(profile.user_secrets)}  # fmt: skip
    if profile.registry_name:
        pier["imported_from"] = profile.registry_name
    description = profile.description or f"{profile.name} (served by Pier)"
    return ServerJson.model_validate(
        {"$schema": SCHEMA, "name": f"{namespace}/{profile.name}", "title": profile.name[:100],
         "description": description[:100], "version": profile.version or "0.0.0",
         "remotes": [remote.model_dump(by_alias=True, exclude_none=True)], "_meta": {PIER_META: pier}}
    )  # fmt: skip
