"""`pier catalog import FILE|URL…`: MCP registry `server.json` documents as catalog profiles (YAML on stdout).

Each argument is a file or an http(s) URL holding a `server.json`, a registry API answer for one server
(`…/v0.1/servers/{name}/versions/latest`) or a listing (`…/v0.1/servers`). What Pier cannot run is
refused on stderr, one line each, with the reason (exit status 1); the profiles it can make are printed
all the same, so the output is a catalog to review, then to use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from pier.core.registry import ServerJson

_MAX_BYTES = 4 * 1024 * 1024
_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    imports = sub.add_parser(
        "import",
        help="turn MCP registry server.json documents into catalog profiles (YAML on stdout)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imports.add_argument("sources", nargs="+", metavar="FILE|URL", help="server.json files or URLs")
    imports.add_argument("--name", help="the profile's name (one document only; default: from the server's name)")
    imports.add_argument(
        "--value", action="append", default=[], metavar="NAME=VALUE",
        help="a value for an input the server leaves open (an argument or a non-secret variable); repeatable",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    values: dict[str, str] = {}
    for item in args.value:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"pier catalog: --value takes NAME=VALUE, not {item!r}", file=sys.stderr)
            return 2
        values[name] = value
    return asyncio.run(_import(args.sources, args.name, values))


async def _import(sources: list[str], name: str | None, values: dict[str, str]) -> int:
    # Imported here: every `pier` process builds this command's parser, bridges included, and the registry's
    # models (pydantic, the catalog, prometheus_client) and YAML would cost each bridge ~15 MiB.
    import yaml

    from pier.core.registry import Refused, documents, to_profile

    servers: list[tuple[str, ServerJson]] = []
    failed = False
    for source in sources:
        try:
            servers += [(source, server) for server in documents(await _read(source))]
        except (Refused, OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            print(f"pier catalog: {source}: {_reason(exc)}", file=sys.stderr)
            failed = True
    if name is not None and len(servers) > 1:
        print("pier catalog: --name names one profile, but the sources hold several servers", file=sys.stderr)
        return 2
    profiles: dict[str, dict[str, Any]] = {}
    for source, server in servers:
        try:
            profile = to_profile(server, name, values)
        except Refused as refused:
            print(f"pier catalog: {source}: {refused}", file=sys.stderr)
            failed = True
            continue
        if profile.name in profiles:
            print(f"pier catalog: {source}: {server.name}: profile name {profile.name!r} is taken (--name)",
                  file=sys.stderr)  # fmt: skip
            failed = True
            continue
        profiles[profile.name] = profile.model_dump(mode="json", exclude_defaults=True, exclude={"name"})
    if profiles:
        sys.stdout.write(yaml.safe_dump({"profiles": profiles}, sort_keys=False, allow_unicode=True))
    return 1 if failed else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {_TIMEOUT_S:g} s"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at line {exc.lineno})"
    return str(exc) or type(exc).__name__


async def _read(source: str) -> Any:
    if source.startswith(("http://", "https://")):
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(source) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            raw = b""
            while len(raw) <= _MAX_BYTES and (chunk := await response.content.read(65536)):
                raw += chunk
    else:
        raw = await asyncio.to_thread(Path(source).read_bytes)
    if len(raw) > _MAX_BYTES:
        raise ValueError(f"larger than {_MAX_BYTES} bytes: not a server.json")
    return json.loads(raw)
