"""`pier connect URL`: a local stdio MCP server relaying to a session on the router.

Desktop agents (Claude Desktop, Cursor, IDEs) launch stdio servers only; configure
`pier connect https://pier.example.com/v1/users/alice/servers/github/mcp` as one and the agent
talks to alice's remote session. Reconnects with backoff when the router is away, and
initializes again by itself when the router (or the session) was replaced.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from pathlib import Path

import aiohttp

from pier.core.jsonrpc import PARSE_ERROR, Message, dumps, error_response, loads
from pier.core.mcp_client import HttpSession

log = logging.getLogger("pier.cli.connect")

_MAX_LINE = 16 * 1024 * 1024


def _write(message: Message) -> None:
    # Messages are small and the agent reads them at once; a plain write keeps their order.
    sys.stdout.buffer.write(dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def connect(
    url: str,
    token: str | None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    retry_for_s: float = 300.0,
) -> int:
    """Relay stdin/stdout to `url` until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def deliver(message: Message) -> None:
        _write(message)

    context: ssl.SSLContext | bool = True
    if ca is not None or cert is not None:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as http:
        session = HttpSession(http, url, deliver, headers, context, retry_for_s)
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                try:
                    message = loads(line)
                except ValueError:
                    _write(error_response(None, PARSE_ERROR, "Parse error: not JSON"))
                    continue
                # Each message on its own task: a long call must not hold up the ones after it.
                task = asyncio.create_task(session.send(message))
                sending.add(task)
                task.add_done_callback(sending.discard)
            if sending:
                await asyncio.wait(sending, timeout=5)
        finally:
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            await session.close()
    return 0
