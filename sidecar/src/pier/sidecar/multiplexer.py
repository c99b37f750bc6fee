"""Many MCP clients on one stdio session, without cross-talk.

Every request forwarded to the server gets a fresh upstream id (and, when it asked for
progress, a fresh progress token equal to that id); responses and progress are mapped back
to the caller's own id and token. What the server sends during a call without naming it —
server→client requests, log messages — goes to the newest call in flight that can take it
(over stdio nothing says which call it serves, and the newest is the best guess); only what
belongs to no call is broadcast (list changes, resource updates, logs while nothing runs).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pier.core.errors import PierError
from pier.core.jsonrpc import (
    METHOD_NOT_FOUND,
    REQUEST_CANCELLED,
    Message,
    RequestId,
    error_response,
    gateway_error_response,
)
from pier.core.protocol import CAPABILITY_FOR, SUBSCRIPTION_ID_KEY, log_level_allows
from pier.sidecar.clients import ClientSession

log = logging.getLogger("pier.sidecar.multiplexer")

ALL_LOGS = "debug"  # a handshake-era caller gets every log record of its calls


class Sink(Protocol):
    """Where messages tied to one request go while it runs (progress, server requests)."""

    def deliver(self, message: Message) -> None: ...


class _NoSink:
    def deliver(self, message: Message) -> None:
        pass


NO_SINK: Sink = _NoSink()


@dataclass(eq=False)
class Pending:
    """A request in flight on the server."""

    upstream_id: int
    original_id: RequestId
    method: str
    client: ClientSession | None
    sink: Sink
    original_token: Any = None
    # What the caller can be asked (server→client requests), None: nothing (the call API, the
    # bridge's own requests); and the least severe log level it wants, None: no logs.
    capabilities: dict[str, Any] | None = None
    log_level: str | None = None
    future: asyncio.Future[Message] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)
    # Called as it finishes, before its future's callbacks (which run a loop turn later): the request
    # leaves the counts at once, so whoever learns it ended (a cancellation's 202) never sees it counted.
    on_finish: Callable[[Pending], None] | None = None

    def finish(self, response: Message) -> None:
        if not self.future.done():
            self.future.set_result(response)
        if self.on_finish is not None:
            self.on_finish(self)


class Multiplexer:
    """The routing table between client ids and upstream ids."""

    def __init__(
        self,
        post: Callable[[Message], None],
        broadcast: Callable[[Message], None],
        on_tools_changed: Callable[[], None],
    ) -> None:
        self._post = post  # fire-and-forget write to the server (small control messages)
        self._broadcast = broadcast
        self._on_tools_changed = on_tools_changed
        self._ids = itertools.count(1)
        self.pending: dict[int, Pending] = {}
        self.forwarded: collections.Counter[str] = collections.Counter()  # requests sent, by method
        # Server→client requests awaiting an answer, and the call each was handed to.
        self._server_requests: dict[RequestId, Pending] = {}

    # -- client → server -------------------------------------------------------------------

    def register(
        self,
        message: Message,
        client: ClientSession | None,
        sink: Sink,
        track_progress: bool = False,
        capabilities: dict[str, Any] | None = None,
        log_level: str | None = None,
    ) -> tuple[Pending, Message]:
        """Give a client request an upstream id; returns its Pending and the message to send."""
        upstream_id = next(self._ids)
        outgoing = {**message, "id": upstream_id}
        params = message.get("params")
        original_token = None
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                original_token = meta["progressToken"]
                outgoing["params"] = {**params, "_meta": {**meta, "progressToken": upstream_id}}
            elif track_progress:
                outgoing["params"] = {**params, "_meta": {**(meta or {}), "progressToken": upstream_id}}
        pending = Pending(
            upstream_id, message["id"], message["method"], client, sink, original_token, capabilities, log_level
        )
        self.pending[upstream_id] = pending
        self.forwarded[pending.method] += 1
        return pending, outgoing

    def discard(self, pending: Pending) -> None:
        """Forget a request that never reached the server."""
        self.pending.pop(pending.upstream_id, None)

    def cancel(self, pending: Pending, reason: str) -> None:
        """Tell the server to stop a request, and answer its caller now."""
        if self.pending.pop(pending.upstream_id, None) is None:
            return
        self._post(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": pending.upstream_id, "reason": reason},
            }
        )
        pending.finish(error_response(pending.original_id, REQUEST_CANCELLED, f"Request cancelled: {reason}"))

    def client_notification(self, client: ClientSession, message: Message) -> None:
        """Forward a client notification, rewritten into the server's id space."""
        method = message["method"]
        params = message.get("params") or {}
        if method == "notifications/initialized":
            return  # the bridge initialized the server once; clients' handshakes end here
        if method == "notifications/cancelled":
            target = self.find(client, params.get("requestId"))
            if target is not None:
                self.cancel(target, str(params.get("reason") or "cancelled by client"))
            return
        self._post(message)

    def client_response(self, client: ClientSession, message: Message) -> None:
        """Forward a client's answer to a server→client request, if it was asked of that client."""
        owner = self._server_requests.get(message["id"])
        if owner is None or owner.client is not client:
            log.warning("dropped a response to a request this client was not asked", extra={"client": client.id})
            return
        del self._server_requests[message["id"]]
        self._post(message)

    def answer_server_request(self, request_id: RequestId, result: Any = None, error: Message | None = None) -> bool:
        """Answer a server→client request on its caller's behalf (input a 2026-07-28 caller sent
        with its retry); False when the server no longer waits for it."""
        if self._server_requests.pop(request_id, None) is None:
            return False
        answer = {"jsonrpc": "2.0", "id": request_id}
        self._post({**answer, "error": error} if error is not None else {**answer, "result": result or {}})
        return True

    def withdraw_server_requests(self, pending: Pending, reason: str) -> None:
        """Refuse the server's requests still waiting on `pending`'s caller (it will not answer)."""
        for request_id in [rid for rid, owner in self._server_requests.items() if owner is pending]:
            del self._server_requests[request_id]
            self._post(error_response(request_id, REQUEST_CANCELLED, reason))

    def find(self, client: ClientSession, original_id: RequestId | None) -> Pending | None:
        for pending in self.pending.values():
            if pending.client is client and pending.original_id == original_id:
                return pending
        return None

    def cancel_client(self, client: ClientSession, reason: str) -> None:
        """A client went away: stop everything it had in flight."""
        for pending in [p for p in self.pending.values() if p.client is client]:
            self.cancel(pending, reason)
        for request_id in [rid for rid, owner in self._server_requests.items() if owner.client is client]:
            self._post(error_response(request_id, REQUEST_CANCELLED, "client session ended"))
            del self._server_requests[request_id]

    def fail_all(self, error: PierError, blame_newest: bool = False) -> None:
        """The server run ended: every request in flight fails now, with the reason.

        With `blame_newest` (the server ended by itself), the newest caller's request is marked
        `suspect`: a server usually dies of the last thing it was asked, so that request is never
        retried automatically (it would only crash the server again, and the calls retried with
        it); the others are innocent bystanders.
        """
        pending, self.pending = self.pending, {}
        self._server_requests.clear()
        callers = [item for item in pending.values() if item.sink is not NO_SINK]
        newest = max(callers, key=lambda p: p.started) if callers and blame_newest else None
        for item in pending.values():
            details = {**error.details, "suspect": item is newest}
            item.finish(gateway_error_response(item.original_id, PierError(error.code, error.message, details)))

    # -- server → client -------------------------------------------------------------------

    def server_message(self, message: Message) -> None:
        """Route one message from the server."""
        if "method" not in message:
            self._server_response(message)
        elif "id" in message:
            self._server_request(message)
        else:
            self._server_notification(message)

    def _server_response(self, message: Message) -> None:
        upstream_id = message.get("id")
        pending = self.pending.pop(upstream_id, None) if isinstance(upstream_id, int) else None
        if pending is None:
            # Late answer to a cancelled request, or a server bug; either way nobody waits for it.
            log.debug("response for unknown request id", extra={"upstream_id": upstream_id})
            return
        pending.finish({**message, "id": pending.original_id})

    def _server_notification(self, message: Message) -> None:
        method = message["method"]
        params = message.get("params") or {}
        if method == "notifications/progress":
            token = params.get("progressToken")
            pending = self.pending.get(token) if isinstance(token, int) else None
            if pending is not None:
                if pending.original_token is not None:
                    message = {**message, "params": {**params, "progressToken": pending.original_token}}
                pending.sink.deliver(message)
            return
        if method == "notifications/cancelled":
            # The server withdrew one of its own requests: tell the caller it asked.
            request_id = params.get("requestId")
            owner = self._server_requests.pop(request_id, None) if isinstance(request_id, int | str) else None
            if owner is not None:
                owner.sink.deliver(message)
            return
        meta = params.get("_meta")
        meta = meta if isinstance(meta, dict) else {}
        subscription = meta.get(SUBSCRIPTION_ID_KEY)
        if isinstance(subscription, int) and subscription in self.pending:
            # A 2026-07-28 server's notification for a subscriptions/listen passed through to it.
            listen = self.pending[subscription]
            meta = {**meta, SUBSCRIPTION_ID_KEY: listen.original_id}
            listen.sink.deliver({**message, "params": {**params, "_meta": meta}})
            return
        if method == "notifications/message":
            caller = self._newest(lambda p: p.sink is not NO_SINK)
            if caller is not None:
                # It belongs to the call in flight: that caller's stream, if it asked for this level.
                if log_level_allows(caller.log_level, params.get("level")):
                    caller.sink.deliver(message)
                return
        if method == "notifications/tools/list_changed":
            self._on_tools_changed()
        self._broadcast(message)

    def _newest(self, fits: Callable[[Pending], bool]) -> Pending | None:
        best: Pending | None = None
        for pending in self.pending.values():
            if fits(pending) and (best is None or pending.started > best.started):
                best = pending
        return best

    def _server_request(self, message: Message) -> None:
        method = message["method"]
        if method == "ping":
            self._post({"jsonrpc": "2.0", "id": message["id"], "result": {}})
            return
        capability = CAPABILITY_FOR.get(method)
        # Over stdio a server request does not say which call it serves; the newest one in flight
        # is the best guess, and it is always a caller that is waiting for the server.
        target = self._newest(
            lambda p: p.capabilities is not None and (capability is None or capability in p.capabilities)
        )
        if target is None:
            self._post(
                error_response(message["id"], METHOD_NOT_FOUND, f"no connected client can handle {method} right now")
            )
            return
        self._server_requests[message["id"]] = target
        target.sink.deliver(message)
