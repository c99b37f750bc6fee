"""Multi round-trip requests (2026-07-28 MRTR) onto a handshake-era server: a call parked while its
caller gathers the input the server asked for.

Over stdio a handshake-era server asks its client mid-call (sampling, elicitation, roots) and waits.
A 2026-07-28 caller cannot be asked on its request's stream, so the bridge parks the call on the
server (`InputRequests.park`) and answers `InputRequiredResult`: what the server asked, and a
`requestState` token. The caller's retry with `inputResponses` and that token (`InputRequests.resume`)
hands each answer to the server request waiting for it, and the same call goes on — on the same
session, run once. A token is unguessable, bound to the request's method and name, and expires
(`input_wait_s`): a parked call whose caller never comes back is cancelled (`expire`).
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pier.core.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, Message, error_response, is_request
from pier.core.protocol import CAPABILITY_FOR, LOG_LEVEL_KEY, meta_of
from pier.sidecar.multiplexer import Multiplexer, Pending


@dataclass(eq=False)
class InputWait:
    """A call parked on the server while its caller gathers the input the server asked for."""

    token: str
    pending: Pending
    method: str
    name: Any
    deadline: float
    asked: dict[str, Message] = field(default_factory=dict)  # key → the server's request
    final: Message | None = None  # the call ended while parked
    keys: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # Sink while parked: the server's further requests are asked at the next round.
    def deliver(self, message: Message) -> None:
        if is_request(message):
            self.ask(message)

    def deliver_final(self, message: Message) -> None:
        self.final = message

    def ask(self, message: Message) -> None:
        self.asked[f"input-{next(self.keys)}"] = message

    def result(self) -> dict[str, Any]:
        """The InputRequiredResult for what is still unanswered."""
        requests = {key: {"method": m["method"], "params": m.get("params") or {}} for key, m in self.asked.items()}
        return {"resultType": "input_required", "inputRequests": requests, "requestState": self.token}


class InputRequests:
    """The calls parked on this bridge's server, by `requestState` token."""

    def __init__(self, mux: Multiplexer, input_wait_s: float) -> None:
        self.mux = mux
        self.input_wait_s = input_wait_s
        self.waits: dict[str, InputWait] = {}

    def park(self, message: Message, pending: Pending, server_request: Message) -> InputWait:
        """The server asked `server_request` during the call `pending`: park it (once), ask the caller."""
        wait = next((w for w in self.waits.values() if w.pending is pending), None)
        if wait is None:
            params = message.get("params") or {}
            wait = InputWait(
                secrets.token_urlsafe(24), pending, message["method"], params.get("name", params.get("uri")),
                time.monotonic() + self.input_wait_s,
            )  # fmt: skip
            self.waits[wait.token] = wait
        wait.ask(server_request)
        pending.sink = wait
        return wait

    def resume(self, message: Message, capabilities: dict[str, Any]) -> InputWait | Message:
        """A caller's retry with `inputResponses` and `requestState`: its answers go to the server.

        Returns the parked call to go on with (no longer parked: its answer, or what comes before it,
        is the retry's), or a message to answer at once: an error for a token that names no parked
        call of this request, or another InputRequiredResult while answers are still missing.
        """
        params = message.get("params") or {}
        token = params.get("requestState")
        wait = self.waits.get(token) if isinstance(token, str) else None
        if wait is None or wait.method != message["method"] or wait.name != params.get("name", params.get("uri")):
            # Unknown, tampered, expired or for another request: never a way into someone's call.
            return error_response(message["id"], INVALID_PARAMS, "Invalid params: unknown or expired requestState")
        answers = params.get("inputResponses")
        self._answer(wait, answers if isinstance(answers, dict) else {}, capabilities)
        pending = wait.pending
        pending.original_id = message["id"]
        pending.capabilities = capabilities
        meta = meta_of(message)
        pending.log_level = meta.get(LOG_LEVEL_KEY) if isinstance(meta.get(LOG_LEVEL_KEY), str) else None
        if "progressToken" in meta:
            pending.original_token = meta["progressToken"]
        if wait.final is None and wait.asked:
            # Still missing some answers: ask again for those (the spec's missing-input rule).
            wait.deadline = time.monotonic() + self.input_wait_s
            return {"jsonrpc": "2.0", "id": message["id"], "result": wait.result()}
        del self.waits[wait.token]
        return wait

    def _answer(self, wait: InputWait, answers: dict[str, Any], capabilities: dict[str, Any]) -> None:
        """Hand the caller's answers to the server requests waiting for them."""
        for key in [k for k in wait.asked if k in answers]:
            asked = wait.asked.pop(key)
            answer = answers[key]
            if not isinstance(answer, dict):
                self.mux.answer_server_request(
                    asked["id"], error={"code": INVALID_PARAMS, "message": "invalid input response"}
                )
            elif _declined(asked, capabilities):
                self.mux.answer_server_request(
                    asked["id"], error={"code": METHOD_NOT_FOUND, "message": "not supported by the client"}
                )
            else:
                self.mux.answer_server_request(asked["id"], answer)

    def expire(self) -> None:
        """Cancel parked calls whose caller never came back with the input."""
        now = time.monotonic()
        for token, wait in list(self.waits.items()):
            if wait.final is not None or now > wait.deadline or wait.pending.future.done():
                del self.waits[token]
                if not wait.pending.future.done():
                    self.mux.withdraw_server_requests(wait.pending, "the caller never sent the input")
                    self.mux.cancel(wait.pending, "the caller never sent the input")


def _declined(asked: Message, capabilities: dict[str, Any]) -> bool:
    """The caller answered a request it declared it cannot take (no such capability)."""
    capability = CAPABILITY_FOR.get(asked.get("method", ""))
    return capability is not None and capability not in capabilities
