"""The bench's own installs, under bench/.peers (gitignored), from the registries only.

- ``mcp-proxy``   (PyPI) in its own venv: it pins mcp 1.x, Pier's venv has mcp 2.x.
- ``supergateway`` (npm) in its own prefix; it has no host option, so it is started with
  ``bench/loopback.cjs`` preloaded, which forces every listen onto 127.0.0.1.
- ``venv``        the bench runner's venv: matplotlib, pyinstrument, py-spy. It also sees Pier's
  venv (a ``.pth`` line), so the SDK client is exactly the mcp 2.3 that Pier is tested with and
  nothing has to be installed twice.

Run as ``python -m bench.peers`` (stdlib only, so Pier's venv can run it before the bench venv
exists). A stamp holding the pins' digest makes reruns instant and a changed pin reinstall.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
PINS_FILE = BENCH / "pins.toml"
LOOPBACK_PRELOAD = BENCH / "loopback.cjs"

MCP_PROXY_VENV = PEERS / "mcp-proxy"
SUPERGATEWAY_PREFIX = PEERS / "supergateway"
BENCH_VENV = PEERS / "venv"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"

# The common server: installed by `make install` (deps/npm), launched over stdio.
EVERYTHING_JS = (
    ROOT / "deps" / "npm" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
)
EVERYTHING = ["node", str(EVERYTHING_JS), "stdio"]
# Pier itself always runs from the project venv, exactly as `make run` runs it.
PIER_PYTHON = ROOT / ".venv" / "bin" / "python"
PIER = [str(PIER_PYTHON), "-m", "pier.cli"]


@dataclass(frozen=True)
class Pins:
    mcp_proxy: str
    supergateway: str
    tools: dict[str, str]
    digest: str

    @classmethod
    def load(cls, path: Path = PINS_FILE) -> Pins:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode())
        peers = data["peers"]
        return cls(peers["mcp-proxy"], peers["supergateway"], dict(data["tools"]), hashlib.sha256(raw).hexdigest())


def mcp_proxy_command(port: int, server: list[str]) -> list[str]:
    """mcp-proxy serving `server` (stdio) on loopback; it serves Streamable HTTP at /mcp (and SSE at /sse)."""
    exe = str(MCP_PROXY_VENV / "bin" / "mcp-proxy")
    return [exe, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING", "--", *server]


def supergateway_command(port: int, server: list[str]) -> list[str]:
    """supergateway stdio → Streamable HTTP at /mcp, stateful (one server per MCP session).

    Stateless mode spawns a fresh server for every POST, which is not a fair comparison for a
    session-per-user gateway; stateful mode is what a per-user deployment would run.
    """
    js = SUPERGATEWAY_PREFIX / "node_modules" / "supergateway" / "dist" / "index.js"
    return [
        "node", str(js), "--stdio", shlex.join(server), "--outputTransport", "streamableHttp", "--stateful",
        "--port", str(port), "--streamableHttpPath", "/mcp", "--logLevel", "none",
    ]  # fmt: skip


def supergateway_env() -> dict[str, str]:
    """Its environment: the loopback preload added to whatever NODE_OPTIONS already holds."""
    options = os.environ.get("NODE_OPTIONS", "")
    return {**os.environ, "NODE_OPTIONS": f"{options} --require={LOOPBACK_PRELOAD}".strip()}


# -- installing ------------------------------------------------------------------------------


def _run(*cmd: str | Path, cwd: Path | None = None) -> None:
    print("bench: " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=cwd)


def _stamp(name: str) -> Path:
    return PEERS / f".{name}.installed"


def _fresh(name: str, key: str) -> bool:
    stamp = _stamp(name)
    return stamp.exists() and stamp.read_text() == key


def _install_mcp_proxy(pins: Pins) -> None:
    key = f"mcp-proxy=={pins.mcp_proxy}"
    if _fresh("mcp-proxy", key):
        return
    shutil.rmtree(MCP_PROXY_VENV, ignore_errors=True)
    _run(sys.executable, "-m", "venv", MCP_PROXY_VENV)
    _run(MCP_PROXY_VENV / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", key)
    _stamp("mcp-proxy").write_text(key)


def _install_supergateway(pins: Pins) -> None:
    key = f"supergateway@{pins.supergateway}"
    if _fresh("supergateway", key):
        return
    shutil.rmtree(SUPERGATEWAY_PREFIX, ignore_errors=True)
    SUPERGATEWAY_PREFIX.mkdir(parents=True)
    (SUPERGATEWAY_PREFIX / "package.json").write_text('{"private": true}\n')
    _run("npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--save-exact", key, cwd=SUPERGATEWAY_PREFIX)
    _stamp("supergateway").write_text(key)


def _install_bench_venv(pins: Pins) -> None:
    specs = [f"{name}=={version}" for name, version in sorted(pins.tools.items())]
    key = " ".join(specs)
    if _fresh("venv", key):
        return
    shutil.rmtree(BENCH_VENV, ignore_errors=True)
    _run(sys.executable, "-m", "venv", BENCH_VENV)
    _run(BENCH_VENV / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", *specs)
    # Then Pier's venv, seen from the bench venv (written after the install, so pip installs every
    # tool here rather than finding some in Pier's venv): `addsitedir` also runs Pier's .pth files
    # (its editable install among them). The bench venv's own packages come first on sys.path.
    project_site = Path(sysconfig.get_paths(vars={"base": str(ROOT / ".venv")})["purelib"])
    bench_site = Path(sysconfig.get_paths(vars={"base": str(BENCH_VENV)})["purelib"])
    (bench_site / "pier-project.pth").write_text(f"import site; site.addsitedir({str(project_site)!r})\n")
    _stamp("venv").write_text(key)


def install() -> None:
    """Install whatever is missing or pinned differently; a no-op when everything is current."""
    if not EVERYTHING_JS.exists():
        raise SystemExit(f"bench: {EVERYTHING_JS} is missing; run `make install` first")
    PEERS.mkdir(exist_ok=True)
    pins = Pins.load()
    _install_mcp_proxy(pins)
    _install_supergateway(pins)
    _install_bench_venv(pins)


if __name__ == "__main__":
    install()
