"""The API server client's retries and rate budget (core/…/kube.py), against an aiohttp server of the test's own
that answers as a troubled API server would. The same client against the real API server: tests/k8s/test_kube.py
(and its 30 s of 429/500 in tests/k8s/test_mcpsessions.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from pier.core.kube import ApiAccess, ApiError, KubeClient, TokenBucket
from tests.servers import LoopbackApiAccess, serve

pytestmark = pytest.mark.unit


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] = field(default_factory=dict)


@pytest.fixture
async def api() -> AsyncIterator[tuple[list[Answer | None], list[str], str]]:
    """(answers to give in order — None drops the connection —, the requests seen, the server's URL)."""
    answers: list[Answer | None] = []
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        given = answers.pop(0) if answers else Answer(200, {"kind": "Status", "code": 200})
        if given is None:
            assert request.transport is not None
            request.transport.abort()  # no answer at all
            raise asyncio.CancelledError
        if isinstance(given.body, str):
            return web.Response(text=given.body, status=given.status, headers=given.headers)
        return web.json_response(given.body, status=given.status, headers=given.headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with serve(app) as url:
        yield answers, seen, url


def _client(http: aiohttp.ClientSession, host: str, statuses: list[tuple[str, int]], **kwargs: Any) -> KubeClient:
    access = cast(ApiAccess, LoopbackApiAccess(host))
    return KubeClient(http, access, observe=lambda verb, status: statuses.append((verb, status)), **kwargs)


async def test_a_429_is_retried_after_the_pause_it_asks_for_and_every_try_is_counted(api):
    answers, seen, host = api
    answers += [Answer(429, {"reason": "TooManyRequests"}, {"Retry-After": "0"}),
                Answer(500, {"reason": "InternalError"}),
                Answer(201, {"kind": "Pod", "metadata": {"name": "p"}})]  # fmt: skip
    statuses: list[tuple[str, int]] = []
    async with aiohttp.ClientSession() as http:
        status, body = await _client(http, host, statuses).request("POST", "/api/v1/pods", {"kind": "Pod"})
    assert (status, body["metadata"]["name"]) == (201, "p")
    assert seen == ["POST /api/v1/pods"] * 3
    assert statuses == [("POST", 429), ("POST", 500), ("POST", 201)]


async def test_an_error_that_lasts_longer_than_the_retries_is_returned_not_raised(api):
    answers, seen, host = api
    answers += [Answer(503, {"reason": "ServiceUnavailable"}, {"Retry-After": "0.05"})] * 50
    async with aiohttp.ClientSession() as http:
        client = _client(http, host, [], retry_for_s=0.3)
        status, body = await client.request("GET", "/api/v1/pods", params={"labelSelector": "a=b"})
        assert (status, body["reason"]) == (503, "ServiceUnavailable")
        assert 1 < len(seen) < 50
        assert seen[0] == "GET /api/v1/pods?labelSelector=a%3Db"
        seen.clear()
        assert (await client.request("GET", "/api/v1/pods", retry=False))[0] == 503
        assert len(seen) == 1  # once, as asked


async def test_answers_that_are_final_are_not_retried_and_any_body_is_read(api):
    answers, seen, host = api
    answers += [Answer(404, {"reason": "NotFound"}), Answer(400, "not json")]
    async with aiohttp.ClientSession() as http:
        client = _client(http, host, [])
        assert await client.request("GET", "/api/v1/namespaces/pier/pods/gone") == (404, {"reason": "NotFound"})
        assert await client.request("PATCH", "/x", {"a": 1}) == (400, "not json")
    assert len(seen) == 2


async def test_no_answer_is_retried_then_raised_with_what_was_asked(api):
    answers, seen, host = api
    answers += [None]
    statuses: list[tuple[str, int]] = []
    async with aiohttp.ClientSession() as http:
        client = _client(http, host, statuses, retry_for_s=5)
        # A dropped connection, then an answer (a POST: aiohttp itself retries some idempotent requests once).
        assert (await client.request("POST", "/api/v1/pods", {"kind": "Pod"}))[0] == 200
        assert [status for _, status in statuses] == [0, 200]
        assert len(seen) == 2
        dead = _client(http, "http://127.0.0.1:9", [], retry_for_s=0.3)  # nothing listens on the discard port
        with pytest.raises(ApiError) as raised:
            await dead.request("GET", "/api/v1/nodes")
    assert raised.value.status == 0
    assert raised.value.message.startswith("GET /api/v1/nodes: the API server did not answer")


async def test_the_budget_lets_a_burst_through_then_paces_at_its_rate(monkeypatch):
    # The clock is the test's: how long the bucket waits is read, not measured (nothing else runs on the loop
    # meanwhile, so the process-wide clock and sleep can be the test's for its length).
    now = [100.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))
        now[0] += seconds

    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(asyncio, "sleep", sleep)
    bucket = TokenBucket(rate=10, burst=3)
    for _ in range(5):
        await bucket.acquire()
    assert waits == [0.1, 0.1]  # three at once, then one every 1/rate
    now[0] += 10  # a quiet while refills the burst, no more
    waits.clear()
    for _ in range(4):
        await bucket.acquire()
    assert waits == [0.1]
    unlimited = TokenBucket(rate=0, burst=0)
    for _ in range(100):
        await unlimited.acquire()
    assert len(waits) == 1
