"""What Pier calls out to, as real HTTP servers on loopback: a webhook receiver and a policy service."""

from __future__ import annotations

import json

from aiohttp import web


class Receiver:
    """A webhook endpoint (a real HTTP server) that records what it gets."""

    def __init__(self, fail_with: int | None = None) -> None:
        self.fail_with = fail_with
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=self.fail_with or 204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


POLICY_TOKEN = "policy-token-do-not-log"


class PolicyServer:
    """A policy service: allows everything but calls of `counter`, and results that mention 'secret'."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.auth: list[str | None] = []
        self.url = ""

    async def police(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        self.auth.append(request.headers.get("Authorization"))
        for raw in body["messages"]:
            message = json.loads(raw)
            if (message.get("params") or {}).get("name") == "counter":
                return web.json_response({"decision": "Deny", "reasons": ["counter is not allowed for you"]})
            if body["type"] == "Output" and "secret" in raw:
                return web.json_response({"decision": "Deny", "reasons": ["the result leaks a secret"]})
        return web.json_response({"decision": "Allow"})

    async def __aenter__(self) -> PolicyServer:
        app = web.Application()
        app.router.add_post("/police", self.police)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/police"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
