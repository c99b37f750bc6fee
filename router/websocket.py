"""`/v1/users/{user}/servers/{server}/ws`: the session's raw JSON-RPC stream over a WebSocket.

minibridge's backend speaks WebSocket; here each text frame is one JSON-RPC message (or a batch)
each way, with the same auth, rate limit, tool rules, policy hook and audit as the MCP relay.
Behind it the router holds an MCP Streamable HTTP session with the user's bridge.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

from pier.jsonrpc import PARSE_ERROR, Message, dumps, error_response, gateway_error_response
from pier.mcp_client import HttpSession
from pier.policy import PolicyDenied
from pier.router.context import ROUTER, principal
from pier.router.relay import Exchange, parse_messages


async def websocket(request: web.Request) -> web.WebSocketResponse:
    router = request.app[ROUTER]
    user, server = request.match_info["user"], request.match_info["server"]
    profile = await router.target(request, user, server)
    session = await router.backend.acquire(user, profile)
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=router.settings.max_body_bytes)
    await ws.prepare(request)
    exchange = Exchange(router, principal(request), user, profile, "ws")

    async def deliver(message: Message) -> None:
        checked = await exchange.check_output(message) if exchange.inspects_output else message
        if checked and not ws.closed:
            await ws.send_str(dumps(checked).decode())

    upstream = HttpSession(
        router.http, session.endpoint.url + "/mcp", deliver, session.endpoint.headers(), router.bridge.ssl
    )
    sending: set[asyncio.Task[None]] = set()

    async def send(message: Message) -> None:
        async with router.backend.use(user, profile):
            await upstream.send(message)

    try:
        with router.streaming():
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                messages = parse_messages(frame.data.encode())
                if messages is None:
                    await ws.send_str(dumps(error_response(None, PARSE_ERROR, "Parse error: not JSON")).decode())
                    continue
                try:
                    await exchange.check_input(messages)
                except PolicyDenied as denied:
                    for message in messages:
                        if "id" in message and "method" in message:
                            await ws.send_str(dumps(gateway_error_response(message["id"], denied)).decode())
                    continue
                for message in messages:
                    # Each message on its own task: a long call must not hold up the ones after it.
                    task = asyncio.create_task(send(message))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
    finally:
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await upstream.close()
    return ws


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/users/{user}/servers/{server}/ws", websocket)
