"""Policy: where every tool call and message is judged, whichever way it came in.

`Gate` is the one place the built-in tool rules of a profile and the external policy hook
(minibridge's Policer) are applied, and the audit record written: the router's ingress
pipeline (REST, bridgekit, the MCP relay, WebSocket) and the job pool (a handed-off call's
result) both go through it.

The hook receives every message from a caller (`Input`) and every response from the server
(`Output`) before it is forwarded: `{"type": "Input"|"Output", "messages": ["<raw JSON-RPC>"]}`
plus Pier's context (`user`, `profile`, `session`, `identity`). `200 {"decision": "Allow"}`
forwards; anything else blocks, with the policy's `reasons` passed on to the caller.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from pier.core import audit, tracing
from pier.core.errors import PierError
from pier.core.jsonrpc import Message, dumps, loads

log = logging.getLogger("pier.core.policy")

Kind = Literal["Input", "Output"]


class ToolList(BaseModel):
    """Glob patterns of tool names; an empty `allow` allows every tool not denied."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)

    def verdict(self, tool: str) -> str | None:
        """Why `tool` is refused, or None."""
        if any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.deny):
            return f"tool {tool!r} is denied"
        if self.allow and not any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.allow):
            return f"tool {tool!r} is not in the allowed list"
        return None


class ToolRules(ToolList):
    """A profile's built-in policy, optionally refined per user, per API key (by key id) and per group
    of a signed-in user (a token's `groups` claim). Every list that applies must allow the tool."""

    users: dict[str, ToolList] = Field(default_factory=dict)
    keys: dict[str, ToolList] = Field(default_factory=dict, description="key id (see the audit log) → rules")
    groups: dict[str, ToolList] = Field(default_factory=dict, description="identity-provider group → rules")

    def check(self, tool: str, user: str, key_id: str, groups: tuple[str, ...] = ()) -> None:
        applying = [self, self.users.get(user), self.keys.get(key_id), *(self.groups.get(g) for g in groups)]
        for rules in applying:
            why = rules.verdict(tool) if rules is not None else None
            if why:
                raise PolicyDenied([why], "built-in")


class PolicyDenied(PierError):
    def __init__(self, reasons: list[str], decided_by: str) -> None:
        super().__init__(
            "POLICY_DENIED", "blocked by policy: " + "; ".join(reasons), {"reasons": reasons, "decided_by": decided_by}
        )
        self.reasons = reasons


@dataclass(frozen=True)
class Caller:
    """Who is calling, for which user's session of which profile, and through which entry point."""

    identity: dict[str, Any]  # the principal as audit records and the policy hook see it (no secret)
    key_id: str  # the key's digest, for per-key tool rules
    user: str
    profile: str
    policy_url: str | None  # the profile's hook, else the global one; None: no hook
    tool_rules: ToolRules | None = None
    via: str = "rest"  # rest | chat | mcp | ws | job
    groups: tuple[str, ...] = ()  # a signed-in user's groups (tool rules may name them)

    def context(self) -> dict[str, Any]:
        """What the policy hook learns besides the messages."""
        return {"user": self.user, "profile": self.profile, "session": f"{self.user}/{self.profile}",
                "identity": self.identity}  # fmt: skip


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "pier_policy_decisions_total", "policy hook decisions, by message type and decision",
            ["type", "decision"], registry=registry,
        )  # fmt: skip


class Policer:
    """Client of the policy hook; fails closed unless told otherwise."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        metrics: PolicyMetrics,
        token: str | None,
        fail_open: bool,
        timeout_s: float,
    ) -> None:
        self.http = http
        self.metrics = metrics
        self.token = token
        self.fail_open = fail_open
        self.timeout_s = timeout_s

    async def check(self, url: str | None, kind: Kind, messages: list[Any], context: dict[str, Any]) -> None:
        """Raise PolicyDenied unless the policy at `url` allows `messages` (no url: allowed)."""
        if not url or not messages:
            return
        body = {"type": kind, "messages": [m if isinstance(m, str) else dumps(m).decode() for m in messages], **context}
        # The hook's address only: its URL may carry a credential.
        attributes = {**tracing.http_client_attributes("POST", url), "pier.policy.type": kind}
        with tracing.span("POST", "client", attributes) as span:
            headers = {"Content-Type": "application/json", **tracing.headers()}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            answer = await self._ask(url, body, headers, kind, span)
        if answer is None:
            return  # unreachable, failing open
        raw, status = answer
        decision, reasons = _parse(raw)
        if status == 200 and decision == "Allow":
            self.metrics.decisions.labels(kind, "allow").inc()
            return
        self.metrics.decisions.labels(kind, "deny").inc()
        raise PolicyDenied(reasons or [f"denied by the policy service (HTTP {status})"], "policy")

    async def _ask(
        self, url: str, body: dict[str, Any], headers: dict[str, str], kind: Kind, span: tracing.Span
    ) -> tuple[bytes, int] | None:
        """The hook's answer (body, status); PolicyDenied when it cannot be reached (None when failing open)."""
        try:
            async with self.http.post(
                url, data=dumps(body), headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                span.set("http.response.status_code", response.status)
                return await response.read(), response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.metrics.decisions.labels(kind, "unreachable").inc()
            span.fail(type(exc).__name__, str(exc))
            if self.fail_open:
                log.warning("policy service unreachable; allowing (fail-open)", extra={"error": str(exc)})
                return None
            raise PolicyDenied([f"policy service unreachable: {type(exc).__name__}"], "policy") from None


def _parse(raw: bytes) -> tuple[str | None, list[str]]:
    try:
        data = loads(raw)
    except ValueError:
        return None, []
    if not isinstance(data, dict):
        return None, []
    reasons = data.get("reasons") or []
    return data.get("decision"), [str(r) for r in reasons] if isinstance(reasons, list) else [str(reasons)]


class Gate:
    """Tool rules → policy hook → audit record, for every call and message wherever it entered."""

    def __init__(self, policer: Policer, audit_log: bool = True) -> None:
        self.policer = policer
        self.audit_log = audit_log

    async def check_call(
        self, caller: Caller, tool: str, arguments: Any, message: Message | None = None, request_id: str | int = 0
    ) -> None:
        """A tool call, before it reaches the server: the profile's rules, then the hook (`Input`).

        `message` is the JSON-RPC request as the client sent it (the relay); built from the call,
        with `request_id`, otherwise. Raises PolicyDenied (its caller audits the denial).
        """
        with tracing.span("policy", attributes={"pier.policy.hook": bool(caller.policy_url)}):
            if caller.tool_rules is not None:
                caller.tool_rules.check(tool, caller.user, caller.key_id, caller.groups)
            if caller.policy_url:  # the message is built only for a hook that reads it
                params = {"name": tool, "arguments": arguments}
                request = message or {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
                await self.policer.check(caller.policy_url, "Input", [request], caller.context())

    async def check_messages(self, caller: Caller, messages: list[Message]) -> None:
        """Messages other than tool calls, before they reach the server (hook `Input`)."""
        await self.policer.check(caller.policy_url, "Input", messages, caller.context())

    async def check_output(self, caller: Caller, message: Message) -> None:
        """A message from the server, before the caller gets it (hook `Output`); raises PolicyDenied."""
        await self.policer.check(caller.policy_url, "Output", [message], caller.context())

    def audit(
        self, caller: Caller, tool: str, arguments: Any, outcome: str, started: float,
        denied: PolicyDenied | None = None,
    ) -> None:  # fmt: skip
        """The call's audit record (`started`: its time.monotonic() start, or 0 for a refusal)."""
        if self.audit_log:
            audit.record(
                who=caller.identity, user=caller.user, profile=caller.profile, tool=tool, arguments=arguments,
                decision="deny" if denied else "allow", decided_by=denied.details["decided_by"] if denied else None,
                outcome=outcome, duration_ms=(time.monotonic() - started) * 1000 if started else 0.0, via=caller.via,
            )  # fmt: skip
