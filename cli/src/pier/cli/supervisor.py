"""The router as several processes on one port (`PIER_PROCESSES` > 1), kept running by this one.

Each process is `pier router --process I --run-dir D`: the same router, told its index and the run
directory it shares with the others (`pier.router.processes`). The first process binds the port (0
picks a free one), the others then bind the same. A process that dies is started again (its users'
requests get 503 `SERVER_UNAVAILABLE` meanwhile: their sessions died with it); SIGTERM or SIGINT
stops them all, each draining its calls as a lone router would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pier.core.jsonrpc import loads
from pier.core.process import die_with_parent

log = logging.getLogger("pier.cli.supervisor")

_READY_TIMEOUT_S = 120.0
_STOP_GRACE_S = 60.0  # a process's own shutdown: its bridges drain their calls first
_BACKOFF_S = (0.5, 10.0)  # between restarts of a process that keeps dying: first, most
_STABLE_S = 60.0  # a process up this long starts the backoff afresh when it dies


class Supervisor:
    """Starts `count` router processes, restarts the ones that die, stops them all."""

    def __init__(self, count: int, extra_args: list[str], env: dict[str, str]) -> None:
        self.count = count
        self.extra_args = extra_args
        self.env = env
        self.run_dir = Path(tempfile.mkdtemp(prefix="pier-router-"))  # 0700: sockets, metrics
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.url = ""
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()
        self._backoff = dict.fromkeys(range(count), _BACKOFF_S[0])

    async def start(self) -> str:
        """Every process started and listening; the URL they serve."""
        self.url = await self._spawn(0, self.env.get("PIER_PORT", "8000"))
        port = self.url.rsplit(":", 1)[1]  # the first one's, when it was 0
        self.env["PIER_PORT"] = port
        await asyncio.gather(*(self._spawn(i, port) for i in range(1, self.count)))
        return self.url

    async def _spawn(self, index: int, port: str) -> str:
        env = {**self.env, "PIER_PORT": port, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        argv = [sys.executable, "-m", "pier.cli", "router", "--process", str(index), "--run-dir", str(self.run_dir)]
        proc = await asyncio.create_subprocess_exec(
            *argv, *self.extra_args, env=env, stdout=subprocess.PIPE, preexec_fn=die_with_parent
        )
        self.procs[index] = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), _READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            await _end(proc)
            raise RuntimeError(f"router process {index} exited (code {proc.returncode}) before it listened")
        watcher = asyncio.create_task(self._watch(index, proc, time.monotonic()), name=f"pier-process-{index}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        url: str = loads(line)["url"]
        return url

    async def _watch(self, index: int, proc: asyncio.subprocess.Process, started: float) -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(65536):  # nothing more is written there; drained all the same
            pass
        code = await proc.wait()
        _forget_metrics(self.metrics_dir, proc.pid)
        if self._stopping:
            return
        # One that keeps dying waits longer and longer to start again; one that ran a while, briefly.
        if time.monotonic() - started > _STABLE_S:
            self._backoff[index] = _BACKOFF_S[0]
        log.error("a router process died; starting it again", extra={"router_process": index, "code": code})
        while not self._stopping:
            await asyncio.sleep(self._backoff[index])
            self._backoff[index] = min(self._backoff[index] * 2, _BACKOFF_S[1])
            try:
                await self._spawn(index, self.env["PIER_PORT"])
                return
            except (RuntimeError, OSError) as exc:
                log.error("a router process did not start", extra={"router_process": index, "error": str(exc)})

    async def stop(self) -> None:
        """SIGTERM to every process, SIGKILL to any still there after the grace period; reaped."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(_end(proc, graceful=True) for proc in self.procs.values()))
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def _end(proc: asyncio.subprocess.Process, graceful: bool = False) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _forget_metrics(directory: Path, pid: int) -> None:
    """A dead process's live gauges stop counting (its counters stay: they happened)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


async def run_until_stopped(supervisor: Supervisor, on_ready: Callable[[str], None] | None = None) -> None:
    """Start the processes, wait for SIGTERM/SIGINT, stop them."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await supervisor.start()
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await supervisor.stop()
