"""`subscriptions/listen` (2026-07-28) onto a handshake-era server, served by the bridge itself.

A handshake-era server announces list changes and resource updates as notifications that belong to
no call; the bridge offers each to every listener (`broadcast`), which passes on what its caller
asked for, tagged with the caller's subscription id. Resource subscriptions are made on the server
once for all listeners of a URI (`resources/subscribe`), and dropped with the last of them. A
stream the bridge ends (it is stopping) gets its graceful completion (#2953): the listen request's
result, carrying its subscription id, as its last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from pier.core.callapi import Output
from pier.core.jsonrpc import Message
from pier.core.protocol import SERVER_INFO_KEY, SUBSCRIPTION_ID_KEY
from pier.core.web import KEEPALIVE_S, PEER_POLL_S, SSE_HEADERS, peer_gone, sse_message, write_or_gone
from pier.sidecar.upstream import BRIDGE_INFO, Upstream

log = logging.getLogger("pier.sidecar.subscriptions")

LIST_CHANGED = {
    "toolsListChanged": ("notifications/tools/list_changed", "tools"),
    "promptsListChanged": ("notifications/prompts/list_changed", "prompts"),
    "resourcesListChanged": ("notifications/resources/list_changed", "resources"),
}


def listen_completed(request_id: Any, upstream: Upstream) -> Message:
    """A subscriptions/listen's graceful end (#2953): its result, tagged with its subscription id."""
    info = (upstream.init_result or {}).get("serverInfo") or BRIDGE_INFO
    meta = {SUBSCRIPTION_ID_KEY: request_id, SERVER_INFO_KEY: info}
    return {"jsonrpc": "2.0", "id": request_id, "result": {"resultType": "complete", "_meta": meta}}


class Listener:
    """One `subscriptions/listen` stream served by the bridge (a handshake-era server)."""

    def __init__(self, request_id: Any, wanted: dict[str, Any]) -> None:
        self.request_id = request_id
        self.wanted = wanted
        self.uris = {str(u) for u in wanted.get("resourceSubscriptions") or [] if isinstance(u, str)}
        self.queue: asyncio.Queue[Message] = asyncio.Queue(1000)

    def offer(self, message: Message) -> None:
        method = message.get("method")
        params = message.get("params") or {}
        if method == "notifications/resources/updated":
            if params.get("uri") not in self.uris:
                return
        elif not any(self.wanted.get(flag) and method == name for flag, (name, _) in LIST_CHANGED.items()):
            return
        tagged = {
            **message,
            "params": {**params, "_meta": {**(params.get("_meta") or {}), SUBSCRIPTION_ID_KEY: self.request_id}},
        }
        if self.queue.full():
            log.warning("a subscriptions/listen caller is not reading; dropped a notification")
            return
        self.queue.put_nowait(tagged)


class Subscriptions:
    """The bridge's `subscriptions/listen` streams, and the resource subscriptions they hold on the server."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.listeners: set[Listener] = set()
        self._subscribed: dict[str, int] = {}  # resource URI → listeners asking for it

    def broadcast(self, message: Message) -> None:
        """A server notification that belongs to no call: each listener takes what it asked for."""
        for listener in self.listeners:
            listener.offer(message)

    async def listen(self, request: web.Request, message: Message, output: Output | None) -> web.StreamResponse:
        """Serve one `subscriptions/listen`: the acknowledgement, then notifications until the caller leaves."""
        listener = Listener(message["id"], self._accepted(message))
        ack = {
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {SUBSCRIPTION_ID_KEY: message["id"]}, "notifications": listener.wanted},
        }
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        if not await write_or_gone(response, sse_message(ack)):
            return response
        self.listeners.add(listener)
        self._subscribe(listener.uris)
        try:
            closing = await self._pump(request, response, listener, output)
        finally:
            self.listeners.discard(listener)
            self._unsubscribe(listener.uris)
        if closing:
            completed = listen_completed(message["id"], self.upstream)
            if output is not None:
                completed = await output(completed) or completed
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await response.write_eof(sse_message(completed))
        return response

    def _accepted(self, message: Message) -> dict[str, Any]:
        """What the caller asked for that the server can announce."""
        params = message.get("params") or {}
        wanted = params.get("notifications")
        wanted = wanted if isinstance(wanted, dict) else {}
        server_caps = (self.upstream.init_result or {}).get("capabilities") or {}
        accepted: dict[str, Any] = {
            flag: True
            for flag, (_, capability) in LIST_CHANGED.items()
            if wanted.get(flag) and capability in server_caps
        }
        uris = [u for u in wanted.get("resourceSubscriptions") or [] if isinstance(u, str)]
        if uris and (server_caps.get("resources") or {}).get("subscribe"):
            accepted["resourceSubscriptions"] = uris
        return accepted

    async def _pump(
        self, request: web.Request, response: web.StreamResponse, listener: Listener, output: Output | None
    ) -> bool:
        """Notifications to the stream (keepalives when quiet) until the caller leaves (False) or the
        bridge stops (True)."""
        last_write = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(PEER_POLL_S):
                    note = await listener.queue.get()
            except TimeoutError:
                if peer_gone(request):
                    return False
                if time.monotonic() - last_write >= KEEPALIVE_S:
                    if not await write_or_gone(response, b": keepalive\n\n"):
                        return False
                    last_write = time.monotonic()
                continue
            if not note:
                return True  # the bridge is shutting down
            if output is not None:
                note = await output(note)
                if not note:
                    continue
            if not await write_or_gone(response, sse_message(note)):
                return False
            last_write = time.monotonic()

    def _subscribe(self, uris: set[str]) -> None:
        for uri in uris:
            self._subscribed[uri] = self._subscribed.get(uri, 0) + 1
            if self._subscribed[uri] == 1:
                self.upstream.notify_server("resources/subscribe", {"uri": uri})

    def _unsubscribe(self, uris: set[str]) -> None:
        for uri in uris:
            self._subscribed[uri] -= 1
            if not self._subscribed[uri]:
                del self._subscribed[uri]
                self.upstream.notify_server("resources/unsubscribe", {"uri": uri})

    def close(self) -> None:
        """The bridge is stopping: every stream ends."""
        for listener in self.listeners:
            with contextlib.suppress(asyncio.QueueFull):
                listener.queue.put_nowait({})
