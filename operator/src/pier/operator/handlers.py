"""kopf's part: the operator's process. kopf runs it (signals, logging, the liveness endpoint); at start-up
it builds the `Operator` (engine.py), which works from its own informers, and at clean-up it stops it.

Why the caches are not kopf's own watches: after a relist kopf reports the objects it finds but not the
ones that vanished meanwhile, so a cache fed by its events could keep a deleted pod forever; and kopf's
peering pauses kopf's handlers, not a pass over every session. The operator's informers (pier.core.kube)
relist with deletions, and its Lease (leader.py) decides which replica works.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pier.core.catalog import Catalog
from pier.core.kube import ApiAccess, KubeClient
from pier.core.web import tcp_site
from pier.operator.config import OperatorSettings
from pier.operator.engine import Operator
from pier.operator.metrics import OperatorMetrics

log = logging.getLogger("pier.operator")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False  # the operator posts its own Events
    ours: OperatorSettings = memo.get("settings") or OperatorSettings()
    metrics = OperatorMetrics()
    access = ApiAccess(ours.kubeconfig)
    # One connection pool for the API server and the bridges; no per-host cap below the work there is.
    memo.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=ours.workers + 16))
    client = KubeClient(
        memo.http, access, qps=ours.api_qps, burst=ours.api_burst,
        observe=lambda verb, code: metrics.api_requests.labels(verb, str(code)).inc(),
    )  # fmt: skip
    catalog = Catalog.load(ours.profiles, ours.profiles_inline)
    memo.operator = Operator(ours, memo.http, client, catalog, metrics)
    await memo.operator.start()
    memo.metrics_runner = await _serve_metrics(metrics, memo.get("listen_host", "0.0.0.0"), ours.metrics_port)


async def _serve_metrics(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner | None:
    """`/metrics` of the operator, beside kopf's liveness endpoint; port 0: none."""
    if not port:
        return None

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app, shutdown_timeout=5)  # a scrape in flight must not hold up the operator's exit
    await runner.setup()
    await tcp_site(runner, host, port).start()
    return runner


@kopf.on.probe(id="operator")
def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """The liveness endpoint's report; it fails when a part of the operator (a watch, a worker) has died."""
    operator: Operator | None = memo.get("operator")
    return operator.health() if operator is not None else {"starting": True}


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    operator: Operator | None = memo.get("operator")
    if operator is not None:
        await operator.stop()
    if memo.get("metrics_runner") is not None:
        await memo.metrics_runner.cleanup()
    if memo.get("http") is not None:
        await memo.http.close()
