"""Where the time goes: py-spy (sampling, from outside) on the sidecar and the router under load.

    python -m bench.profile [--seconds 10] [--only sidecar-mcp,sidecar-calls,router-rest,router-mcp]
                            [--callers N [--many]] [--pyinstrument]

Each path is started fresh and driven by one lean client making sequential echo calls (or by
`--callers N` of them at once: on one user's session, or with `--many` one user and session each) while
py-spy samples the process (the router with its bridges, `--subprocesses`) without pausing it
(`--nonblocking`). Only samples that hold the GIL are kept (`--gil`): the shares are of the time
spent running Python code. Syscalls release the GIL, so their cost is not in these shares; it
is in the CPU accounting (system time per call, from /proc) printed with each path. (Without
`--gil`, py-spy counts a thread woken by epoll but waiting for a CPU as busy in whatever it last
called — on a loaded two-core machine that made socket writes look like 30-50% of the time.)
The raw stacks land in bench/results/profile-<path>.txt (flamegraph.pl input), the summary in
bench/results/profile.md. With `--pyinstrument`, the sidecar also runs once under
pyinstrument (wall clock, async-aware call tree): bench/results/pyinstrument-sidecar.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers, targets
from bench.processes import running
from bench.report import RESULTS
from bench.scenarios import close_all, drive, open_clients, prime
from bench.stats import Run

PATHS = ("sidecar-mcp", "sidecar-calls", "router-rest", "router-mcp")
_WAIT_LEAVES = ("EpollSelector.select (selectors)", "select (selectors)")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    for candidate in (peers.BENCH_VENV / "bin" / "py-spy", shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("py-spy is missing: run `python -m bench.peers`")


# -- reading py-spy's raw (collapsed) stacks ---------------------------------------------------


def module_of(path: str) -> str:
    """A short name for a frame's file: `pier.sidecar.streamable`, `aiohttp.web_protocol`, `asyncio.events`."""
    path = path.replace("\\", "/")
    for marker, prefix in (
        ("/site-packages/", ""),
        ("/src/pier/", "pier."),  # the workspace's components: <component>/src/pier/<component>/…
        ("/lib/python3.11/", ""),
    ):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return prefix + rest.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    return path.rsplit("/", 1)[-1].removesuffix(".py")


def package_of(module: str) -> str:
    """The owner of a module, for the breakdown: pier's parts separately, libraries by top package."""
    if module.startswith("pier."):
        return ".".join(module.split(".")[:2]) if module.count(".") >= 2 else module
    return module.split(".", maxsplit=1)[0]


@dataclass
class Profile:
    """Samples per process, with self (leaf) and inclusive counts per function and package.

    Samples whose leaf is the event loop's epoll wait are counted apart (`waiting`): py-spy
    counts a thread as busy while it is runnable, so on a loaded machine they are mostly a
    thread woken by epoll waiting for a CPU; they are not work the code does.
    """

    name: str
    total: int = 0
    waiting: int = 0
    self_funcs: collections.Counter[str] = field(default_factory=collections.Counter)
    incl_funcs: collections.Counter[str] = field(default_factory=collections.Counter)
    self_packages: collections.Counter[str] = field(default_factory=collections.Counter)
    incl_packages: collections.Counter[str] = field(default_factory=collections.Counter)


def parse(raw: str) -> dict[str, Profile]:
    """py-spy `--format raw` lines (`frame;frame;... count`, root first) → a Profile per process."""
    profiles: dict[str, Profile] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        process = "main"
        while frames and frames[0].startswith("process "):  # parent first: the last one is the sampled one
            process = _process_name(frames.pop(0))
        parsed = []
        for frame in frames:
            match = _FRAME.match(frame)
            if match is None:
                continue  # thread markers and the like
            module = module_of(match["file"])
            parsed.append((f"{match['func']} ({module})", package_of(module)))
        if not parsed:
            continue
        profile = profiles.setdefault(process, Profile(process))
        leaf_func, leaf_package = parsed[-1]
        if leaf_func.startswith(_WAIT_LEAVES):
            profile.waiting += count
            continue
        profile.total += count
        profile.self_funcs[leaf_func] += count
        profile.self_packages[leaf_package] += count
        for func in {f for f, _ in parsed}:
            profile.incl_funcs[func] += count
        for package in {p for _, p in parsed}:
            profile.incl_packages[package] += count
    return profiles


def _process_name(frame: str) -> str:
    # `process 1234:"python -m pier.cli sidecar ..."`: the role, not the pid, names it.
    if "pier.cli sidecar" in frame:
        return "bridge (pier sidecar)"
    if "pier.cli up" in frame or "pier.cli router" in frame:
        return "router (pier up)"
    return frame.split(":", 1)[-1].strip('"')[:60]


def merge(profiles: list[Profile], name: str) -> Profile:
    merged = Profile(name)
    for p in profiles:
        merged.total += p.total
        merged.waiting += p.waiting
        for attr in ("self_funcs", "incl_funcs", "self_packages", "incl_packages"):
            getattr(merged, attr).update(getattr(p, attr))
    return merged


def render(profile: Profile, top: int = 20) -> list[str]:
    def pct(n: int) -> str:
        return f"{100 * n / profile.total:5.1f}%" if profile.total else "-"

    lines = [
        f"#### {profile.name}: {profile.total} busy samples (+{profile.waiting} in the epoll wait, left out)",
        "",
        "| package | self | inclusive |",
        "|---|---:|---:|",
    ]
    for package, count in profile.self_packages.most_common(15):
        lines.append(f"| {package} | {pct(count)} | {pct(profile.incl_packages[package])} |")
    lines += ["", "| top functions by self time | self |", "|---|---:|"]
    lines += [f"| `{func}` | {pct(count)} |" for func, count in profile.self_funcs.most_common(top)]
    pier = [(f, c) for f, c in profile.incl_funcs.most_common() if "(pier." in f][:top]
    lines += ["", "| Pier functions by inclusive time | inclusive |", "|---|---:|"]
    lines += [f"| `{func}` | {pct(count)} |" for func, count in pier]
    return [*lines, ""]


# -- running -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def system(path: str, logs: Path) -> AsyncIterator[tuple[targets.Target, int]]:
    """The path's system, started fresh: its target and the pid to sample."""
    if path.startswith("sidecar"):
        async with targets.sidecar(logs) as started:
            target = next(t for t in started.targets if t.key == path)
            yield target, started.procs["sidecar"].pid
    else:
        async with targets.router(logs, logs / "router-data") as started:
            target = next(t for t in started.targets if t.key == path)
            yield target, started.procs["router"].pid


async def profile_path(
    path: str, seconds: float, logs: Path, callers: int = 1, many: bool = False
) -> tuple[dict[str, Profile], Run]:
    load = f"-c{callers}-{'many' if many else 'one'}" if callers > 1 else ""
    raw_file = RESULTS / f"profile-{path}{load}.txt"
    async with system(path, logs) as (target, pid):
        if many:
            clients = await open_clients(target, [f"profiled-{n}" for n in range(callers)])
        else:
            clients = await target.clients_one_user(callers)
        try:
            await prime(clients)
            cmd = [
                py_spy(), "record", "--pid", str(pid), "--rate", "500", "--nonblocking", "--format", "raw",
                "--full-filenames", "--gil", "--duration", str(int(seconds)), "--output", str(raw_file),
            ]  # fmt: skip
            if path.startswith("router"):
                cmd.append("--subprocesses")  # the bridges too
            async with running(f"py-spy-{path}", cmd, logs) as spy:
                await asyncio.sleep(1.0)  # py-spy attaches
                run = await drive(clients, seconds, 0.5, Run(path, "lean", callers, "many" if many else "one"))
                await asyncio.wait_for(spy.proc.wait(), seconds + 30)
        finally:
            await close_all(clients)
    return parse(raw_file.read_text()), run


async def pyinstrument_sidecar(seconds: float, logs: Path) -> Path:
    """The sidecar under pyinstrument (run by the bench venv's Python, which sees Pier's venv)."""
    out = RESULTS / "pyinstrument-sidecar.txt"
    cmd = [
        str(peers.BENCH_PYTHON), "-m", "pyinstrument", "--renderer", "text", "--outfile", str(out),
        "--interval", "0.0005", "-m", "pier.cli", "sidecar", "--host", "127.0.0.1", "--port", "0", "--",
        *peers.EVERYTHING,
    ]  # fmt: skip
    async with running("pyinstrument-sidecar", cmd, logs, env=dict(os.environ), stdout_pipe=True) as proc:
        base = await targets.read_listening(proc)
        target = targets.McpHttp("sidecar-mcp", "", f"{base}/mcp")
        caller = await target.client("bench")
        try:
            await prime([caller])
            await drive([caller], seconds, 0.5, Run("sidecar-mcp", "lean"))
        finally:
            await caller.close()
        proc.proc.send_signal(2)  # SIGINT: the bridge stops cleanly, pyinstrument writes its report
        await asyncio.wait_for(proc.proc.wait(), 60)
    return out


async def main(seconds: float, only: list[str], with_pyinstrument: bool, callers: int, many: bool) -> None:
    logs = peers.PEERS / "logs" / ("profile-" + time.strftime("%Y%m%d-%H%M%S"))
    RESULTS.mkdir(exist_ok=True)
    lines = [
        f"# Where the time goes (py-spy, samples holding the GIL, echo calls, {callers} lean caller(s)"
        f"{', one user each' if many else ''})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · load average {os.getloadavg()[0]:.1f} · {seconds:.0f} s per path · "
        "self = the function itself was running; inclusive = it was on the stack. Syscalls are not "
        "in these shares (they release the GIL): see the system share of the CPU per call.",
        "",
    ]
    for path in only:
        print(f"profiling {path}", flush=True)
        profiles, run = await profile_path(path, seconds, logs, callers, many)
        s = run.summary()
        cpu = ", ".join(f"{role} {t['user'] + t['system']:.3f}" for role, t in sorted(run.cpu_ms.items()))
        lines += [
            f"### {path}",
            "",
            f"While sampled: {s['calls_per_s']:.0f} calls/s, p50 {s['p50_ms']:.3f} ms; "
            f"CPU ms per call by process: {cpu}.",
            "",
        ]
        for profile in sorted(profiles.values(), key=lambda p: -p.total):
            if profile.total >= 20:  # the worker's idle loop, redis-server: noise
                lines += render(profile)
    if with_pyinstrument:
        out = await pyinstrument_sidecar(seconds, logs)
        lines += [f"pyinstrument call tree of the sidecar (/mcp): `{out.name}`", ""]
    name = f"profile-c{callers}-{'many' if many else 'one'}.md" if callers > 1 else "profile.md"
    (RESULTS / name).write_text("\n".join(lines))
    print("\n".join(lines))


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default=",".join(PATHS))
    parser.add_argument("--pyinstrument", action="store_true")
    parser.add_argument("--callers", type=int, default=1, help="callers at once (default: one, sequential)")
    parser.add_argument("--many", action="store_true", help="one user, hence one session, per caller")
    args = parser.parse_args()
    only = [p for p in args.only.split(",") if p]
    if set(only) - set(PATHS):
        parser.error(f"paths are {', '.join(PATHS)}")
    asyncio.run(main(args.seconds, only, args.pyinstrument, args.callers, args.many))


if __name__ == "__main__":
    cli()
