"""JSON-RPC messages as the MCP wing receives them: a caller's body parsed once, and the checkpoint
each message passes on its way to the bridge and back (`Checkpoint`), for the relay and the
WebSocket alike."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from pier.core.errors import PierError
from pier.core.jsonrpc import PARSE_ERROR, Message, TooDeep, error_response, gateway_error_response, parse
from pier.core.policy import Caller, PolicyDenied
from pier.core.protocol import CLIENT_CAPABILITIES_KEY, meta_of
from pier.core.web import json_response
from pier.router.auth.ingress import Ingress

URL_ELICITATION_REQUIRED = -32042  # 2025-11-25: the request needs a URL-mode elicitation completed first
ELICITATION_REVISION = "2025-11-25"  # the revision that has it (2026-07-28 asks through input_required)
CONNECT_STATE = "pier-connect:"  # the requestState of Pier's own connect elicitation (2026-07-28)


class Checkpoint:
    """What one relayed POST (or WebSocket) passes, message by message: each message's rules and policy
    on the way in, each answer's policy on the way out, each tool call's audit and accounting (the
    ingress pipeline's steps 3 and 5, at the level of JSON-RPC messages)."""

    def __init__(self, ingress: Ingress, caller: Caller) -> None:
        self.ingress = ingress
        self.caller = caller
        self.tool_calls: dict[Any, tuple[str, Any, float]] = {}  # request id → (tool, arguments, start)

    @property
    def inspects_output(self) -> bool:
        return bool(self.caller.policy_url or self.tool_calls)

    async def check_input(self, messages: list[Message]) -> None:
        """Built-in tool rules, then the policy hook; raises PolicyDenied (nothing is forwarded)."""
        for message in messages:
            if message.get("method") == "tools/call":
                params = message.get("params") or {}
                tool, arguments = str(params.get("name")), params.get("arguments") or {}
                started = time.monotonic()
                try:
                    await self.ingress.gate.check_call(self.caller, tool, arguments, message)
                except PolicyDenied as denied:
                    self.ingress.finish(self.caller, tool, arguments, denied.code, started, denied)
                    raise
                self.tool_calls[message.get("id")] = (tool, arguments, started)
        others = [m for m in messages if m.get("method") != "tools/call"]
        await self.ingress.gate.check_messages(self.caller, others)

    async def check_output(self, message: Message) -> Message:
        """The message to forward: itself, or an error in its place when the policy denies it."""
        try:
            await self.ingress.gate.check_output(self.caller, message)
        except PolicyDenied as denied:
            self._finish(message, denied)
            return gateway_error_response(message.get("id"), denied) if "id" in message else {}
        self._finish(message, None)
        return message

    def _finish(self, message: Message, denied: PolicyDenied | None) -> None:
        if "method" in message or message.get("id") not in self.tool_calls:
            return
        result = message.get("result")
        if isinstance(result, dict) and result.get("resultType") == "input_required":
            return  # the call goes on with the caller's retry; its audit record comes then
        tool, arguments, started = self.tool_calls.pop(message["id"])
        if denied is not None:
            outcome = denied.code
        elif "error" in message:
            data = message["error"].get("data")
            outcome = data.get("code", "rpc_error") if isinstance(data, dict) else "rpc_error"
        else:
            outcome = "tool_error" if (result or {}).get("isError") else "completed"
        self.ingress.finish(self.caller, tool, arguments, outcome, started, denied)


def connection_answer(message: Message, err: PierError, version: str | None, modern: bool) -> Message:
    """The answer to a request that needs the user's connected account first (`err`: CONNECTION_REQUIRED
    with its `connect_url`), as the client's revision can show its user the link:

    - 2025-11-25: the URL-elicitation-required error (-32042) naming the connect URL;
    - 2026-07-28, from a client that declared URL-mode elicitation: an `input_required` result asking
      `elicitation/create` in URL mode; its retry (after the user connected) is the same request;
    - otherwise: Pier's error (`data.code: CONNECTION_REQUIRED`, `data.connect_url`).
    """
    url = err.details.get("connect_url")
    text = f"Connect your account for {err.details.get('server')} to use it: open the link, sign in, and retry."
    elicitation = {"mode": "url", "message": text, "url": url, "elicitationId": secrets.token_urlsafe(12)}
    if modern:
        capabilities = meta_of(message).get(CLIENT_CAPABILITIES_KEY) or {}
        elicit = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
        if isinstance(elicit, dict) and isinstance(elicit.get("url"), dict) and url:
            request = {"method": "elicitation/create", "params": elicitation}
            result = {"resultType": "input_required", "inputRequests": {"connect": request},
                      "requestState": CONNECT_STATE + str(elicitation["elicitationId"])}  # fmt: skip
            return {"jsonrpc": "2.0", "id": message["id"], "result": result}
    elif version == ELICITATION_REVISION and url:
        return error_response(message["id"], URL_ELICITATION_REQUIRED, err.message, {"elicitations": [elicitation]})
    return gateway_error_response(message["id"], err)


def without_connect_state(message: Message) -> Message | None:
    """A 2026-07-28 retry of a request Pier answered with its connect elicitation, without the
    `requestState` and `inputResponses` that were Pier's own (the server never asked); None when it is
    no such retry."""
    params = message.get("params")
    state = params.get("requestState") if isinstance(params, dict) else None
    if not isinstance(state, str) or not state.startswith(CONNECT_STATE):
        return None
    assert isinstance(params, dict)
    kept = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
    return {**message, "params": kept}


def parse_messages(body: bytes | None) -> list[Message] | None:
    """The JSON-RPC messages of a caller's body, or None when it is not JSON (the bridge will say so).

    Raises TooDeep for JSON nested too deeply to pass on.
    """
    payload = parse_body(body)
    return None if payload is None else messages_in(payload)


def parse_body(body: bytes | None) -> Any:
    """A caller's body parsed, or None when there is none or it is not JSON; raises TooDeep."""
    if not body:
        return None
    try:
        return parse(body)
    except TooDeep:
        raise
    except ValueError:
        return None


def messages_in(payload: Any) -> list[Message]:
    """The messages of a parsed body: one, or a batch."""
    return [m for m in (payload if isinstance(payload, list) else [payload]) if isinstance(m, dict)]


def is_batch(body: bytes | None) -> bool:
    return (body or b"").lstrip()[:1] == b"["


def too_deep_response(exc: TooDeep) -> web.Response:
    """A body nested too deeply: refused here, as the bridge would refuse it."""
    return json_response(error_response(None, PARSE_ERROR, f"Parse error: {exc}"), 400)
