"""What the bridge needs from a stdio server, wherever it runs: lines in, lines out, an exit.

Two implementations: ``child.ChildProcess`` (the server is the bridge's child) and
``attach.FifoPeer`` (the server runs in another container and talks through FIFOs).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("pier.sidecar.transport")

_READ_CHUNK = 256 * 1024
# Below this much unsent data the pipe is keeping up; waiting on drain() would only cost time.
_DRAIN_ABOVE = 64 * 1024
# Enough of an oversized message to find its id, so the caller waiting for it hears why.
_OVERSIZE_HEAD = 4096
_ID_RE = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')
# Signals a server gets from someone else (an operator, the OOM killer, a container stop), unlike the
# crash signals (SIGSEGV, SIGABRT…) a request can provoke.
_KILLED_FROM_OUTSIDE = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass
class ServerExit:
    """Why a server run ended: shown to callers whose calls it took down."""

    reason: str
    exit_code: int | None = None
    stderr_tail: list[str] = field(default_factory=list)

    def details(self) -> dict[str, object]:
        return {"reason": self.reason, "exit_code": self.exit_code, "stderr_tail": self.stderr_tail[-20:]}

    @property
    def self_inflicted(self) -> bool:
        """Did the server end by itself (an exit, a crash) rather than being killed from outside?"""
        return self.exit_code is None or self.exit_code >= 0 or -self.exit_code not in _KILLED_FROM_OUTSIDE


def oversize_id(head: bytes) -> int | str | None:
    """The JSON-RPC id found near the start of an oversized message, if any."""
    match = _ID_RE.search(head)
    if not match:
        return None
    raw = match.group(1)
    return int(raw) if raw[:1] != b'"' else raw[1:-1].decode("utf-8", "replace")


async def split_lines(
    reader: asyncio.StreamReader,
    limit: int,
    on_line: Callable[[bytes], None],
    on_oversize: Callable[[bytes, int], None],
) -> None:
    """Feed each newline-terminated line to `on_line` until EOF.

    A line longer than `limit` is never buffered whole: its first bytes go to `on_oversize`
    with its size and the rest is skipped, so a runaway server cannot exhaust memory.
    """
    buf = bytearray()
    discarding = False
    head = b""
    skipped = 0
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl
            if discarding:
                skipped += end - start
            else:
                buf += chunk[start:end]
                if len(buf) > limit:
                    discarding, head, skipped = True, bytes(buf[:_OVERSIZE_HEAD]), len(buf)
                    buf.clear()
            if nl < 0:
                break
            if discarding:
                on_oversize(head, skipped)
                discarding, head, skipped = False, b"", 0
            elif buf:
                line = bytes(buf)
                buf.clear()
                on_line(line)
            start = nl + 1


class Transport(abc.ABC):
    """One run of a stdio server. Open it, send lines, receive lines, learn how it ended."""

    def __init__(self, limit: int, stderr_lines: int) -> None:
        self.limit = limit
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self.on_line: Callable[[bytes], None] = lambda line: None
        self.on_oversize: Callable[[bytes, int], None] = lambda head, size: None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def pid(self) -> int | None:
        return None

    @abc.abstractmethod
    async def open(self) -> None:
        """Start (or connect to) the server; lines flow to `on_line` from now on."""

    @abc.abstractmethod
    async def wait_closed(self) -> ServerExit:
        """Wait until the server has gone (EOF or exit) and say why."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the server (or disconnect from it) and release every resource."""

    async def send(self, data: bytes, timeout: float) -> None:
        """Write one message line; wait at most `timeout` for a server that stopped reading."""
        self.send_nowait(data)
        assert self._writer is not None
        if self._writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
            # Only this caller waits for a slow reader; the event loop keeps serving everyone else.
            await asyncio.wait_for(self._writer.drain(), timeout)

    def send_nowait(self, data: bytes) -> None:
        """Queue a small control message; the transport writes it when the pipe has room."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionResetError("server input is closed")
        writer.write(data)

    def _close_writer(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
