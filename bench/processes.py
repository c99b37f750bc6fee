"""Processes the bench starts: spawned in their own process group, stopped by their own ids.

Everything listens on 127.0.0.1 only; every wait is bounded. Memory is read from /proc
(VmRSS, and PSS from smaps_rollup, which splits shared pages fairly between processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_bench() -> None:
    # If the bench itself is killed, the kernel kills what it started (no stray load left behind).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A free loopback port (for peers that cannot be told to pick one themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A process the bench started (the leader of its own process group)."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace`, then SIGKILL it: nothing of it survives."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        # Children that outlived their leader (same group) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            await self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def spawn(
    name: str,
    cmd: list[str],
    logs: Path,
    env: dict[str, str] | None = None,
    stdout_pipe: bool = False,
    stdin_pipe: bool = False,
) -> Proc:
    """Start `cmd` in its own process group; stderr (and stdout unless piped) go to logs/NAME.log."""
    logs.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per process start, on a local disk
    log = logs / f"{name}.log"
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else sink,
            stderr=sink,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_bench,
        )
    return Proc(name, proc, log)


@contextlib.asynccontextmanager
async def running(
    name: str,
    cmd: list[str],
    logs: Path,
    env: dict[str, str] | None = None,
    stdout_pipe: bool = False,
    stdin_pipe: bool = False,
) -> AsyncIterator[Proc]:
    proc = await spawn(name, cmd, logs, env, stdout_pipe, stdin_pipe)
    try:
        yield proc
    finally:
        await proc.stop()


async def wait_http(url: str, proc: Proc, timeout: float = 60.0, ok: tuple[int, ...] = (200,)) -> float:
    """Poll `url` until it answers one of `ok` (any status when `ok` is empty); returns the wait."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.proc.returncode is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if not ok or response.status in ok:
                        return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{proc.name} did not answer {url} within {timeout} s:\n{proc.tail()}")
            await asyncio.sleep(0.02)


# -- memory ----------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    """Resident set size (VmRSS): what `ps` and `top` show; shared pages count in every process."""
    return _status_kib(pid, "VmRSS") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among their users, so PSS sums to real use."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    stack = children(pid)
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children(child))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (0, 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: fields are counted after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def role_of(pid: int) -> str:
    """What a process is, from its command line (for per-process CPU and memory figures)."""
    line = cmdline(pid)
    if "pier.cli sidecar" in line:
        return "bridge"
    # Before "server": a gateway's command line names the server it runs.
    if "/bin/mcp-proxy" in line or "supergateway/dist" in line:
        return "gateway"
    if "server-everything" in line or "demo_server" in line:
        return "server"
    if "redis-server" in line:
        return "redis"
    if "pier.cli up" in line or "pier.cli router" in line:
        return "router"
    return line.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
