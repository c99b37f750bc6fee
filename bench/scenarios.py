"""What is measured: load runs (sequential and concurrent), cold starts, memory, job hand-off.

Every loop is bounded in time and every call in duration; every process is on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import peers
from bench.clients import Caller, RestClient, StdioClient, StreamableHttpClient
from bench.processes import cmdline, cpu_seconds, descendants, pss_mib, role_of, rss_mib, spawn, wait_http
from bench.stats import Run, describe
from bench.targets import AUTH, POOLED_PROFILE, McpHttp, Running, Target, read_listening, sidecar_command

CALL_TIMEOUT_S = 30.0  # one call; a stuck path shows up as errors, never as a hung bench
_MAX_ERRORS = 50  # per caller: a broken path stops early instead of spinning


@dataclass(frozen=True)
class Config:
    """How long and how much: `quick` (under two minutes in all) or full.

    Quick mode sweeps "many users" only up to 4 (each new user starts a server) and reads memory
    at whatever sessions the runs left (full mode tops them up to `memory_sessions`).
    """

    quick: bool
    seq_seconds: float
    warmup_seconds: float
    sweep_levels: tuple[int, ...]
    many_levels: tuple[int, ...]  # "many users": every new user may start a server
    sweep_seconds: float
    sweep_warmup_s: float
    cold_samples: int
    memory_sessions: int
    handoff_samples: int
    handoff_sleep_s: float
    idle_s: float = 1.0  # quiet time before memory is read
    handoff_timeout_s: float = 0.2
    poll_interval_s: float = 0.02

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(
                quick=True, seq_seconds=1.5, warmup_seconds=0.5, sweep_levels=(1, 4, 16), many_levels=(1, 4),
                sweep_seconds=1.0, sweep_warmup_s=0.3, cold_samples=2, memory_sessions=0, handoff_samples=3,
                handoff_sleep_s=0.5, idle_s=0.5,
            )  # fmt: skip
        return cls(
            quick=False, seq_seconds=10.0, warmup_seconds=2.0, sweep_levels=(1, 4, 16, 64), many_levels=(1, 4, 16, 64),
            sweep_seconds=4.0, sweep_warmup_s=1.0, cold_samples=10, memory_sessions=100, handoff_samples=10,
            handoff_sleep_s=1.0, idle_s=2.0,
        )  # fmt: skip


# -- load --------------------------------------------------------------------------------------


def cpu_snapshot() -> dict[int, tuple[str, float, float]]:
    """CPU used so far by the bench (role "client") and everything it started, by pid."""
    me = os.getpid()
    snapshot = {me: ("client", *cpu_seconds(me))}
    for pid in descendants(me):
        snapshot[pid] = (role_of(pid), *cpu_seconds(pid))
    return snapshot


def cpu_per_call(
    before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]], calls: int
) -> dict[str, dict[str, float]]:
    """CPU milliseconds per call by role (user and system), over processes alive for the whole run.

    Unlike latency, CPU time per call hardly depends on how busy the machine is: it says what
    each hop costs, wherever the wall-clock time went.
    """
    out: dict[str, dict[str, float]] = {}
    for pid, (role, user, system) in after.items():
        if pid not in before or not calls:
            continue
        entry = out.setdefault(role, {"user": 0.0, "system": 0.0})
        entry["user"] += (user - before[pid][1]) * 1000 / calls
        entry["system"] += (system - before[pid][2]) * 1000 / calls
    return {role: {k: round(v, 4) for k, v in times.items()} for role, times in out.items()}


async def drive(callers: list[Caller], seconds: float, warmup: float, run: Run) -> Run:
    """Every caller calls in a loop (each waits for its answer) for warmup + seconds.

    Calls that start during the warm-up are not counted; calls that start in the window are,
    and throughput is counted calls over the time from the window's start to the last answer.
    """
    gc.collect()  # the bench's own garbage from the previous run is not this run's pause
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    clock = time.perf_counter
    cpu_before: dict[int, tuple[str, float, float]] = {}
    loop.call_at(start, lambda: cpu_before.update(cpu_snapshot()))

    async def one(caller: Caller) -> None:
        errors = 0
        while (now := loop.time()) < end:
            t0 = clock()
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await caller.echo()
            except Exception as exc:  # any failure is counted and shown, not raised
                errors += 1
                run.errors += 1
                run.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if errors >= _MAX_ERRORS:
                    return
                await asyncio.sleep(0.01)
                continue
            if now >= start:
                run.latencies_ms.append((clock() - t0) * 1000)

    await asyncio.gather(*(one(c) for c in callers))
    run.seconds = loop.time() - start
    run.cpu_ms = cpu_per_call(cpu_before, cpu_snapshot(), run.calls)
    return run


async def close_all(callers: list[Caller]) -> None:
    await asyncio.gather(*(c.close() for c in callers), return_exceptions=True)


async def open_clients(target: Target, users: list[str], parallel: int = 4) -> list[Caller]:
    """One caller per user, a few opened at a time (each may start a server)."""
    gate = asyncio.Semaphore(parallel)

    async def one(user: str) -> Caller:
        async with gate:
            return await target.client(user)

    return list(await asyncio.gather(*(one(u) for u in users)))


async def prime(callers: list[Caller], parallel: int = 4) -> None:
    """One call per caller, a few at a time: sessions that start on first use start now, not in the run."""
    gate = asyncio.Semaphore(parallel)

    async def one(caller: Caller) -> None:
        async with gate, asyncio.timeout(60):  # a session start included
            await caller.echo()

    await asyncio.gather(*(one(c) for c in callers))


async def sequential(target: Target, cfg: Config, progress: Callable[[str], None]) -> list[Run]:
    """One caller, one call at a time: the lean client, then the SDK client (where it applies)."""
    runs = []
    caller = await target.client("bench")
    try:
        await prime([caller])
        runs.append(await drive([caller], cfg.seq_seconds, cfg.warmup_seconds, Run(target.key, "lean")))
    finally:
        await caller.close()
    progress(_line(runs[-1]))
    if target.has_sdk:
        async with target.sdk() as sdk:
            await prime([sdk])
            runs.append(await drive([sdk], cfg.seq_seconds, cfg.warmup_seconds, Run(target.key, "sdk")))
        progress(_line(runs[-1]))
    return runs


async def sequential_variant(
    target: McpHttp, cfg: Config, accept: str, label: str, progress: Callable[[str], None]
) -> Run:
    """The lean client with another Accept header (JSON only: what SSE framing costs)."""
    caller = await target.client("bench", accept=accept)
    try:
        await prime([caller])
        run = await drive([caller], cfg.seq_seconds, cfg.warmup_seconds, Run(f"{target.key}:{label}", "lean"))
    finally:
        await caller.close()
    progress(_line(run))
    return run


async def sequential_modern(target: McpHttp, cfg: Config, progress: Callable[[str], None]) -> Run:
    """The lean client speaking 2026-07-28 (stateless: its `_meta` and headers on every request)."""
    caller = await target.modern_client("bench")
    try:
        await prime([caller])
        run = await drive([caller], cfg.seq_seconds, cfg.warmup_seconds, Run(f"{target.key}-2026", "lean"))
    finally:
        await caller.close()
    progress(_line(run))
    return run


async def sweep(
    target: Target,
    cfg: Config,
    users: str,
    progress: Callable[[str], None],
    single: Run | None = None,
    user_prefix: str = "u",
) -> list[Run]:
    """Concurrency sweep with lean clients: `users` "one" (a shared session) or "many" (one each).

    One caller is one caller either way: with `single` (the sequential lean run) that level is
    taken from it rather than measured again.
    """
    runs = []
    for level in cfg.sweep_levels if users == "one" else cfg.many_levels:
        if level == 1 and single is not None:
            runs.append(dataclasses.replace(single, users=users))
            continue
        if users == "one":
            callers = await target.clients_one_user(level)
        else:
            callers = await open_clients(target, [f"{user_prefix}{i}" for i in range(level)])
        run = Run(target.key, "lean", level, users)
        try:
            await prime(callers)
            runs.append(await drive(callers, cfg.sweep_seconds, cfg.sweep_warmup_s, run))
        except Exception as exc:  # a level that cannot even start is reported, and the sweep goes on
            run.errors, run.last_error = run.errors + 1, f"{type(exc).__name__}: {str(exc)[:200]}"
            runs.append(run)
        finally:
            await close_all(callers)
        progress(_line(runs[-1]))
    return runs


def _line(run: Run) -> str:
    s = run.summary()
    errors = f"  ERRORS {s['errors']}: {s['last_error']}" if s["errors"] else ""
    return (
        f"  {s['target']:<24} {s['client']:<4} c={s['concurrency']:<3} {s['users']:<4} "
        f"{s['calls_per_s']:>8.0f} calls/s  p50 {s['p50_ms']:7.3f} ms  p99 {s['p99_ms']:7.3f} ms{errors}"
    )


# -- cold starts -------------------------------------------------------------------------------


async def server_start(samples: int) -> list[float]:
    """The server's own start: spawn `node …/dist/index.js stdio` → its initialize answered (ms)."""
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        client = await StdioClient.start(peers.EVERYTHING)
        await client.initialize()
        out.append((time.perf_counter() - t0) * 1000)
        await client.close()
    return out


async def sidecar_start(samples: int, logs: Path) -> dict[str, list[float]]:
    """A bridge's start, in parts: spawn → listening (Python and imports) → ready (server initialized)."""
    listening, ready = [], []
    for n in range(samples):
        t0 = time.perf_counter()
        proc = await spawn(f"sidecar-start-{n}", sidecar_command(), logs, env=dict(os.environ), stdout_pipe=True)
        try:
            base = await read_listening(proc)
            listening.append((time.perf_counter() - t0) * 1000)
            await wait_http(f"{base}/readyz", proc)
            ready.append((time.perf_counter() - t0) * 1000)
        finally:
            await proc.stop()
    return {"listening_ms": listening, "ready_ms": ready}


async def first_call(
    make: Callable[[int], Awaitable[Caller]], samples: int, settle_s: float = 0.2, time_make: bool = True
) -> list[float]:
    """A new user's first call, end to end: its session is started (or claimed) by that call (ms).

    `time_make`: whether making the caller (its connection, an MCP initialize) counts.
    """
    out = []
    for n in range(samples):
        t0 = time.perf_counter()
        caller = await make(n)
        if not time_make:
            t0 = time.perf_counter()
        try:
            async with asyncio.timeout(120):
                await caller.echo()
            out.append((time.perf_counter() - t0) * 1000)
        finally:
            await caller.close()
        await asyncio.sleep(settle_s)  # let the new session settle (the pool refill): samples must not overlap
    return out


async def router_cold(base: str, samples: int, tag: str) -> list[float]:
    async def make(n: int) -> Caller:
        return RestClient(base, f"cold-{tag}-{n}", "everything", AUTH)

    return await first_call(make, samples)


async def router_pooled_cold(base: str, samples: int) -> list[float]:
    """A new user's first call with a warm pool, on an open connection as a warm call's is (ms)."""

    async def make(n: int) -> Caller:
        client = RestClient(base, f"cold-pooled-{n}", POOLED_PROFILE, AUTH)
        await client.connect(f"{base}/healthz")
        return client

    # Each claim's replacement starts after it: give it the server's start time before the next sample.
    return await first_call(make, samples, settle_s=2.0, time_make=False)


async def mcp_session_cold(url: str, samples: int) -> list[float]:
    """A new MCP session's initialize + first call (supergateway starts a server per session)."""

    async def make(n: int) -> Caller:
        client = StreamableHttpClient(url)
        await client.initialize()
        return client

    return await first_call(make, samples)


# -- memory ------------------------------------------------------------------------------------


def mem(pid: int) -> dict[str, float]:
    try:
        return {"rss_mib": round(rss_mib(pid), 1), "pss_mib": round(pss_mib(pid), 1)}
    except OSError:
        return {"rss_mib": float("nan"), "pss_mib": float("nan")}


def process_memory(pid: int) -> dict[str, Any]:
    """A process alone, and its descendants (e.g. a gateway's server children), separately."""
    kids = descendants(pid)
    kid_mem = [mem(k) for k in kids]
    return {
        "self": mem(pid),
        "children": len(kids),
        "children_rss_mib": round(sum(m["rss_mib"] for m in kid_mem), 1),
        "children_pss_mib": round(sum(m["pss_mib"] for m in kid_mem), 1),
    }


def router_memory(router_pid: int) -> dict[str, Any]:
    """The router, its bridges (`pier sidecar` processes, none with in-process bridges) and their
    servers, each summed; a session is counted by its server (one each, whatever the bridge mode)."""
    bridges, servers, others = [], [], []
    for pid in descendants(router_pid):
        line = cmdline(pid)
        if "pier.cli sidecar" in line:
            bridges.append(pid)
        elif "server-everything" in line or "demo_server" in line:
            servers.append(pid)
        else:
            others.append(pid)  # redis-server
    b = [mem(p) for p in bridges]
    s = [mem(p) for p in servers]
    return {
        "router": mem(router_pid),
        "others": {cmdline(p).split()[0].rsplit("/", 1)[-1]: mem(p) for p in others},
        "sessions": len(servers),
        "bridges_rss_mib": round(sum(m["rss_mib"] for m in b), 1),
        "bridges_pss_mib": round(sum(m["pss_mib"] for m in b), 1),
        "bridge_rss_median_mib": sorted(m["rss_mib"] for m in b)[len(b) // 2] if b else None,
        "servers_rss_mib": round(sum(m["rss_mib"] for m in s), 1),
        "servers_pss_mib": round(sum(m["pss_mib"] for m in s), 1),
        "server_rss_median_mib": sorted(m["rss_mib"] for m in s)[len(s) // 2] if s else None,
    }


async def fill_sessions(base: str, count: int, existing: int, parallel: int = 4) -> float:
    """Start sessions (users mem-0…) until the router holds `count`; returns the seconds it took."""
    t0 = time.perf_counter()
    callers: list[Caller] = [RestClient(base, f"mem-{n}", "everything", AUTH) for n in range(max(0, count - existing))]
    try:
        await prime(callers, parallel)
    finally:
        await close_all(callers)
    return time.perf_counter() - t0


# -- job hand-off ------------------------------------------------------------------------------


async def handoff(running: Running, cfg: Config) -> dict[str, Any]:
    """Delay from the tool finishing to its result reaching an SSE client and a poller.

    A `slow(seconds)` call on the demo profile with `timeout_s` below its sleep is handed to the
    job pool (202). An SSE client (`/v1/jobs/{id}/events`) and a poller (`GET /v1/jobs/{id}`
    every `poll_interval_s`) then wait for it. The tool's finish is taken from the bridge that
    ran it: its call record's `finished_at` is when the server's answer arrived on stdout
    (read after the fact through the job record's endpoint, with the session's token). All
    clocks are this host's wall clock. The expected sleep end (request + seconds) is kept as a
    cross-check.
    """
    import redis.asyncio as aioredis

    base = running.info["url"]
    redis = aioredis.from_url(running.info["redis_url"])
    samples: list[dict[str, float]] = []
    async with aiohttp.ClientSession(headers=AUTH) as http:
        user_url = f"{base}/v1/users/handoff/servers/demo"
        async with http.post(f"{user_url}/tools/echo/call", json={"arguments": {"message": "warm"}}) as response:
            assert response.status == 200, await response.text()  # the demo session is up before timing
        for _ in range(cfg.handoff_samples):
            samples.append(await _one_handoff(http, redis, base, user_url, cfg))
    await redis.aclose()
    keys = ("sse_ms", "poll_ms", "record_ms", "sse_vs_expected_ms")
    return {
        "method": "bridge call finished_at (server answer read) → client receive time; host wall clock",
        "sleep_s": cfg.handoff_sleep_s,
        "timeout_s": cfg.handoff_timeout_s,
        "poll_interval_s": cfg.poll_interval_s,
        "samples": samples,
        **{key: describe([s[key] for s in samples]) for key in keys},
    }


async def _one_handoff(
    http: aiohttp.ClientSession, redis: Any, base: str, user_url: str, cfg: Config
) -> dict[str, float]:
    body = {"arguments": {"seconds": cfg.handoff_sleep_s}, "timeout_s": cfg.handoff_timeout_s}
    sent = time.time()
    async with http.post(f"{user_url}/tools/slow/call", json=body) as response:
        queued = await response.json()
    if response.status != 202:
        raise RuntimeError(f"the slow call was not handed off: {response.status} {queued}")
    job_id = queued["job_id"]

    async def sse() -> float:
        async with http.get(f"{base}/v1/jobs/{job_id}/events", timeout=aiohttp.ClientTimeout(total=60)) as events:
            async for line in events.content:
                if line.startswith(b"event: completed"):
                    return time.time()
        raise RuntimeError("the event stream ended without a completed event")

    async def poll() -> float:
        async with asyncio.timeout(60):
            while True:
                async with http.get(f"{base}/v1/jobs/{job_id}") as response:
                    view = await response.json()
                if view["status"] == "completed":
                    return time.time()
                if view["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"the job ended {view['status']}: {view.get('error')}")
                await asyncio.sleep(cfg.poll_interval_s)

    sse_at, poll_at = await asyncio.gather(sse(), poll())
    record = orjson.loads(await redis.get(f"pier:job:{job_id}"))
    headers = {"Authorization": f"Bearer {record['endpoint_token']}"}
    async with http.get(f"{record['endpoint']}/v1/calls/{record['call_id']}", headers=headers) as response:
        call = await response.json()
    finished = call["finished_at"]
    last_progress = finished
    with contextlib.suppress(KeyError, IndexError, TypeError):
        last_progress = call["progress"][-1]["at"]  # the tool's last report, right before it returned
    return {
        "sse_ms": (sse_at - finished) * 1000,
        "poll_ms": (poll_at - finished) * 1000,
        "record_ms": (record["finished_at"] - finished) * 1000,  # the worker stored the result
        "sse_vs_expected_ms": (sse_at - (sent + cfg.handoff_sleep_s)) * 1000,
        "tool_last_progress_to_finish_ms": (finished - last_progress) * 1000,
    }
