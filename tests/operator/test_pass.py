"""The operator's periodic pass at rest sends nothing to the API server, whatever the number of sessions
(operator/…/engine.py `run_pass`): its cost must not grow with every session. The objects are the ones
`bench/operator_pass.py` times at 10,000 and 50,000 (sessions and Ready pods as the API server sends them);
the API server is one of the test's own that counts what reaches it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from bench.operator_pass import PROFILE, fill
from pier.core.catalog import Catalog
from pier.core.kube import ApiAccess, KubeClient
from pier.operator.config import OperatorSettings
from pier.operator.engine import Operator
from pier.operator.metrics import OperatorMetrics
from tests.servers import LoopbackApiAccess, serve

pytestmark = pytest.mark.unit


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.json_response({"kind": "Status", "code": 500}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    async with serve(app) as url:
        yield url, seen


@pytest.mark.parametrize("sessions", [10, 1000])
async def test_a_pass_over_settled_sessions_sends_the_api_server_nothing(api_server, sessions: int):
    host, seen = api_server
    settings = OperatorSettings(namespace="pier", bridge_refresh_s=3600)
    async with aiohttp.ClientSession() as http:
        client = KubeClient(http, cast(ApiAccess, LoopbackApiAccess(host)), retry_for_s=0)
        operator = Operator(settings, http, client, Catalog([PROFILE]), OperatorMetrics())
        await fill(operator, sessions, nodes=10)
        operator.election.leading.set()
        for _ in range(3):
            assert await operator.run_pass() == 0  # nothing queued: nothing to do
        operator.queue.close()
    assert seen == []
    assert len(operator.monitor.known) == sessions  # each Ready session's bridge is followed (by HTTP to it)
