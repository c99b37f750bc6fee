"""Bridge settings: `PIER_SIDECAR_*` environment variables, overridden by command-line flags.

A plain dataclass rather than a pydantic-settings model: the bridge runs once per session, and
pydantic (with pydantic-settings) would cost every idle bridge ~12 MiB and ~90 ms of start-up
for the one moment it reads its environment. Values are still checked (types and bounds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pier.core.sandbox import MODES, Confinement, Mode

MiB = 1024 * 1024
ENV_PREFIX = "PIER_SIDECAR_"


class Secret:
    """A string that never shows in reprs or logs (the bridge's token)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _bounded(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


@dataclass
class SidecarSettings:
    """Everything one bridge needs to know; see the README's configuration table."""

    host: str = "127.0.0.1"
    port: int = _bounded(8080, ge=0, le=65535)
    command: list[str] = field(default_factory=list)  # stdio server command (child mode)
    attach_dir: Path | None = None  # FIFO directory (attach mode)
    cwd: Path | None = None

    max_concurrent_calls: int = _bounded(16, ge=1)
    max_queued_calls: int = _bounded(256, ge=0)  # calls waiting for a slot before refusing
    max_message_bytes: int = _bounded(16 * MiB, ge=1024)

    start_timeout_s: float = _bounded(30.0, gt=0)  # server start + initialize deadline
    restart_backoff_initial_s: float = _bounded(0.2, ge=0)
    restart_backoff_max_s: float = _bounded(30.0, ge=0)
    max_restarts: int = _bounded(10, ge=0)  # consecutive failed runs before giving up; 0 = never
    stable_after_s: float = _bounded(30.0, ge=0)  # uptime after which a run counts as healthy
    write_timeout_s: float = _bounded(30.0, gt=0)  # how long a server may stop reading
    body_timeout_s: float = _bounded(30.0, gt=0)  # a request's body must arrive within

    shutdown_grace_s: float = _bounded(20.0, ge=0)  # SIGTERM: time for in-flight calls
    kill_timeout_s: float = _bounded(5.0, ge=0)  # server stop: EOF → SIGTERM → SIGKILL steps

    allowed_origins: list[str] = field(default_factory=list)  # besides localhost ones; '*' allows any
    token: Secret | None = None  # bearer token required on /mcp and /v1
    tls_cert: Path | None = None  # serve HTTPS with this certificate
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA

    call_retention_s: float = _bounded(600.0, gt=0)  # how long finished calls stay readable
    max_retained_calls: int = _bounded(10_000, ge=1)
    client_idle_s: float = _bounded(3600.0, gt=0)  # MCP client sessions idle this long end
    max_clients: int = _bounded(10_000, ge=1)
    stderr_tail_lines: int = _bounded(200, ge=1)
    log_level: str = "INFO"
    # How the bridge speaks to its server: `handshake` (initialize, revisions up to 2025-11-25),
    # `modern` (2026-07-28: server/discover, per-request _meta; modern callers' requests pass
    # through), or `auto`: the handshake, and 2026-07-28 only for a server that refuses it.
    server_era: str = "auto"
    input_wait_s: float = _bounded(300.0, gt=0)  # a call waiting for its caller's input (MRTR) is cancelled after
    # Warm pools set it: once the server is initialized, one call of a tool no server has
    # (`WARM_UP_TOOL`), so a pooled session's first real call does not pay for the server's first
    # run through its call path (V8 compiling it, lazy imports: ~10 ms for server-everything).
    warm_up: bool = False
    # Local sessions (the router sets these): the server confined (`pier.core.sandbox`): `sandbox`
    # (bubblewrap) or `uid` (its own uid), with its own `home`; `run_as` "UID:GID" as root.
    isolation: str = "none"
    run_as: str = ""
    home: Path | None = None
    sandbox_paths: list[str] = field(default_factory=list)  # read-only in the sandbox, besides the system's
    sandbox_binds: list[str] = field(default_factory=list)  # "HOST_DIR:PATH": read-only where the server sees it

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, hints[f.name], getattr(self, f.name))
            _check_bounds(f, value)
            setattr(self, f.name, value)
        if self.server_era not in ("auto", "handshake", "modern"):
            raise ValueError(f"{ENV_PREFIX}SERVER_ERA must be auto, handshake or modern, not {self.server_era!r}")
        self.confinement()  # checked now, not at the server's first start

    def confinement(self) -> Confinement | None:
        """How the server is confined (None: it runs as the bridge does)."""
        if self.isolation == "none":
            return None
        if self.isolation not in MODES:
            raise ValueError(f"{ENV_PREFIX}ISOLATION must be one of {', '.join(MODES)}, not {self.isolation!r}")
        if self.home is None:
            raise ValueError(f"{ENV_PREFIX}ISOLATION={self.isolation} needs {ENV_PREFIX}HOME")
        uid = gid = None
        if self.run_as:
            try:
                uid, gid = (int(part) for part in self.run_as.split(":"))
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}RUN_AS must be UID:GID, not {self.run_as!r}") from None
        mode: Mode = "uid" if self.isolation == "uid" else "sandbox"
        binds = []
        for bind in self.sandbox_binds:
            source, sep, dest = bind.partition(":")
            if not sep:
                raise ValueError(f"{ENV_PREFIX}SANDBOX_BINDS items are HOST_DIR:PATH, not {bind!r}")
            binds.append((source, dest))
        return Confinement(mode, self.home, uid, gid, tuple(self.sandbox_paths), tuple(binds))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SidecarSettings:
        """`PIER_SIDECAR_*` variables (names case-insensitive; lists as JSON), then `overrides`."""
        env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        return cls(**{**values, **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` (given in code, or a string from the environment) as the field's type."""
    where = f"{ENV_PREFIX}{name.upper()}"
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where}: a value is required")
    if type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
    try:
        return _convert(hint, value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _convert(hint: Any, value: Any) -> Any:
    """`value` as `hint`: a list of strings, a Secret, a bool, an int, a float, a Path or a str."""
    if typing.get_origin(hint) is list:
        items = json.loads(value) if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("expected a list of strings (JSON in the environment)")
        return list(items)
    if hint is Secret:
        return value if isinstance(value, Secret) else Secret(str(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _BOOLEANS:
            raise ValueError("expected true or false")
        return _BOOLEANS[str(value).lower()]
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value) if hint is float else int(value)
    if hint is Path:
        return Path(value)
    return str(value)


def _check_bounds(f: dataclasses.Field[Any], value: Any) -> None:
    bounds = f.metadata
    where = f"{ENV_PREFIX}{f.name.upper()}"
    if bounds.get("ge") is not None and value < bounds["ge"]:
        raise ValueError(f"{where}: must be ≥ {bounds['ge']}, not {value}")
    if bounds.get("gt") is not None and value <= bounds["gt"]:
        raise ValueError(f"{where}: must be > {bounds['gt']}, not {value}")
    if bounds.get("le") is not None and value > bounds["le"]:
        raise ValueError(f"{where}: must be ≤ {bounds['le']}, not {value}")
