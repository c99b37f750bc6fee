"""The fork-server proposal, measured: bridges forked from a process that has imported Pier.

A local session's bridge is a new Python process that imports aiohttp, pydantic, jsonschema,
prometheus_client… before it can even spawn its server: that is most of a cold start, and most
of a bridge's private memory. A fork-server imports all of it once; each bridge is then an
`os.fork()` of it (`gc.freeze()` first, so the collector does not dirty the shared pages).

`python -m bench.zygote` is the fork-server (Pier's venv, stdin/stdout: one command per line,
``spawn PORT`` → the new bridge's pid). `compare()` (from `bench.experiments --zygote`) starts
N bridges both ways and compares spawn → ready, and RSS/PSS of the bridges (their servers are
separate processes and are left out).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import peers
from bench.processes import free_port, pss_mib, rss_mib, running, spawn, wait_http
from bench.stats import describe


def serve_forks() -> None:
    """The fork-server loop (runs in its own process)."""
    import pier.sidecar.app  # imported for its import cost, paid once here
    import pier.sidecar.main

    gc.collect()
    gc.freeze()  # what exists now is never scanned (hence never written) by the collector again
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, port = line.strip().partition(" ")
        if command != "spawn":
            continue
        pid = os.fork()
        if pid == 0:  # the bridge
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)  # its "listening" line is not needed: the port was chosen for it
            code = pier.sidecar.main.main(["--host", "127.0.0.1", "--port", port, "--", *peers.EVERYTHING])
            os._exit(code)
        print(pid, flush=True)


def _bridge_memory(pids: list[int]) -> dict[str, float]:
    rss = [rss_mib(p) for p in pids]
    pss = [pss_mib(p) for p in pids]
    return {
        "n": len(pids),
        "rss_mib_median": round(sorted(rss)[len(rss) // 2], 1),
        "pss_mib_median": round(sorted(pss)[len(pss) // 2], 1),
        "pss_mib_total": round(sum(pss), 1),
    }


async def _processes(n: int, logs: Path) -> dict[str, Any]:
    """n bridges started as `pier sidecar` processes, one after the other."""
    ready, procs = [], []
    try:
        for i in range(n):
            port = free_port()
            cmd = [*peers.PIER, "sidecar", "--host", "127.0.0.1", "--port", str(port), "--", *peers.EVERYTHING]
            t0 = time.perf_counter()
            proc = await spawn(f"zygote-cmp-process-{i}", cmd, logs, env=dict(os.environ))
            procs.append(proc)
            await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
            ready.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(1.0)
        return {"ready_ms": describe(ready), "memory": _bridge_memory([p.pid for p in procs])}
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


async def _forked(n: int, logs: Path) -> dict[str, Any]:
    """n bridges forked from the fork-server."""
    cmd = [*peers.PIER[:1], "-m", "bench.zygote"]
    ready: list[float] = []
    async with running("zygote", cmd, logs, env=dict(os.environ), stdout_pipe=True, stdin_pipe=True) as server:
        proc = server.proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        t0 = time.perf_counter()
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        warm_ms = (time.perf_counter() - t0) * 1000
        bridges: list[int] = []
        try:
            for _ in range(n):
                port = free_port()
                t0 = time.perf_counter()
                proc.stdin.write(f"spawn {port}\n".encode())
                bridges.append(int(await asyncio.wait_for(proc.stdout.readline(), 10)))
                await wait_http(f"http://127.0.0.1:{port}/readyz", server)
                ready.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(1.0)
            memory = _bridge_memory(bridges)
            memory["fork_server_pss_mib"] = round(pss_mib(server.pid), 1)
        finally:
            for pid in bridges:  # graceful: each bridge stops its server
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(1.0)
    return {"fork_server_warm_ms": round(warm_ms), "ready_ms": describe(ready), "memory": memory}


async def compare(logs: Path, n: int = 8) -> dict[str, Any]:
    print(f"fork-server: {n} bridges started as processes, then {n} forked", flush=True)
    processes = await _processes(n, logs)
    forked = await _forked(n, logs)
    p, f = processes, forked
    lines = [
        f"{n} bridges each way, started one after the other; memory of the bridges alone (their servers "
        "are separate processes).",
        "",
        "| bridges | spawn → ready, median ms (min-max) | RSS MiB, median | PSS MiB, median | PSS MiB, all |",
        "|---|---:|---:|---:|---:|",
        f"| `pier sidecar` processes | {p['ready_ms']['median']:.0f} ({p['ready_ms']['min']:.0f}-"
        f"{p['ready_ms']['max']:.0f}) | {p['memory']['rss_mib_median']} | {p['memory']['pss_mib_median']} | "
        f"{p['memory']['pss_mib_total']} |",
        f"| forked from a warm fork-server | {f['ready_ms']['median']:.0f} ({f['ready_ms']['min']:.0f}-"
        f"{f['ready_ms']['max']:.0f}) | {f['memory']['rss_mib_median']} | {f['memory']['pss_mib_median']} | "
        f"{f['memory']['pss_mib_total']} (+{f['memory']['fork_server_pss_mib']} the fork-server) |",
        "",
        f"The fork-server itself was warm {f['fork_server_warm_ms']} ms after it was spawned (paid once).",
    ]
    print("\n".join(lines), flush=True)
    return {"processes": processes, "forked": forked, "lines": lines}


if __name__ == "__main__":
    serve_forks()
