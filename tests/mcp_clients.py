"""Two real MCP clients behind one small interface, for tests that walk a client through events: the
`mcp` SDK's (2025-11-25, its session id read off the router's answers) and the TypeScript SDK's
(`tests/router/sdk_client.mjs` in a node process, one command at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.servers import ROOT, text_of

SDK_CLIENT = ["node", str(ROOT / "tests" / "router" / "sdk_client.mjs")]


class TsClient:
    """The TypeScript SDK's client in a node process, one command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, session: str) -> None:
        self.proc = proc
        self.session = session

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, session: str | None = None) -> AsyncIterator[TsClient]:
        proc = await asyncio.create_subprocess_exec(
            *SDK_CLIENT, url, *([session] if session else []), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            hello = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert hello["ok"], hello
            yield cls(proc, str(hello["session"] or session))
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def do(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await self.proc.stdin.drain()
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))
        return answer

    async def call(self, name: str, **arguments: Any) -> str:
        answer = await self.do("call", name=name, arguments=arguments)
        assert answer["ok"], answer
        assert not answer["isError"], answer
        return str(answer["text"])


class PyClient:
    """The `mcp` SDK's client (2025-11-25), its session id read off the router's answers."""

    def __init__(self, client: Client, ids: set[str]) -> None:
        self.client = client
        self.ids = ids

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[PyClient]:
        ids: set[str] = set()

        async def note(response: httpx2.Response) -> None:
            if "Mcp-Session-Id" in response.headers:
                ids.add(response.headers["Mcp-Session-Id"])

        async with (
            httpx2.AsyncClient(event_hooks={"response": [note]}, timeout=60) as http,
            Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
        ):
            yield cls(client, ids)

    @property
    def session(self) -> str:
        [session] = self.ids  # one session all along: never a second one
        return session

    async def call(self, name: str, **arguments: Any) -> str:
        return text_of(await self.client.call_tool(name, arguments))


def counted(text: str) -> int:
    return int(json.loads(text)["result"]) if text.startswith("{") else int(text)


@contextlib.asynccontextmanager
async def connect(kind: str, url: str) -> AsyncIterator[TsClient | PyClient]:
    if kind == "python":
        async with PyClient.connect(url) as py:
            yield py
    else:
        async with TsClient.connect(url) as ts:
            yield ts
            assert (await ts.do("terminate"))["ok"]  # the app ends its session (the SDK's close does not)
