"""What the operator asks the sessions' bridges (operator/…/bridges.py): at most N at once, each answer news,
a bridge that does not answer never reaped on a guess. Bridges here are one aiohttp server of the test's own
answering `GET /v1/status` as a bridge does; the k8s tier (tests/k8s/) has real ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from pier.core.callapi import BridgeStatus
from pier.operator.bridges import UNREACHABLE_AFTER, BridgeMonitor, Known
from tests.servers import serve, wait_until

pytestmark = pytest.mark.unit
NOBODY = "http://127.0.0.1:9"  # the discard port: nothing listens there


@dataclass
class Bridges:
    url: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_at_once: int = 0
    asked: int = 0


@pytest.fixture
async def bridges() -> AsyncIterator[Bridges]:
    state = Bridges("")

    async def status(request: web.Request) -> web.Response:
        state.asked += 1
        state.in_flight += 1
        state.most_at_once = max(state.most_at_once, state.in_flight)
        try:
            await state.release.wait()
        finally:
            state.in_flight -= 1
        return web.json_response(BridgeStatus("ready", True, "child", last_activity=time.time() - 600).to_dict())

    app = web.Application()
    app.router.add_get("/v1/status", status)
    async with serve(app) as state.url:
        try:
            yield state
        finally:
            state.release.set()


async def test_bridges_are_asked_at_most_n_at_once_and_each_answer_is_news(bridges):
    news: list[str] = []
    async with aiohttp.ClientSession() as http:
        monitor = BridgeMonitor(http, None, concurrency=3, refresh_s=3600, on_news=news.append)
        runner = asyncio.create_task(monitor.run())
        try:
            for n in range(10):
                monitor.track(f"s{n}", bridges.url, ttl_s=0, ready_since=time.time())
            await wait_until(lambda: bridges.in_flight == 3, timeout=5, interval=0.01)
            await asyncio.sleep(0.2)  # the others wait for a slot
            assert (bridges.asked, news) == (3, [])
            bridges.release.set()
            await wait_until(lambda: len(news) == 10, timeout=5, interval=0.01)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    assert sorted(news) == sorted(f"s{n}" for n in range(10))
    assert bridges.most_at_once == 3
    assert all(k.status is not None and k.status.ready and k.failures == 0 for k in monitor.known.values())


async def test_a_bridge_that_does_not_answer_is_marked_so_and_never_reaped():
    news: list[str] = []
    async with aiohttp.ClientSession() as http:
        # A short refresh: the pause between asks of an unanswering bridge grows only up to it.
        monitor = BridgeMonitor(http, None, concurrency=2, refresh_s=0.05, on_news=news.append)
        runner = asyncio.create_task(monitor.run())
        try:
            known = monitor.track("gone", NOBODY, ttl_s=1, ready_since=time.time() - 3600)
            await wait_until(lambda: known.failures >= UNREACHABLE_AFTER, timeout=5, interval=0.01)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    assert known.unreachable
    assert known.status is None
    assert not known.reapable(time.time() + 3600)
    assert set(news) == {"gone"}


def test_a_session_is_reapable_only_on_an_answer_given_after_its_ttl_ran_out():
    now = time.time()
    idle = BridgeStatus("ready", True, "child", last_activity=now - 120)
    known = Known("http://b", ttl_s=60, ready_since=now - 600, status=idle, asked_at=now)
    assert known.reapable(now)
    known.asked_at = now - 90  # answered while it had been idle only 30 s: a guess now
    assert not known.reapable(now)
    known.asked_at = now
    known.status = BridgeStatus("ready", True, "child", last_activity=now - 120, calls_running=1)
    assert not known.reapable(now)  # busy
    known.status, known.ready_since = idle, now - 30  # Ready (a claimed warm pod) 30 s ago: idle from then
    assert not known.reapable(now)
    assert not Known("http://b", ttl_s=0, ready_since=0, status=idle, asked_at=now).reapable(now)  # no TTL


async def test_a_new_endpoint_forgets_what_the_old_bridge_said():
    async with aiohttp.ClientSession() as http:
        monitor = BridgeMonitor(http, None, concurrency=1, refresh_s=60, on_news=lambda name: None)
        first = monitor.track("s", "http://old", ttl_s=60, ready_since=1.0)
        first.status = BridgeStatus("ready", True, "child")
        assert monitor.track("s", "http://old", ttl_s=60, ready_since=1.0) is first
        moved = monitor.track("s", "http://new", ttl_s=60, ready_since=2.0)
        assert moved is not first
        assert moved.status is None
        monitor.forget("s")
        assert monitor.known == {}
