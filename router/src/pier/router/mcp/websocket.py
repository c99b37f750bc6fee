"""`/v1/users/{user}/servers/{server}/ws`: the session's raw JSON-RPC stream over a WebSocket.

minibridge's backend speaks WebSocket; here each text frame is one JSON-RPC message (or a batch)
each way, with the same auth, rate limit, tool rules, policy hook and audit as the MCP relay.
Behind it the router holds an MCP Streamable HTTP session with the user's bridge.

Work is bounded: a socket has at most `ws_max_in_flight` requests in flight, a user at most
`ws_max_in_flight_per_user` over all their sockets; a request beyond either is answered at once
with `CALL_QUEUE_FULL` (as the session's own call queue does), never queued without bound. Each
socket reaches the bridge over a connection pool of its own, no larger than its request limit,
and closed with the socket: a flood costs a bounded number of connections, all released after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

from pier.core import tracing
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.jsonrpc import PARSE_ERROR, Message, TooDeep, dumps, error_response, gateway_error_response
from pier.core.mcp_client import HttpSession
from pier.core.policy import PolicyDenied
from pier.router.backends.base import Session
from pier.router.config import RouterSettings
from pier.router.mcp.messages import Checkpoint, parse_messages
from pier.router.shared import USERS, user_of
from pier.router.state import Router, router_of


class InFlight:
    """Counts of requests in flight, by key (a user), with a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: collections.Counter[str] = collections.Counter()

    def try_take(self, key: str) -> bool:
        if self.counts[key] >= self.limit:
            return False
        self.counts[key] += 1
        return True

    def give_back(self, key: str) -> None:
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]


USER_IN_FLIGHT = web.AppKey("ws_user_in_flight", InFlight)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    router = router_of(request)
    user, server = user_of(request), request.match_info["server"]
    caller, profile = await router.ingress.admit(request, user, server, "ws")
    session = await router.backend.acquire(user, profile)
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=router.settings.max_body_bytes)
    await ws.prepare(request)
    socket = Socket(router, ws, Checkpoint(router.ingress, caller), profile, session, request.app[USER_IN_FLIGHT])
    try:
        with router.streaming():
            async for frame in ws:
                if frame.type == WSMsgType.TEXT:
                    await socket.receive(frame.data)
    finally:
        await socket.close()
    return ws


class Socket:
    """One WebSocket and the Streamable HTTP session behind it, with its bounded work."""

    def __init__(
        self, router: Router, ws: web.WebSocketResponse, checkpoint: Checkpoint, profile: Profile, session: Session,
        per_user: InFlight,
    ) -> None:  # fmt: skip
        self.router = router
        self.ws = ws
        self.checkpoint = checkpoint
        self.profile = profile
        self.user = checkpoint.caller.user
        self.per_socket = router.settings.ws_max_in_flight
        self.per_user = per_user
        # Its own pool: at most one connection per request in flight, plus the GET stream and the
        # loop's own (notifications, responses); all closed when the socket ends.
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.per_socket + 2, keepalive_timeout=30), auto_decompress=False
        )
        endpoint = session.endpoint
        self.upstream = HttpSession(
            self.http, endpoint.url + "/mcp", self.deliver, endpoint.headers(), router.bridge_ssl
        )
        self.requests: set[asyncio.Task[None]] = set()

    async def reply(self, message: Message) -> None:
        if not self.ws.closed:
            await self.ws.send_str(dumps(message).decode())

    async def deliver(self, message: Message) -> None:
        """A message from the bridge, through the output policy, to the socket."""
        checked = await self.checkpoint.check_output(message) if self.checkpoint.inspects_output else message
        if checked:
            await self.reply(checked)

    async def receive(self, text: str) -> None:
        """One text frame: a message or a batch, checked, then sent on."""
        try:
            messages = parse_messages(text.encode())
        except TooDeep as exc:
            await self.reply(error_response(None, PARSE_ERROR, f"Parse error: {exc}"))
            return
        if messages is None:
            await self.reply(error_response(None, PARSE_ERROR, "Parse error: not JSON"))
            return
        try:
            await self.checkpoint.check_input(messages)
        except PolicyDenied as denied:
            for message in messages:
                if "id" in message and "method" in message:
                    await self.reply(gateway_error_response(message["id"], denied))
            return
        for message in messages:
            if not ("id" in message and "method" in message):
                # Notifications and answers to the server are quick: sent in turn, so a
                # flood of them is slowed to the bridge's pace (back-pressure), not queued.
                await self.send(message)
            elif len(self.requests) >= self.per_socket or not self.per_user.try_take(self.user):
                await self.reply(
                    gateway_error_response(message["id"], _queue_full(self.per_socket, self.per_user.limit))
                )
            else:
                # Each request on its own task: a long call must not hold up the ones after it.
                self.start_request(message)

    async def send(self, message: Message) -> None:
        with _mcp_span(message):
            async with self.router.backend.use(self.user, self.profile):
                await self.upstream.send(message)

    def start_request(self, message: Message) -> None:
        task = asyncio.create_task(self.send(message))
        self.requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        self.per_user.give_back(self.user)

    async def close(self) -> None:
        """Cancel what is in flight, end the session behind the socket, close its pool."""
        for task in self.requests:
            task.cancel()
        await asyncio.gather(*self.requests, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.upstream.close()
        await self.http.close()


def _mcp_span(message: Message) -> tracing.Scope:
    """A request's MCP server span (its parent the caller's `params._meta.traceparent`, else the socket's)."""
    if "id" not in message or "method" not in message:
        return tracing.nothing()
    return tracing.mcp_server_span(message, {"network.protocol.name": "websocket"})


def _queue_full(per_socket: int, per_user: int) -> PierError:
    return PierError(
        "CALL_QUEUE_FULL",
        "too many requests in flight on this WebSocket or for this user; retry when some have been answered",
        {"max_in_flight_per_socket": per_socket, "max_in_flight_per_user": per_user},
    )


def add_routes(v1: web.Application, settings: RouterSettings) -> None:
    v1[USER_IN_FLIGHT] = InFlight(settings.ws_max_in_flight_per_user)
    for user in USERS:
        v1.router.add_get(f"{user}/servers/{{server}}/ws", websocket)
