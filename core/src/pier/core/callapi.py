"""The bridge's call API, both ends: its typed messages, and the handle the router and job pool hold.

A bridge (`pier.sidecar`) serves `POST /v1/calls`, `GET|DELETE /v1/calls/{id}`, `POST
/v1/calls/{id}/input` (answers to what the server asked a call's caller), `GET /v1/tools`,
`GET /v1/status` and `POST /v1/clients`. What those carry is defined here once — `CallRequest`, `CallAnswer`,
`BridgeStatus`, `ClientState` — as checked dataclasses rather than pydantic models: every bridge builds them, and a
model library would cost each idle bridge its import (see `pier.sidecar.config`).

A `BridgeHandle` is how one session's bridge is called: `HttpBridge` over the network (pods,
bridge processes, and the job pool always), or the sidecar's `InProcessBridge` for a bridge
running in the router's own process. Both give the same typed answers and raise the same errors:
a call refused before it exists raises its `PierError`; a call that ran and failed is an answer
with `status == "failed"`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import web

from pier.core import tracing
from pier.core.errors import PierError
from pier.core.jsonrpc import Message, dumps, loads

CallStatus = Literal["running", "completed", "failed", "cancelled"]

# Beyond a long-poll's own wait, how long the network may take.
SLACK_S = 10.0
_CALL_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")  # fullmatch: `$` would accept a final newline
_REQUEST_FIELDS = frozenset({"tool", "arguments", "call_id", "wait_s", "capabilities"})
# An MCP client session id as Pier hands them out (the spec allows any visible ASCII; Pier's are hex).
CLIENT_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # fullmatch
_CLIENT_FIELDS = frozenset({"session_id", "initialize", "log_level", "subscriptions"})


@dataclass(frozen=True)
class Endpoint:
    """Where a session's bridge listens, and the token it wants."""

    url: str
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class BridgeUnreachable(PierError):
    """The bridge did not answer: the session is gone (or going)."""

    def __init__(self, endpoint: Endpoint, exc: BaseException) -> None:
        super().__init__("SESSION_LOST", f"the session's bridge is unreachable: {str(exc) or type(exc).__name__}")
        self.endpoint = endpoint


# -- what the call API carries ------------------------------------------------------------------


@dataclass(slots=True)
class CallRequest:
    """`POST /v1/calls`: start a tool call (or join the one with the same `call_id`)."""

    tool: str
    arguments: dict[str, Any]
    call_id: str | None = None
    wait_s: float = 30.0
    # What the call's caller can be asked (sampling, elicitation, roots): the server's requests during
    # the call wait as its `input_requests` for answers (`POST /v1/calls/{id}/input`); None: nothing.
    capabilities: dict[str, Any] | None = None

    @classmethod
    def parse(cls, data: Any) -> CallRequest:
        """The request in `data`, or INVALID_ARGUMENTS listing what is wrong with it."""
        if not isinstance(data, dict):
            raise _invalid_body([([], "the body must be a JSON object")])
        errors: list[tuple[list[Any], str]] = [
            ([name], "extra fields not permitted") for name in data.keys() - _REQUEST_FIELDS
        ]
        tool = data.get("tool")
        if not isinstance(tool, str) or not tool:
            errors.append((["tool"], "a non-empty string is required"))
        arguments = data.get("arguments", {})
        if not isinstance(arguments, dict):
            errors.append((["arguments"], "must be an object"))
        call_id = data.get("call_id")
        if call_id is not None and not (isinstance(call_id, str) and _CALL_ID.fullmatch(call_id)):
            errors.append((["call_id"], "1-200 characters: letters, digits and . _ : -"))
        wait_s = data.get("wait_s", 30.0)
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= 300:
            errors.append((["wait_s"], "a number of seconds from 0 to 300"))
        capabilities = data.get("capabilities")
        if capabilities is not None and not isinstance(capabilities, dict):
            errors.append((["capabilities"], "must be an object"))
        if errors:
            raise _invalid_body(errors)
        return cls(tool, arguments, call_id, float(wait_s), capabilities)  # type: ignore[arg-type]  # checked above

    def to_dict(self) -> dict[str, Any]:
        body = {"tool": self.tool, "arguments": self.arguments, "call_id": self.call_id, "wait_s": self.wait_s}
        if self.capabilities is not None:
            body["capabilities"] = self.capabilities
        return body


def _invalid_body(errors: list[tuple[list[Any], str]]) -> PierError:
    details = {"errors": [{"path": path, "message": message} for path, message in errors]}
    return PierError("INVALID_ARGUMENTS", "the request body does not match the schema", details)


@dataclass(slots=True)
class CallAnswer:
    """A call as the bridge reports it: running (with its progress so far), or how it ended."""

    call_id: str
    tool: str
    status: CallStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # a PierError's dict when status is "failed"
    progress: list[dict[str, Any]] = field(default_factory=list)
    progress_count: int = 0
    created_at: float = 0.0
    finished_at: float | None = None
    # What the server asked the call's caller and still waits for (key → {method, params}), and a
    # count of the changes to it (so a stale report never overwrites a newer one).
    input_requests: dict[str, Any] = field(default_factory=dict)
    input_version: int = 0

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def failure(self) -> PierError | None:
        """Why the call failed, or None."""
        return PierError.from_dict(self.error) if self.error is not None else None

    @property
    def http_status(self) -> int:
        """202 while running, 200 once done, the error's status when it failed."""
        if self.status == "running":
            return 202
        failure = self.failure
        return failure.http_status if failure is not None else 200

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallAnswer:
        if data.get("status") not in ("running", "completed", "failed", "cancelled") or "call_id" not in data:
            raise ValueError(f"not a call answer: {str(data)[:200]}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(slots=True)
class BridgeStatus:
    """`GET /v1/status`: the bridge and its server, and how busy they are."""

    state: str  # starting | ready | restarting | failed | stopped | draining
    ready: bool
    mode: Literal["child", "attach"]
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0  # requests the server is working on
    queued: int = 0  # requests waiting for a concurrency slot
    calls_running: int = 0  # call-API calls not finished
    clients: int = 0  # MCP client sessions
    started_at: float = 0.0
    last_activity: float = 0.0
    server_info: dict[str, Any] | None = None
    protocol_version: str | None = None
    tools: int = 0
    last_exit: dict[str, Any] | None = None
    server_tasks: bool = False  # the server runs tasks of its own (2026-07-28 tasks extension)
    server_runs: int = 1  # runs of the server now (2: one per caller era, see pier.sidecar.upstream.Eras)

    @property
    def busy(self) -> bool:
        """Something is running or waiting on this bridge: it must not be reaped or evicted."""
        return bool(self.in_flight or self.calls_running or self.queued)

    def idle_for(self, now: float, last_used: float = 0.0) -> float:
        """Seconds since the last activity the bridge (or, `last_used`, its user's router) saw."""
        return now - max(self.last_activity, last_used)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BridgeStatus:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(slots=True)
class ClientState:
    """`POST /v1/clients`: an MCP client session (handshake revisions) to create under its own id, as its
    client set it up: the params of its `initialize` (revision, capabilities, client info), the log level it
    asked for and the resources it subscribed to. The router keeps this in Redis and has a bridge that does
    not know the id recreate the session from it (`pier.router.mcp.sessions`)."""

    session_id: str
    initialize: dict[str, Any]
    log_level: str | None = None
    subscriptions: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, data: Any) -> ClientState:
        """The state in `data`, or INVALID_ARGUMENTS listing what is wrong with it."""
        if not isinstance(data, dict):
            raise _invalid_body([([], "the body must be a JSON object")])
        errors: list[tuple[list[Any], str]] = [
            ([name], "extra fields not permitted") for name in data.keys() - _CLIENT_FIELDS
        ]
        session_id = data.get("session_id")
        if not (isinstance(session_id, str) and CLIENT_SESSION_ID.fullmatch(session_id)):
            errors.append((["session_id"], "1-128 characters: letters, digits, _ and -"))
        if not isinstance(data.get("initialize"), dict):
            errors.append((["initialize"], "the params of the client's initialize: an object"))
        level = data.get("log_level")
        if level is not None and not isinstance(level, str):
            errors.append((["log_level"], "a string, or null"))
        subscriptions = data.get("subscriptions", [])
        if not (isinstance(subscriptions, list) and all(isinstance(uri, str) for uri in subscriptions)):
            errors.append((["subscriptions"], "a list of resource URIs"))
        if errors:
            raise _invalid_body(errors)
        return cls(session_id, data["initialize"], level, subscriptions)  # type: ignore[arg-type]  # checked above

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the handle --------------------------------------------------------------------------------


# A filter every message a bridge's `/mcp` sends back passes (the router's output policy, when it hands
# a bridge in its own process a request): the message to send, or an empty dict to withhold it.
Output = Callable[[Message], Awaitable[Message]]


class McpHandler(Protocol):
    """A bridge's `/mcp` handler in this process: it serves a request whose body is parsed already."""

    async def handle(self, request: web.Request, payload: Any, output: Output | None = None) -> web.StreamResponse: ...


class BridgeHandle(Protocol):
    """One session's bridge, wherever it runs."""

    endpoint: Endpoint  # where it is served over HTTP (the relay and the job pool reach it there)

    @property
    def mcp(self) -> McpHandler | None:
        """A bridge in this process: its `/mcp` handler, which the relay hands requests directly."""
        ...

    async def start_call(self, request: CallRequest) -> CallAnswer:
        """Start (or join) a call and wait up to `request.wait_s`; PierError when it is refused."""
        ...

    async def get_call(
        self, call_id: str, wait_s: float = 0, progress_after: int | None = None, input_after: int | None = None
    ) -> CallAnswer:
        """A call's state: returns at completion, at new progress, when its input requests change, or
        after `wait_s`."""
        ...

    async def cancel_call(self, call_id: str) -> CallAnswer:
        """Cancel a call (`notifications/cancelled` reaches the server)."""
        ...

    async def answer_call(self, call_id: str, responses: dict[str, Any]) -> CallAnswer:
        """Hand the caller's answers (key → result) to the server requests a call waits on."""
        ...

    async def tools(self, timeout: float) -> list[dict[str, Any]]:
        """The server's tools, once it is ready (PierError if it cannot become ready)."""
        ...

    async def status(self, timeout: float = 5.0) -> BridgeStatus: ...

    async def resume_client(self, state: ClientState, timeout: float = SLACK_S) -> bool:
        """Create the MCP client session `state` describes under its id, replaying its log level and
        subscriptions to the server; False when the bridge has it already (nothing replayed)."""
        ...


class HttpBridge:
    """A bridge reached over HTTP, through a shared connection pool (keep-alive, timeouts)."""

    def __init__(
        self, http: aiohttp.ClientSession, endpoint: Endpoint, ssl_context: ssl.SSLContext | bool = True
    ) -> None:
        self.http = http
        self.endpoint = endpoint
        self.ssl = ssl_context
        self.mcp: McpHandler | None = None  # reached over HTTP only

    async def _request(
        self, method: str, path: str, timeout: float, body: Any = None, template: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One request to the bridge, carrying the current trace context; with `template` (the route, as
        the HTTP conventions name client spans) under a client span of its own."""
        url = self.endpoint.url + path
        if template is None or not tracing.enabled():
            return await self._send(method, url, timeout, body)
        with tracing.span(
            tracing.http_client_name(method, template), "client", tracing.http_client_attributes(method, url, template)
        ) as span:
            status, answer = await self._send(method, url, timeout, body)
            span.set("http.response.status_code", status)
            return status, answer

    async def _send(self, method: str, url: str, timeout: float, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            async with self.http.request(
                method,
                url,
                data=dumps(body) if body is not None else None,
                headers={**self.endpoint.headers(), "Content-Type": "application/json", **tracing.headers()},
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=self.ssl,
            ) as response:
                raw = await response.read()
                return response.status, loads(raw) if raw else {}
        except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as exc:  # ValueError: not a bridge
            raise BridgeUnreachable(self.endpoint, exc) from exc

    async def _answer(
        self, method: str, path: str, timeout: float, body: Any = None, template: str | None = None
    ) -> CallAnswer:
        status, data = await self._request(method, path, timeout, body, template)
        if "call_id" not in data:  # refused: the call does not exist
            raise PierError.from_dict(data.get("error") or {"code": "INTERNAL", "message": f"HTTP {status}"})
        try:
            return CallAnswer.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise BridgeUnreachable(self.endpoint, exc) from exc

    async def start_call(self, request: CallRequest) -> CallAnswer:
        return await self._answer("POST", "/v1/calls", request.wait_s + SLACK_S, request.to_dict(), "/v1/calls")

    async def get_call(
        self, call_id: str, wait_s: float = 0, progress_after: int | None = None, input_after: int | None = None
    ) -> CallAnswer:
        query = f"?wait_s={wait_s}"
        if progress_after is not None:
            query += f"&progress_after={progress_after}"
        if input_after is not None:
            query += f"&input_after={input_after}"
        return await self._answer("GET", f"/v1/calls/{call_id}{query}", wait_s + SLACK_S)

    async def cancel_call(self, call_id: str) -> CallAnswer:
        return await self._answer("DELETE", f"/v1/calls/{call_id}", SLACK_S, template="/v1/calls/{call_id}")

    async def answer_call(self, call_id: str, responses: dict[str, Any]) -> CallAnswer:
        return await self._answer("POST", f"/v1/calls/{call_id}/input", SLACK_S, {"responses": responses})

    async def tools(self, timeout: float) -> list[dict[str, Any]]:
        status, body = await self._request("GET", "/v1/tools", timeout, template="/v1/tools")
        if status != 200:
            raise PierError.from_dict(body.get("error") or {"code": "SESSION_START_FAILED"})
        tools: list[dict[str, Any]] = body["tools"]
        return tools

    async def status(self, timeout: float = 5.0) -> BridgeStatus:
        _, body = await self._request("GET", "/v1/status", timeout)
        try:
            return BridgeStatus.from_dict(body)
        except TypeError as exc:
            raise BridgeUnreachable(self.endpoint, exc) from exc

    async def resume_client(self, state: ClientState, timeout: float = SLACK_S) -> bool:
        status, body = await self._request("POST", "/v1/clients", timeout, state.to_dict())
        if status not in (200, 201):
            raise PierError.from_dict(body.get("error") or {"code": "INTERNAL", "message": f"HTTP {status}"})
        return status == 201
