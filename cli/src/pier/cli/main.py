"""The `pier` command line: one subcommand per component."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pier.core import __version__, logs
from pier.core.errors import ConfigError
from pier.sidecar import main as sidecar_main


def _run_router(args: argparse.Namespace) -> int:
    from pier.cli import routers
    from pier.router.config import RouterSettings

    settings = RouterSettings()
    logs.configure(settings.log_level)
    if args.process is not None:  # one of several, started by the supervisor
        asyncio.run(routers.serve_process(settings, args.process, args.run_dir, args.demo))
    elif settings.processes > 1:
        asyncio.run(routers.supervise(settings, on_ready=_announce("router")))
    else:
        asyncio.run(routers.serve_alone(settings, on_ready=_announce("router")))
    return 0


def _announce(component: str) -> Callable[[str], None]:
    def announce(url: str) -> None:
        logging.getLogger(f"pier.{component}").info(f"{component} listening", extra={"url": url})

    return announce


def _run_jobs(args: argparse.Namespace) -> int:
    from pier.jobs.config import JobsSettings
    from pier.jobs.worker import run

    settings = JobsSettings()
    logs.configure(settings.log_level)
    asyncio.run(run(settings))
    return 0


def _run_up(args: argparse.Namespace) -> int:
    from pier.cli.up import up
    from pier.router.config import RouterSettings

    settings = RouterSettings()
    logs.configure(settings.log_level)
    asyncio.run(up(settings, args.data_dir))
    return 0


def _run_operator(args: argparse.Namespace) -> int:
    from pier.operator.config import OperatorSettings
    from pier.operator.main import run

    settings = OperatorSettings()
    logs.configure(settings.log_level)
    return run(settings, args.health_port, args.health_host)


def _run_connect(args: argparse.Namespace) -> int:
    import os

    from pier.cli.connect import connect

    logs.configure(os.environ.get("PIER_LOG_LEVEL", "WARNING"))
    token = args.token or os.environ.get("PIER_CONNECT_TOKEN")
    return asyncio.run(connect(args.url, token, args.ca, args.cert, args.key))


def _run_catalog(args: argparse.Namespace) -> int:
    from pier.cli import catalog

    return catalog.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pier", description="Per-tenant MCP stdio servers over HTTP.")
    parser.add_argument("--version", action="version", version=f"pier {__version__}")
    sub = parser.add_subparsers(dest="component", required=True)
    sidecar = sub.add_parser(
        "sidecar", help="bridge one stdio MCP server to HTTP", description=sidecar_main.DESCRIPTION
    )
    sidecar_main.add_arguments(sidecar)
    router = sub.add_parser("router", help="the HTTP front door (configured by PIER_* variables)")
    # Set by the supervisor for each of several router processes (PIER_PROCESSES > 1), not by people.
    router.add_argument("--process", type=int, help=argparse.SUPPRESS)
    router.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    router.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("jobs", help="a job-pool worker (configured by PIER_* variables)")
    operator = sub.add_parser("operator", help="the MCPSession operator (configured by PIER_* variables)")
    operator.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0: none)")
    operator.add_argument("--health-host", default="0.0.0.0", help="liveness endpoint address")
    up = sub.add_parser("up", help="the embedded default: Redis, router, job pool, local sessions, demo profile")
    up.add_argument("--data-dir", type=Path, default=Path(".pier"), help="where embedded Redis keeps its data")
    connect = sub.add_parser(
        "connect",
        help="a stdio MCP server relaying to a session on the router (for desktop agents)",
        description="Relay stdin/stdout (MCP stdio) to URL, a session's MCP endpoint on the router: "
        "https://HOST/v1/users/USER/servers/SERVER/mcp. The key may come from PIER_CONNECT_TOKEN.",
    )
    connect.add_argument("url")
    connect.add_argument("--token", help="API key (prefer PIER_CONNECT_TOKEN: arguments show in `ps`)")
    connect.add_argument("--ca", type=Path, help="CA bundle for the router's certificate")
    connect.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    connect.add_argument("--key", type=Path, help="its private key")
    from pier.cli import catalog

    catalog.add_arguments(sub.add_parser("catalog", help="the profile catalog: import MCP registry server.json"))
    args = parser.parse_args(argv)
    runners = {
        "sidecar": sidecar_main.run, "router": _run_router, "jobs": _run_jobs, "up": _run_up, "connect": _run_connect,
        "operator": _run_operator, "catalog": _run_catalog,
    }  # fmt: skip
    try:
        return runners[args.component](args)
    except ConfigError as exc:  # a setting Pier will not run with: one line, no traceback
        print(f"pier {args.component}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
