"""The bridge's command line: `pier sidecar …` (or `python -m pier.sidecar …`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

DESCRIPTION = (
    "Run the bridge: `pier sidecar [options] -- COMMAND [ARGS...]` spawns the stdio server; "
    "`pier sidecar --attach DIR` talks to a server in another container through DIR/stdin and DIR/stdout."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; pods use 0.0.0.0)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    p.add_argument("--attach", type=Path, metavar="DIR", help="attach to a server through FIFOs in DIR")
    p.add_argument(
        "--prepare-attach",
        type=Path,
        metavar="DIR",
        help="create DIR's FIFOs and wrapper script, then exit (a pod's init step)",
    )
    p.add_argument("--max-concurrent-calls", type=int)
    p.add_argument("--allowed-origin", action="append", dest="allowed_origins", metavar="ORIGIN")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")


def run(args: argparse.Namespace) -> int:
    """Run the bridge as `args` say; returns the exit code."""
    # Imported here: `--prepare-attach` (a pod's init step) needs none of the server side.
    from pier.core import logs
    from pier.sidecar.attach import prepare
    from pier.sidecar.config import SidecarSettings

    if args.prepare_attach:
        prepare(args.prepare_attach)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if bool(command) == bool(args.attach):
        print("pier sidecar: give either -- COMMAND [ARGS...] or --attach DIR", file=sys.stderr)
        return 2
    overrides = {
        "host": args.host,
        "port": args.port,
        "attach_dir": args.attach,
        "max_concurrent_calls": args.max_concurrent_calls,
        "allowed_origins": args.allowed_origins,
    }
    settings = SidecarSettings.from_env(command=command, **{k: v for k, v in overrides.items() if v is not None})
    logs.configure(settings.log_level)
    from pier.sidecar.app import serve

    return asyncio.run(serve(settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pier sidecar", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
