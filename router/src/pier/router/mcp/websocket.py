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

from pier.core.errors import PierError
from pier.core.jsonrpc import PARSE_ERROR, Message, TooDeep, dumps, error_response, gateway_error_response
from pier.core.mcp_client import HttpSession
from pier.core.policy import PolicyDenied
from pier.router.rest.v1 import USERS
from pier.router.config import RouterSettings
from pier.router.state import router_of
from pier.router.auth.ingress import user_of
from pier.router.mcp.relay import Exchange, parse_messages


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
    exchange = Exchange(router.ingress, caller)
    per_socket = router.settings.ws_max_in_flight
    per_user = request.app[USER_IN_FLIGHT]

    async def reply(message: Message) -> None:
        if not ws.closed:
            await ws.send_str(dumps(message).decode())

    async def deliver(message: Message) -> None:
        checked = await exchange.check_output(message) if exchange.inspects_output else message
        if checked:
            await reply(checked)

    # Its own pool: at most one connection per request in flight, plus the GET stream and the
    # loop's own (notifications, responses); all closed when the socket ends.
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=per_socket + 2, keepalive_timeout=30), auto_decompress=False
    )
    upstream = HttpSession(http, session.endpoint.url + "/mcp", deliver, session.endpoint.headers(), router.bridge_ssl)
    requests: set[asyncio.Task[None]] = set()

    async def send(message: Message) -> None:
        async with router.backend.use(user, profile):
            await upstream.send(message)

    def start_request(message: Message) -> None:
        task = asyncio.create_task(send(message))
        requests.add(task)

        def done(task: asyncio.Task[None]) -> None:
            requests.discard(task)
            per_user.give_back(user)

        task.add_done_callback(done)

    try:
        with router.streaming():
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                try:
                    messages = parse_messages(frame.data.encode())
                except TooDeep as exc:
                    await reply(error_response(None, PARSE_ERROR, f"Parse error: {exc}"))
                    continue
                if messages is None:
                    await reply(error_response(None, PARSE_ERROR, "Parse error: not JSON"))
                    continue
                try:
                    await exchange.check_input(messages)
                except PolicyDenied as denied:
                    for message in messages:
                        if "id" in message and "method" in message:
                            await reply(gateway_error_response(message["id"], denied))
                    continue
                for message in messages:
                    if not ("id" in message and "method" in message):
                        # Notifications and answers to the server are quick: sent in turn, so a
                        # flood of them is slowed to the bridge's pace (back-pressure), not queued.
                        await send(message)
                    elif len(requests) >= per_socket or not per_user.try_take(user):
                        await reply(gateway_error_response(message["id"], _queue_full(per_socket, per_user.limit)))
                    else:
                        # Each request on its own task: a long call must not hold up the ones after it.
                        start_request(message)
    finally:
        for task in requests:
            task.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        with contextlib.suppress(Exception):
            await upstream.close()
        await http.close()
    return ws


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
