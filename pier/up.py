"""`pier up`: the embedded default — Redis, the router (local sessions), the job pool, the demo profile."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pier.redis_server import RedisServer
from pier.router.app import create_app, serve
from pier.router.config import RouterSettings
from pier.router.profiles import Catalog, demo_profile

log = logging.getLogger("pier.up")


def banner(url: str, settings: RouterSettings) -> str:
    return f"""
Pier is up: {url}
  servers    curl -s {url}/v1/servers
  tools      curl -s {url}/v1/users/alice/servers/demo/tools
  call       curl -s -X POST {url}/v1/users/alice/servers/demo/tools/echo/call \\
                  -H 'Content-Type: application/json' -d '{{"arguments": {{"message": "hello"}}}}'
  MCP        {url}/v1/users/alice/servers/demo/mcp
  dashboard  {url}/dashboard
  redis      {settings.redis_url}
Ctrl-C stops everything.
"""


async def up(settings: RouterSettings, data_dir: Path) -> None:
    redis = None
    if "PIER_REDIS_URL" not in os.environ:
        redis = RedisServer(data_dir / "redis")
        await redis.start()
        settings = settings.model_copy(update={"redis_url": redis.url})
    catalog = Catalog.load(settings.profiles, settings.profiles_inline)
    catalog.add(demo_profile())
    app = create_app(settings, catalog)
    try:
        await serve(app, settings.host, settings.port, on_ready=lambda url: print(banner(url, settings), flush=True))
    finally:
        if redis is not None:
            await redis.stop()
        print("Pier stopped.", file=sys.stderr)
