"""Pier's demo MCP server (stdio), used by the README, `pier up` and the tests.

Tools:
- ``echo(message)``      → ``"Echo: <message>"``
- ``slow(seconds)``      sleeps, sending a progress notification every step
- ``counter(delay_s=0)`` waits ``delay_s`` then counts its own executions (not idempotent)
- ``count()``            the current count (read-only)
- ``fail(message)``      a tool error (``isError: true``)
- ``crash()``            exits the process at once
- ``env_hash(name)``     a digest of environment variable `name` (shows whose secret a session has, not the secret)

Run: ``python -m pier.examples.demo_server`` (speaks MCP over stdin/stdout).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

server = MCPServer("pier-demo", instructions="Demo server for Pier: echo, slow, counter, count, fail, crash, env_hash.")

# The execution counter lives in this process: it is the proof that a call ran exactly once.
_executions = 0

READ_ONLY = ToolAnnotations(readOnlyHint=True, idempotentHint=True, destructiveHint=False, openWorldHint=False)


@server.tool(annotations=READ_ONLY)
def echo(message: str) -> str:
    """Return the message, prefixed with "Echo: "."""
    return f"Echo: {message}"


@server.tool(annotations=READ_ONLY)
async def slow(seconds: float, ctx: Context) -> str:
    """Sleep for `seconds`, reporting progress about ten times a second."""
    await ctx.info(f"slow: sleeping {seconds} seconds")
    steps = max(1, int(seconds * 10))
    step = 0
    try:
        for step in range(1, steps + 1):
            await asyncio.sleep(seconds / steps)
            await ctx.report_progress(step, steps, f"step {step}/{steps}")
    except asyncio.CancelledError:
        # On stderr, so a bridge's log tail shows the tool really saw the cancellation.
        print(f"slow: cancelled at step {step}/{steps}", file=sys.stderr, flush=True)
        raise
    return f"Slept {seconds} seconds"


@server.tool(
    annotations=ToolAnnotations(readOnlyHint=False, idempotentHint=False, destructiveHint=False, openWorldHint=False)
)
async def counter(delay_s: float = 0) -> int:
    """Wait `delay_s` seconds, then count this execution and return the new count."""
    global _executions  # noqa: PLW0603 — the server's one counter: this process's executions, what the tool reports
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    _executions += 1
    return _executions


@server.tool(annotations=READ_ONLY)
def count() -> int:
    """How many times `counter` has completed in this process."""
    return _executions


@server.tool(annotations=READ_ONLY)
def fail(message: str) -> str:
    """Always fail with `message` as a tool error (the result has isError: true)."""
    raise ToolError(message)


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, idempotentHint=True, destructiveHint=True))
def crash() -> str:
    """Exit the server process immediately (exit code 3), mid-call."""
    os._exit(3)


@server.tool(annotations=READ_ONLY)
def env_hash(name: str) -> str:
    """The first 16 hex digits of SHA-256 of environment variable `name`, or "unset"."""
    value = os.environ.get(name)
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value is not None else "unset"


if __name__ == "__main__":
    server.run("stdio")
