"""`pier.core.web.serve`, the one way the router, the bridge and the workers listen: once it listens, the collector
is settled (start-up frozen, the young generation collected less often)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from pier.core.web import YOUNG_COLLECTION_THRESHOLD, serve

pytestmark = pytest.mark.unit


@pytest.fixture
def collector() -> Iterator[None]:
    """The test process's collector as it was, afterwards."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_a_server_that_listens_has_frozen_its_start_up_and_collects_the_young_less_often(collector):
    gc.unfreeze()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(app, "127.0.0.1", 0, on_ready=started.set_result, stop_when=stop.wait()))
    try:
        url = await asyncio.wait_for(started, 10)
        # Settled before it says it is ready: the app (and everything imported) is out of every later collection.
        assert gc.is_tracked(app)
        assert not any(obj is app for obj in gc.get_objects())  # the collector's generations, not the frozen
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as answer:
            assert await answer.text() == "ok"
    finally:
        stop.set()
        await asyncio.wait_for(serving, 15)
