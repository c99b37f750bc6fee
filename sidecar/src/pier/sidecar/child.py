"""Child mode: the stdio server is the bridge's own subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from pier.core.process import WATCHDOG, die_with_parent
from pier.core.sandbox import Confinement
from pier.sidecar.transport import ServerExit, Transport, split_lines

log = logging.getLogger("pier.sidecar.child")


class ChildProcess(Transport):
    """Spawns `command` in its own process group, so stopping it stops everything it started.

    With a `confinement` (local sessions) the server runs in its sandbox or under its own uid; its
    stdio, process group and exit status are the same to the bridge.
    """

    def __init__(
        self,
        command: list[str],
        *,
        limit: int,
        stderr_lines: int,
        kill_timeout: float,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        super().__init__(limit, stderr_lines)
        self.command = command
        self.cwd = cwd
        self.env = env
        self.confinement = confinement
        self.kill_timeout = kill_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def open(self) -> None:
        argv, cwd, env, options = self.command, self.cwd, self.env, {}
        if self.confinement is not None:
            jail = self.confinement
            argv, cwd, options = jail.command(argv, cwd), jail.cwd(cwd), jail.spawn_options()
            env = jail.environment(env if env is not None else dict(os.environ))
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # only calls prctl (after any uid change): safe between fork and exec
            limit=self.limit,
            **options,
        )
        WATCHDOG.watch(self._proc.pid)  # its own group (start_new_session): helpers it starts go with it
        self._writer = self._proc.stdin
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._tasks = [
            asyncio.create_task(split_lines(self._proc.stdout, self.limit, self.on_line, self.on_oversize)),
            asyncio.create_task(self._read_stderr(self._proc.stderr)),
        ]
        log.info("server started", extra={"pid": self._proc.pid, "command": self.command})

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        # Kept as a bounded tail for /v1/logs and crash reports; long lines are cut, never buffered whole.
        await split_lines(
            stream,
            self.limit,
            lambda line: self.stderr_tail.append(line[:4096].decode("utf-8", "replace")),
            lambda head, size: self.stderr_tail.append(f"<{size} bytes skipped>"),
        )

    async def wait_closed(self) -> ServerExit:
        assert self._proc is not None
        stdout_task = self._tasks[0]
        wait_task = asyncio.ensure_future(self._proc.wait())
        try:
            # Whichever comes first: a grandchild may hold stdout open after the server exits.
            await asyncio.wait({stdout_task, wait_task}, return_when=asyncio.FIRST_COMPLETED)
            if not wait_task.done():
                # stdout closed but the process lives on: it can no longer answer; end it.
                await self._terminate()
            code = await wait_task
        finally:
            wait_task.cancel()
        if self.confinement is not None:
            code = self.confinement.exit_code(code)
        # Let the stderr reader catch the last words of the process.
        await asyncio.wait({self._tasks[1]}, timeout=0.5)
        reason = f"server exited with code {code}" if code >= 0 else f"server killed by signal {-code}"
        return ServerExit(reason=reason, exit_code=code, stderr_tail=list(self.stderr_tail))

    async def close(self) -> None:
        """Close stdin (the polite stop for stdio servers), then SIGTERM, then SIGKILL the group."""
        if self._proc is not None:
            self._close_writer()
            if self._proc.returncode is None:
                try:
                    await asyncio.wait_for(self._proc.wait(), self.kill_timeout / 2)
                except TimeoutError:
                    await self._terminate()
            # The server is gone; anything it left in its process group goes too.
            self._signal_group(signal.SIGKILL)
            WATCHDOG.forget(self._proc.pid)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _terminate(self) -> None:
        assert self._proc is not None
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), self.kill_timeout)
        except TimeoutError:
            log.warning("server ignored SIGTERM; killing it", extra={"pid": self._proc.pid})
            self._signal_group(signal.SIGKILL)
            await self._proc.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
