"""How `pier router` (and `pier up`) run the router: one process, or several on one port.

One process serves the app itself. With `PIER_PROCESSES` > 1 this process supervises that many
(`supervisor`), each `pier router --process I` serving the same app as one of the peers
(`pier.router.processes`): same port, each user's sessions in one of them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from pier.cli.supervisor import Supervisor, run_until_stopped
from pier.core.catalog import Catalog, demo_profile
from pier.core.errors import ConfigError
from pier.core.web import serve
from pier.router.app import create_app
from pier.router.config import RouterSettings
from pier.router.processes import Peers, serving
from pier.router.state import ROUTER


def catalog_of(settings: RouterSettings, demo: bool) -> Catalog:
    """The settings' catalog, with the demo profile for `pier up`."""
    catalog = Catalog.load(settings.profiles, settings.profiles_inline)
    if demo:
        catalog.add(demo_profile())
    return catalog


async def serve_alone(settings: RouterSettings, on_ready: Callable[[str], None]) -> None:
    """The router in this process alone."""
    app = create_app(settings, catalog_of(settings, demo=False))
    await serve(app, settings.host, settings.port, on_ready=on_ready, ssl_context=app[ROUTER].ssl_context)


async def serve_process(settings: RouterSettings, index: int, run_dir: Path, demo: bool) -> None:
    """One of several router processes: announces its URL on stdout (one JSON line) for the supervisor."""
    peers = Peers(index, settings.processes, run_dir)
    app = create_app(settings, catalog_of(settings, demo), peers)
    await serve(
        app, settings.host, settings.port, reuse_port=True, attach=functools.partial(serving, peers),
        on_ready=lambda url: print(json.dumps({"url": url}), flush=True),
    )  # fmt: skip


def check_processes(settings: RouterSettings) -> None:
    """What several processes cannot do (ConfigError)."""
    if settings.tls_cert is not None:
        raise ConfigError(
            "PIER_PROCESSES > 1 with PIER_TLS_CERT: a TLS connection cannot move between processes; "
            "terminate TLS in front of the router (an ingress, a load balancer) or run one process"
        )


async def supervise(
    settings: RouterSettings, on_ready: Callable[[str], None], demo: bool = False, env: dict[str, str] | None = None
) -> None:
    """`settings.processes` router processes on one port, until SIGTERM or SIGINT."""
    import os

    check_processes(settings)
    supervisor = Supervisor(settings.processes, ["--demo"] if demo else [], {**os.environ, **(env or {})})
    await run_until_stopped(supervisor, on_ready)
