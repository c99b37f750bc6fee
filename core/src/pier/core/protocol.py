"""MCP protocol revisions as Pier serves them: which exist, how a request names its own, and the
2026-07-28 rules every entry point applies alike (the bridge's `/mcp`, the router's relay).

Revisions up to 2025-11-25 open a session with the `initialize` handshake ("handshake" revisions);
2026-07-28 is stateless ("modern"): every request carries its protocol version, client capabilities
and client info in `params._meta`, and over HTTP its method (and name) in headers that must agree
with the body. A request is modern when its `MCP-Protocol-Version` header names anything but a
handshake revision (an unknown one too: it is then refused with the supported list).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from pier.core.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, Message

HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
SUPPORTED_VERSIONS = (*HANDSHAKE_VERSIONS, *MODERN_VERSIONS)
MODERN = MODERN_VERSIONS[-1]
# A client that sends no MCP-Protocol-Version header is taken to speak 2025-03-26 (spec 2025-06-18).
ASSUMED_VERSION = "2025-03-26"

VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
SESSION_HEADER = "Mcp-Session-Id"

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID_KEY = "io.modelcontextprotocol/subscriptionId"
RELATED_TASK_KEY = "io.modelcontextprotocol/related-task"
ENVELOPE_KEYS = (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY, CLIENT_INFO_KEY, LOG_LEVEL_KEY)
TASKS_EXTENSION = "io.modelcontextprotocol/tasks"

HEADER_MISMATCH = -32020
MISSING_CAPABILITY = -32021
UNSUPPORTED_VERSION = -32022

# The HTTP status of a 2026-07-28 error answer, by JSON-RPC code (others: 200).
HTTP_STATUS = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    MISSING_CAPABILITY: 400,
    UNSUPPORTED_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}

# Requests whose params name what they act on, mirrored in the Mcp-Name header.
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
TASK_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel", "tasks/result", "tasks/list"})
TASK_NAMED = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})  # their Mcp-Name is the task id
# Handshake-era methods that 2026-07-28 removed: answered 404 / -32601 there.
REMOVED_METHODS = frozenset({"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"})
# Results that carry caching hints at 2026-07-28 (ttlMs, cacheScope).
CACHEABLE = frozenset(
    {"server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)
# Which client capability each server→client request needs.
CAPABILITY_FOR = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

_B64 = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


class Refusal(Exception):
    """A 2026-07-28 request refused before it is served: a JSON-RPC error and its HTTP status."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def answer(self, request_id: Any) -> Message:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


def is_modern_request(version_header: str | None) -> bool:
    """Whether a request goes the 2026-07-28 way: its header names no handshake revision."""
    return version_header is not None and version_header not in HANDSHAKE_VERSIONS


def unsupported(requested: Any) -> Refusal:
    return Refusal(
        UNSUPPORTED_VERSION,
        "Unsupported protocol version",
        {"supported": list(SUPPORTED_VERSIONS), "requested": requested},
    )


def decode_header(value: str | None) -> str | None:
    """An `Mcp-Name` / `Mcp-Param-*` value, its `=?base64?…?=` form decoded (None when malformed)."""
    if value is None:
        return None
    match = _B64.fullmatch(value)
    if match is None:
        return value
    try:
        raw = base64.b64decode(match["payload"], validate=True)
        return raw.decode("utf-8") if base64.b64encode(raw).decode() == match["payload"] else None
    except (binascii.Error, UnicodeDecodeError):
        return None


def meta_of(message: Message) -> dict[str, Any]:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) else {}


def check_request(message: Message, headers: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The 2026-07-28 checks of one request, in the spec's order; returns (version, client capabilities).

    `_meta` must carry the protocol version and capabilities (-32602); the headers must agree with
    the body (-32020); the version must be one Pier serves (-32022).
    """
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise Refusal(INVALID_PARAMS, f"params._meta must carry {PROTOCOL_VERSION_KEY} and {CLIENT_CAPABILITIES_KEY}")
    missing = [key for key in (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY) if key not in meta]
    if missing:
        raise Refusal(INVALID_PARAMS, "params._meta is missing " + ", ".join(missing))
    version = meta[PROTOCOL_VERSION_KEY]
    if headers.get(VERSION_HEADER) != version:
        raise Refusal(HEADER_MISMATCH, f"Header mismatch: {VERSION_HEADER} does not match the body's protocol version")
    method = message.get("method")
    if headers.get(METHOD_HEADER) != method:
        raise Refusal(HEADER_MISMATCH, f"Header mismatch: {METHOD_HEADER} does not match the body's method")
    name_key = NAME_PARAM.get(str(method)) or ("taskId" if method in TASK_NAMED else None)
    named = params.get(name_key) if name_key is not None and isinstance(params, dict) else None
    given = headers.get(NAME_HEADER)
    # The tasks methods' Mcp-Name (SEP-2663) is checked when present: SDK clients (the mcp SDK 2.x under
    # FastMCP's and pydantic-ai's tasks) send none, and routing by it is the caller's loss, not Pier's.
    if named is not None and (given is not None or method not in TASK_NAMED) and decode_header(given) != named:
        raise Refusal(HEADER_MISMATCH, f"Header mismatch: {NAME_HEADER} does not match the body's {name_key}")
    if not isinstance(version, str) or version not in MODERN_VERSIONS:
        raise unsupported(version)
    capabilities = meta[CLIENT_CAPABILITIES_KEY]
    return version, capabilities if isinstance(capabilities, dict) else {}


def era_mismatch(payload: Any, version_header: str | None) -> Refusal | None:
    """A handshake-era request (its `MCP-Protocol-Version` names a handshake revision, or is absent)
    whose body claims another revision in the 2026-07-28 envelope: refused (-32020), as a 2026-07-28
    request whose header and body disagree is. `initialize` may carry the envelope (it is no
    2026-07-28 request whatever it carries)."""
    for message in payload if isinstance(payload, list) else [payload]:
        if not isinstance(message, dict) or message.get("method") in (None, "initialize"):
            continue
        claimed = meta_of(message).get(PROTOCOL_VERSION_KEY)
        if claimed is not None and claimed != version_header:
            header = version_header or "absent"
            return Refusal(
                HEADER_MISMATCH,
                f"Header mismatch: {VERSION_HEADER} is {header} but the body claims protocol version {claimed}",
            )
    return None


def strip_envelope(message: Message) -> Message:
    """The request without the 2026-07-28 envelope in its `_meta` (for a handshake-era server)."""
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("_meta"), dict):
        return message
    meta = {k: v for k, v in params["_meta"].items() if k not in ENVELOPE_KEYS}
    rest = {k: v for k, v in params.items() if k != "_meta"}
    return {**message, "params": {**rest, "_meta": meta} if meta else rest}


def log_level_allows(wanted: str | None, level: Any) -> bool:
    """Whether a log record at `level` passes a request's `logLevel` (None: no logs at all)."""
    if wanted is None:
        return False
    try:
        return LOG_LEVELS.index(str(level)) >= LOG_LEVELS.index(wanted)
    except ValueError:
        return True


# -- Mcp-Param-* headers (x-mcp-header) -----------------------------------------------------------

PARAM_HEADER_PREFIX = "Mcp-Param-"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_SAFE = re.compile(r"^[\x20-\x7E\t]*$")
_DECIMAL = re.compile(r"^-?[0-9]+(\.0+)?$")


def param_headers(schema: Any) -> list[tuple[tuple[str, ...], str, str]]:
    """The `x-mcp-header` annotations of a tool's input schema: (property path, header token, type),
    for properties reached through `properties` alone (the only place the spec allows them)."""
    found: list[tuple[tuple[str, ...], str, str]] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if (
            path
            and isinstance(token, str)
            and _TOKEN.fullmatch(token)
            and node.get("type") in ("string", "integer", "boolean")
        ):
            found.append((path, token, node["type"]))
        properties = node.get("properties")
        if isinstance(properties, dict):
            stack.extend(((*path, name), sub) for name, sub in properties.items())
    return found


def check_param_headers(
    annotated: list[tuple[tuple[str, ...], str, str]], arguments: Any, headers: Mapping[str, str]
) -> None:
    """Refuse (-32020) a tools/call whose `Mcp-Param-*` headers disagree with its arguments
    (`annotated`: the tool's `param_headers`)."""
    arguments = arguments if isinstance(arguments, dict) else {}
    for path, token, kind in annotated:
        name = PARAM_HEADER_PREFIX + token
        values = headers.getall(name, []) if hasattr(headers, "getall") else [v for v in [headers.get(name)] if v]
        value: Any = arguments
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if len(values) > 1:
            raise Refusal(HEADER_MISMATCH, f"Header mismatch: {name} appears more than once")
        raw = values[0] if values else None
        if raw is not None and not _HEADER_SAFE.fullmatch(raw):
            raise Refusal(HEADER_MISMATCH, f"Header mismatch: {name} carries invalid characters")
        if value is None or isinstance(value, dict | list):
            if raw is not None:
                raise Refusal(HEADER_MISMATCH, f"Header mismatch: {name} is present but its argument is not")
            continue
        if raw is None:
            raise Refusal(HEADER_MISMATCH, f"Header mismatch: {name} is missing but its argument is present")
        decoded = decode_header(raw)
        rendered = ("true" if value else "false") if isinstance(value, bool) else str(value)
        numeric = kind == "integer" and isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and decoded is not None and _DECIMAL.fullmatch(decoded) and int(decoded.split(".")[0]) == value:
            continue  # integers compare as numbers (42 and 42.0 agree)
        if decoded != rendered:
            raise Refusal(HEADER_MISMATCH, f"Header mismatch: {name} does not match the argument")
