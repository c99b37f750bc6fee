"""Attach mode: the stdio server runs in another container of the pod, wired through FIFOs.

The shared ``emptyDir`` holds ``stdin`` and ``stdout`` FIFOs and ``fifo-wrapper.sh``; the server
container runs ``/bin/sh DIR/fifo-wrapper.sh DIR COMMAND ARGS...`` (nothing but ``/bin/sh`` is
assumed in its image). When the server exits, the bridge sees EOF on ``stdout``, reopens both
FIFOs and waits for the restarted container to connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
from importlib import resources
from pathlib import Path

from pier.sidecar.transport import ServerExit, Transport, split_lines

log = logging.getLogger("pier.sidecar.attach")

WRAPPER_NAME = "fifo-wrapper.sh"
_POLL_S = 0.05


def prepare(directory: Path) -> None:
    """Create the FIFOs and install the wrapper script in `directory` (idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("stdin", "stdout"):
        path = directory / name
        if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
            path.unlink()
        if not path.exists():
            os.mkfifo(path, 0o660)
    wrapper = resources.files("pier.sidecar").joinpath(WRAPPER_NAME)
    with resources.as_file(wrapper) as source:
        shutil.copyfile(source, directory / WRAPPER_NAME)
    (directory / WRAPPER_NAME).chmod(0o755)


class FifoPeer(Transport):
    """Talks to a server container through `DIR/stdin` and `DIR/stdout`."""

    def __init__(self, directory: Path, *, limit: int, stderr_lines: int) -> None:
        super().__init__(limit, stderr_lines)
        self.directory = directory
        self._read_fd: int | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._transports: list[asyncio.BaseTransport] = []

    async def open(self) -> None:
        """Wait for the server side to connect (it blocks opening `stdin` until we do)."""
        prepare(self.directory)
        loop = asyncio.get_running_loop()
        # Read end first, non-blocking: it exists at once, so the wrapper's open of `stdout` never
        # blocks, and epoll reports nothing until a writer has connected (no spurious EOF).
        self._read_fd = os.open(self.directory / "stdout", os.O_RDONLY | os.O_NONBLOCK)
        write_fd = await self._open_writer()
        reader = asyncio.StreamReader(limit=self.limit)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._read_fd, "rb", buffering=0)
        )
        self._read_fd = None  # owned by the pipe transport now
        write_transport, write_protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(write_fd, "wb", buffering=0),
        )
        self._writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
        self._transports = [read_transport, write_transport]
        self._reader_task = asyncio.create_task(split_lines(reader, self.limit, self.on_line, self.on_oversize))
        log.info("attached to server", extra={"dir": str(self.directory)})

    async def _open_writer(self) -> int:
        # A non-blocking open for writing fails with ENXIO until the server side opens `stdin`
        # for reading; polling keeps the wait cancellable (a blocking open in a thread is not).
        while True:
            try:
                return os.open(self.directory / "stdin", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            await asyncio.sleep(_POLL_S)

    async def wait_closed(self) -> ServerExit:
        assert self._reader_task is not None
        with contextlib.suppress(Exception):
            await self._reader_task
        return ServerExit(reason="server container closed its stdout (exited or restarted)")

    async def close(self) -> None:
        self._close_writer()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        for transport in self._transports:
            transport.close()
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        # Let the pipe transports release their file descriptors.
        await asyncio.sleep(0)
