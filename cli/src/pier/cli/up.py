"""`pier up`: the embedded default: Redis, the router (local sessions), a job worker, the demo profile.

One process (plus Redis and the sessions it starts), or with `PIER_PROCESSES` > 1 this one (Redis, the
worker) and the router's processes; Ctrl-C stops all of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from pier.cli import routers
from pier.cli.redis_server import RedisServer
from pier.core import tracing
from pier.core.web import serve
from pier.jobs.config import JobsSettings
from pier.jobs.worker import Worker
from pier.router.app import create_app
from pier.router.config import RouterSettings
from pier.router.state import ROUTER

log = logging.getLogger("pier.cli.up")


def banner(url: str, redis_url: str) -> str:
    return f"""
Pier is up: {url}
  servers    curl -s {url}/v1/servers
  tools      curl -s {url}/v1/users/alice/servers/demo/tools
  call       curl -s -X POST {url}/v1/users/alice/servers/demo/tools/echo/call \\
                  -H 'Content-Type: application/json' -d '{{"arguments": {{"message": "hello"}}}}'
  MCP        {url}/v1/users/alice/servers/demo/mcp
  dashboard  {url}/dashboard
  redis      {redis_url}
Ctrl-C stops everything.
"""


async def up(settings: RouterSettings, data_dir: Path) -> None:
    redis = None
    shown_redis = "PIER_REDIS_URL"  # the operator's own: not repeated (it may hold a password)
    if "PIER_REDIS_URL" not in os.environ:
        redis = RedisServer(data_dir / "redis")
        await redis.start()
        settings = settings.model_copy(update={"redis_url": redis.url})
        shown_redis = redis.shown_url
    worker = Worker(JobsSettings(redis_url=settings.redis_url, worker_name="pier-up"))
    try:
        tracing.start("pier")  # router and worker in one process: one service (unless OTEL_SERVICE_NAME says)
        if settings.processes > 1:  # the router as several processes; the worker stays here
            await worker.start()
            try:
                await routers.supervise(
                    settings, lambda url: print(banner(url, shown_redis), flush=True), demo=True,
                    env={"PIER_REDIS_URL": settings.redis_url},
                )  # fmt: skip
            finally:
                await worker.stop()
        else:
            await _serve_with_worker(settings, worker, shown_redis)
    finally:
        await asyncio.to_thread(tracing.stop)
        if redis is not None:
            await redis.stop()
        print("Pier stopped.", file=sys.stderr)


async def _serve_with_worker(settings: RouterSettings, worker: Worker, shown_redis: str) -> None:
    """The router and the worker in this process (one cleanup context starts and stops the worker)."""
    app = create_app(settings, routers.catalog_of(settings, demo=True))

    async def run_worker(_: web.Application) -> AsyncIterator[None]:
        await worker.start()
        yield
        await worker.stop()

    app.cleanup_ctx.append(run_worker)
    await serve(
        app, settings.host, settings.port, ssl_context=app[ROUTER].ssl_context,
        on_ready=lambda url: print(banner(url, shown_redis), flush=True),
    )  # fmt: skip
