"""What another HTTP server would save the router: aiohttp against Granian, side by side.

    python -m bench.http_servers [--seconds 5]

The router is an aiohttp app; about a quarter to a third of its CPU per call is aiohttp's (see
bench/README.md). Porting the router to another server is only worth it if that share shrinks a lot,
so this measures the HTTP layer alone: the same trivial JSON endpoint (read a small JSON body, answer
a small JSON body, as a REST call does around its work) on aiohttp and on Granian (its native RSGI
interface, Rust I/O, one worker), driven by the bench's lean keep-alive client one call at a time and
16 at once. Figures: calls/s and the server process's CPU per request (from /proc). Results:
bench/results/http-servers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import peers
from bench.processes import cpu_seconds, descendants, free_port, running, wait_http
from bench.report import RESULTS

# The two servers, each a program of its own (run by the bench venv's Python).
AIOHTTP_APP = """
import sys, json
from aiohttp import web

async def call(request):
    body = json.loads(await request.read())
    return web.json_response({"status": "completed", "result": {"content": [{"type": "text", "text": body["m"]}]}})

async def ok(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_post("/call", call)
app.router.add_get("/healthz", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

GRANIAN_APP = """
import json

async def app(scope, proto):
    if scope.path == "/healthz":
        proto.response_str(200, [("content-type", "text/plain")], "ok")
        return
    body = json.loads(await proto())
    answer = {"status": "completed", "result": {"content": [{"type": "text", "text": body["m"]}]}}
    proto.response_bytes(200, [("content-type", "application/json")], json.dumps(answer).encode())
"""


def commands(port: int, work: Path) -> dict[str, list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "aiohttp_app.py").write_text(AIOHTTP_APP)
    (work / "granian_app.py").write_text(GRANIAN_APP)
    python = str(peers.BENCH_PYTHON)
    return {
        "aiohttp": [python, str(work / "aiohttp_app.py"), str(port)],
        "granian": [
            python, "-m", "granian", "--interface", "rsgi", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--no-ws", "--working-dir", str(work), "granian_app:app",
        ],
    }  # fmt: skip


async def drive(url: str, callers: int, seconds: float) -> int:
    """Calls answered in `seconds` by `callers` keep-alive clients, each one call at a time."""
    done = 0
    end = time.monotonic() + seconds
    body = json.dumps({"m": "hello"}).encode()

    async def one() -> None:
        nonlocal done
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            while time.monotonic() < end:
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                done += 1

    await asyncio.gather(*(one() for _ in range(callers)))
    return done


async def measure(name: str, cmd: list[str], port: int, seconds: float, logs: Path) -> list[dict[str, Any]]:
    rows = []
    async with running(name, cmd, logs) as proc:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        await drive(f"http://127.0.0.1:{port}/call", 4, 1.0)  # warm up
        # Granian serves from a worker process of its own: the CPU of the whole tree counts.
        tree = [proc.pid, *descendants(proc.pid)]
        for callers in (1, 16):
            before = sum(sum(cpu_seconds(pid)) for pid in tree)
            t0 = time.monotonic()
            calls = await drive(f"http://127.0.0.1:{port}/call", callers, seconds)
            elapsed = time.monotonic() - t0
            cpu_ms = (sum(sum(cpu_seconds(pid)) for pid in tree) - before) * 1000 / max(calls, 1)
            rows.append({"server": name, "callers": callers, "calls_per_s": calls / elapsed, "cpu_ms": cpu_ms})
            print(f"  {name:<8} c={callers:<3} {calls / elapsed:7.0f} calls/s  server CPU {cpu_ms:.3f} ms/call")
    return rows


async def main(seconds: float) -> None:
    logs = peers.PEERS / "logs" / ("http-servers-" + time.strftime("%Y%m%d-%H%M%S"))
    rows: list[dict[str, Any]] = []
    for name, cmd in commands(free_port(), logs / "apps").items():
        port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else int(cmd[-1])
        rows += await measure(name, cmd, port, seconds, logs)
    base = {r["callers"]: r for r in rows if r["server"] == "aiohttp"}
    lines = [
        "# The HTTP layer alone: aiohttp against Granian (RSGI, one worker)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {seconds:.0f} s per run · a JSON POST answered with JSON, "
        "keep-alive clients (the bench's Python client: it costs more CPU than either server).",
        "",
        "| server | callers | calls/s | server CPU ms/call | CPU saved vs aiohttp |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        saved = base[row["callers"]]["cpu_ms"] - row["cpu_ms"]
        lines.append(
            f"| {row['server']} | {row['callers']} | {row['calls_per_s']:,.0f} | {row['cpu_ms']:.3f} | {saved:+.3f} |"
        )
    (RESULTS / "http-servers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_servers", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds)))


if __name__ == "__main__":
    cli()
