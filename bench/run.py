"""`make bench` / `make bench-quick`: run every scenario, write bench/results/latest.*, print the table.

    python -m bench.run [--quick] [--only direct,peers,sidecar,router] [--traces]

With `--traces`, Pier's processes export traces (OTLP/HTTP) to a collector of the bench's own
(`bench.otlp_sink`): what tracing costs, against a run without it.

Systems run one at a time (never two loads at once): direct stdio, mcp-proxy, supergateway,
Pier's sidecar, Pier's router. Each is started fresh and stopped before the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import peers, report, scenarios, targets
from bench.scenarios import Config
from bench.stats import Run, describe

PHASES = ("direct", "peers", "sidecar", "router", "processes", "isolation")


_T0 = time.monotonic()


def log(line: str) -> None:
    print(f"{time.monotonic() - _T0:6.1f}s {line}", flush=True)


class Bench:
    def __init__(self, cfg: Config, logs: Path) -> None:
        self.cfg = cfg
        self.logs = logs
        self.runs: list[Run] = []
        self.variants: list[Run] = []
        self.sweeps: list[Run] = []
        self.cold: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}
        self.handoff: dict[str, Any] | None = None

    async def direct(self) -> None:
        log("direct stdio (the baseline)")
        samples = await scenarios.server_start(self.cfg.cold_samples)
        self.cold["server_start_ms"] = describe(samples)
        log(f"  server start (spawn → initialize answered): median {self.cold['server_start_ms']['median']:.0f} ms")
        target = targets.Direct()
        self.runs += await scenarios.sequential(target, self.cfg, log)
        await self._sweeps(target, "one", "many")

    async def _sweeps(self, target: targets.Target, *users: str) -> None:
        single = next((r for r in self.runs if r.target == target.key and r.client == "lean"), None)
        for kind in users:
            self.sweeps += await scenarios.sweep(target, self.cfg, kind, log, single)

    async def peers(self) -> None:
        log("mcp-proxy")
        async with targets.mcp_proxy(self.logs) as running:
            (target,) = running.targets
            self.runs += await scenarios.sequential(target, self.cfg, log)
            await self._sweeps(target, "one", "many")
            self.memory["mcp_proxy"] = scenarios.process_memory(running.procs["peer"].pid)
        log("supergateway")
        async with targets.supergateway(self.logs) as running:
            (target,) = running.targets
            assert isinstance(target, targets.McpHttp)
            self.memory["supergateway_start"] = scenarios.process_memory(running.procs["peer"].pid)
            self.runs += await scenarios.sequential(target, self.cfg, log)
            await self._sweeps(target, "one", "many")
            samples = await scenarios.mcp_session_cold(target.url_for("bench"), self.cfg.cold_samples)
            self.cold["supergateway_first_call_ms"] = describe(samples)
            self.memory["supergateway"] = scenarios.process_memory(running.procs["peer"].pid)

    async def sidecar(self) -> None:
        log("Pier sidecar")
        parts = await scenarios.sidecar_start(self.cfg.cold_samples, self.logs)
        self.cold["sidecar_listening_ms"] = describe(parts["listening_ms"])
        self.cold["sidecar_ready_ms"] = describe(parts["ready_ms"])
        async with targets.sidecar(self.logs) as running:
            pid = running.procs["sidecar"].pid
            await asyncio.sleep(self.cfg.idle_s)  # idle: started, server initialized, no client yet
            self.memory["sidecar_idle"] = scenarios.process_memory(pid)
            mcp, calls = running.targets
            assert isinstance(mcp, targets.McpHttp)
            self.runs += await scenarios.sequential(mcp, self.cfg, log)
            self.runs.append(await scenarios.sequential_modern(mcp, self.cfg, log))
            self.runs += await scenarios.sequential(calls, self.cfg, log)
            self.variants.append(await scenarios.sequential_variant(mcp, self.cfg, "application/json", "json", log))
            await self._sweeps(mcp, "one")
            await self._sweeps(calls, "one")
            self.memory["sidecar_loaded"] = scenarios.process_memory(pid)

    async def router(self) -> None:
        log("Pier router (pier up)")
        data = self.logs / "router-data"
        async with targets.router(self.logs, data) as running:
            pid = running.procs["router"].pid
            base = running.info["url"]
            await asyncio.sleep(self.cfg.idle_s)
            self.memory["router_idle"] = scenarios.process_memory(pid)
            rest, relay = running.targets
            assert isinstance(relay, targets.McpHttp)
            self.runs += await scenarios.sequential(rest, self.cfg, log)
            self.runs += await scenarios.sequential(relay, self.cfg, log)
            self.runs.append(await scenarios.sequential_modern(relay, self.cfg, log))
            self.variants.append(await scenarios.sequential_variant(relay, self.cfg, "application/json", "json", log))
            samples = await scenarios.router_cold(base, self.cfg.cold_samples, "a")
            self.cold["router_first_call_ms"] = describe(samples)
            log(f"  new user's first call: median {self.cold['router_first_call_ms']['median']:.0f} ms")
            samples = await scenarios.router_pooled_cold(base, self.cfg.cold_samples)
            self.cold["router_pooled_first_call_ms"] = describe(samples)
            log(f"  ...with a warm pool: median {self.cold['router_pooled_first_call_ms']['median']:.0f} ms")
            await self._sweeps(rest, "one", "many")
            await self._sweeps(relay, "one")
            await self._memory_at_sessions(pid, base)
            self.handoff = await scenarios.handoff(running, self.cfg)
            log(
                f"  hand-off: SSE median {self.handoff['sse_ms']['median']:.1f} ms, "
                f"poller median {self.handoff['poll_ms']['median']:.1f} ms after the tool finished"
            )

    async def processes(self) -> None:
        """The router as two processes on one port (PIER_PROCESSES=2): what the second core adds."""
        log("Pier router (pier up), two processes")
        extra = {"PIER_PROCESSES": "2"}
        async with targets.router(self.logs, self.logs / "router-2p-data", extra) as running:
            base = running.info["url"]
            rest = targets.Rest(base, "router-rest-2p", "Pier router REST, two processes")
            url = base + "/v1/users/{user}/servers/" + targets.PROFILE + "/mcp"
            relay = targets.McpHttp("router-mcp-2p", "Pier router MCP relay, two processes", url, targets.AUTH)
            for target in (rest, relay):
                runs = await scenarios.sequential(target, self.cfg, log)
                self.runs += runs
                self.sweeps += await scenarios.sweep(target, self.cfg, "many", log, runs[0], user_prefix="p")

    async def isolation(self) -> None:
        """The router again with local sessions unisolated: what isolation costs a call and a new user."""
        log("Pier router (pier up), sessions unisolated")
        extra = {"PIER_LOCAL_ISOLATION": "none"}
        async with targets.router(self.logs, self.logs / "router-unisolated-data", extra) as running:
            base = running.info["url"]
            rest = targets.Rest(base, "router-rest-unisolated", "Pier router REST, sessions unisolated")
            self.runs += await scenarios.sequential(rest, self.cfg, log)
            samples = await scenarios.router_cold(base, self.cfg.cold_samples, "u")
            self.cold["router_first_call_unisolated_ms"] = describe(samples)
            log(f"  new user's first call: median {self.cold['router_first_call_unisolated_ms']['median']:.0f} ms")

    async def _memory_at_sessions(self, pid: int, base: str) -> None:
        existing = scenarios.router_memory(pid)["sessions"]
        fill_s = await scenarios.fill_sessions(base, self.cfg.memory_sessions, existing)
        await asyncio.sleep(self.cfg.idle_s)  # idle
        now = scenarios.router_memory(pid)
        n = now["sessions"]
        idle = self.memory["router_idle"]["self"]
        growth_rss = now["router"]["rss_mib"] - idle["rss_mib"]
        growth_pss = now["router"]["pss_mib"] - idle["pss_mib"]
        others_rss = sum(m["rss_mib"] for m in now["others"].values())
        others_pss = sum(m["pss_mib"] for m in now["others"].values())
        self.memory["router_sessions"] = now
        self.memory["per_session"] = {
            "sessions": n,
            "fill_s": fill_s,
            "router_rss_mib": now["router"]["rss_mib"],
            "router_growth_rss_mib": round(growth_rss, 1),
            "bridges_rss_mib": now["bridges_rss_mib"],
            "bridges_pss_mib": now["bridges_pss_mib"],
            "servers_rss_mib": now["servers_rss_mib"],
            "servers_pss_mib": now["servers_pss_mib"],
            "server_rss_median_mib": now["server_rss_median_mib"],
            "total_rss_mib": round(
                now["router"]["rss_mib"] + others_rss + now["bridges_rss_mib"] + now["servers_rss_mib"], 1
            ),
            "total_pss_mib": round(
                now["router"]["pss_mib"] + others_pss + now["bridges_pss_mib"] + now["servers_pss_mib"], 1
            ),
            "overhead_rss_mib": round((now["bridges_rss_mib"] + growth_rss) / n, 1) if n else None,
            "overhead_pss_mib": round((now["bridges_pss_mib"] + growth_pss) / n, 1) if n else None,
        }
        per = self.memory["per_session"]
        log(f"  {n} sessions: {per['overhead_rss_mib']} MiB RSS ({per['overhead_pss_mib']} MiB PSS) per session")

    def results(self, meta: dict[str, Any]) -> dict[str, Any]:
        latencies = {f"{r.target}|{r.client}": report.downsample(r.latencies_ms) for r in self.runs}
        return {
            "meta": meta,
            "sequential": [r.summary() for r in self.runs],
            "variants": [r.summary() for r in self.variants],
            "sweep": [r.summary() for r in self.sweeps],
            "cold_start": self.cold,
            "memory": self.memory,
            "handoff": self.handoff,
            "latencies": latencies,
        }


def _output(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=peers.ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _meta(cfg: Config) -> dict[str, Any]:
    pins = peers.Pins.load()
    package = peers.EVERYTHING_JS.parent.parent / "package.json"
    return {
        "quick": cfg.quick,
        "config": cfg.__dict__,
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "loadavg_before": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "pier_rev": _output("git", "describe", "--always", "--dirty"),
        "python": platform.python_version(),
        "node": _output("node", "--version"),
        "versions": {
            "mcp-proxy": pins.mcp_proxy,
            "supergateway": pins.supergateway,
            "server-everything": json.loads(package.read_text()).get("version"),
        },
    }


async def main(quick: bool, only: list[str], traces: bool = False) -> int:
    cfg = Config.make(quick)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = peers.PEERS / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    meta = _meta(cfg)
    meta["traces"] = traces
    log(f"Pier bench, {'quick' if quick else 'full'} mode{', traces on' if traces else ''}; process logs in {logs}")
    bench = Bench(cfg, logs)
    async with otlp_sink(traces, logs) as count_spans:
        await _run_phases(bench, only, meta)
        if traces:
            meta["spans_exported"] = await count_spans()
            log(f"spans the collector received: {meta['spans_exported']}")
    text = report.write(bench.results(meta))
    print("\n" + text, flush=True)
    log(f"written: {report.RESULTS / 'latest.md'}, latest.json, latest.png")
    # Logs of the last runs only: a few MiB each.
    for old in sorted((peers.PEERS / "logs").iterdir())[:-5]:
        shutil.rmtree(old, ignore_errors=True)
    return 0


@contextlib.asynccontextmanager
async def otlp_sink(on: bool, logs: Path) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """With `on`: a collector process, and OTEL_EXPORTER_OTLP_ENDPOINT naming it for every Pier process the
    bench starts (they inherit the bench's environment); yields how to ask it for its span count."""
    if not on:

        async def none() -> int:
            return 0

        yield none
        return
    from bench.processes import free_port, spawn, wait_http

    port = free_port()
    sink = await spawn("otlp-sink", [sys.executable, "-m", "bench.otlp_sink", str(port)], logs)
    base = f"http://127.0.0.1:{port}"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = base
    try:
        await wait_http(f"{base}/count", sink)

        async def count() -> int:
            async with aiohttp.ClientSession() as http, http.get(f"{base}/count") as response:
                spans: int = (await response.json())["spans"]
                return spans

        yield count
    finally:
        os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        await sink.stop()


async def _run_phases(bench: Bench, only: list[str], meta: dict[str, Any]) -> None:
    started = time.monotonic()
    budget = 600 if bench.cfg.quick else 3600  # a wedged run ends; it never holds the machine
    failures: list[str] = []
    async with asyncio.timeout(budget):
        for phase in PHASES:
            if phase not in only:
                continue
            try:
                t0 = time.monotonic()
                await getattr(bench, phase)()
                log(f"  ({phase}: {time.monotonic() - t0:.0f} s)")
            except Exception as exc:  # one broken system must not cost the others' figures
                failures.append(f"{phase}: {type(exc).__name__}: {exc}")
                log(f"  FAILED: {failures[-1]}")
    meta["failures"] = failures
    meta["elapsed_s"] = time.monotonic() - started
    meta["loadavg_after"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under two minutes in all)")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {', '.join(PHASES)}")
    parser.add_argument("--traces", action="store_true", help="Pier's processes export traces to a local collector")
    args = parser.parse_args()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    sys.exit(asyncio.run(main(args.quick, only, args.traces)))


if __name__ == "__main__":
    cli()
