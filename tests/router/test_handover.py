"""A connection handed to another router process (router/…/processes.py) in one test process: two aiohttp
servers on two event loops (the owner's in a thread), a real Unix hand-over socket, a real client. The
processes' tests (test_processes.py) show the same through `pier up`; here the moment after the owner took the
connection can be held open."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from pier.core.errors import PierError
from pier.router import processes
from pier.router.metrics import RouterMetrics
from pier.router.processes import Adopter, HandedOver, Peers, hand_over
from pier.router.state import ROUTER, Router
from tests.servers import serve

pytestmark = pytest.mark.unit


@contextlib.contextmanager
def _owner(run_dir: Path) -> Iterator[None]:
    """Process 1, the owner: its own event loop (in a thread, as another process would have its own), answering
    with who it is; right after each answer its loop stalls a moment, so that process 0 would read first."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.Response(text=f"served by 1: {await request.text()}")
        await response.prepare(request)
        await response.write_eof()
        loop.call_soon(time.sleep, 0.2)
        return response

    async def start() -> tuple[web.AppRunner, Adopter]:
        app = web.Application()
        app.router.add_post("/", answer)
        # A short keep-alive: a request lost on the way shows as the disconnect a client would see, not a hang.
        runner = web.AppRunner(app, keepalive_timeout=1.0)
        await runner.setup()
        adopter = Adopter(Peers(1, 2, run_dir), runner)
        adopter.start()
        return runner, adopter

    runner, adopter = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(adopter.close(), loop).result(10)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.asynccontextmanager
async def _two_processes(run_dir: Path) -> AsyncIterator[str]:
    """Process 0 (this loop) hands every request to process 1; yields process 0's URL."""

    async def sender(request: web.Request) -> web.Response:
        try:
            await hand_over(request, Peers(0, 2, run_dir), 1)
        except HandedOver:
            raise asyncio.CancelledError from None  # as the router's middleware does
        except PierError as exc:
            return web.Response(status=503, text=exc.message)

    app = web.Application()
    # Only the hand-over's counter is read from the router (a metrics object of the test's own).
    app[ROUTER] = cast(Router, types.SimpleNamespace(metrics=RouterMetrics()))
    app.router.add_post("/", sender)
    async with serve(app) as url:
        with _owner(run_dir):
            yield url + "/"


async def test_a_request_sent_the_moment_a_handed_over_answer_arrives_reaches_the_owner(tmp_path, monkeypatch):
    """The process that handed a connection over reads nothing more from it, even before it lets go of it: the
    client's next request (sent as soon as the owner answered) is the owner's. It was lost under load (a
    bench's MCP clients: `ServerDisconnectedError` when the owner's keep-alive ran out)."""
    send = processes._send

    def send_then_linger(*args: Any) -> None:
        send(*args)
        time.sleep(0.5)  # (in the hand-over's thread) process 1 answers meanwhile, and the client writes again

    monkeypatch.setattr(processes, "_send", send_then_linger)
    async with _two_processes(tmp_path) as url:
        for attempt in range(4):  # a new connection each time: each is handed over once
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                for n in range(3):  # on one keep-alive connection
                    async with http.post(url, data=f"{attempt}.{n}") as response:
                        assert (response.status, await response.text()) == (200, f"served by 1: {attempt}.{n}")


async def test_a_hand_over_the_owner_refuses_leaves_the_connection_with_its_process(tmp_path):
    """No owner listening (it is restarting): the request gets a clear error and the connection serves on."""
    async with _two_processes(tmp_path) as url:
        (tmp_path / "handover-1.sock").unlink()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for _ in range(2):
                async with http.post(url, data="x") as response:
                    assert (response.status, await response.text()) == (
                        503, "the process serving this user is restarting; retry"
                    )  # fmt: skip
