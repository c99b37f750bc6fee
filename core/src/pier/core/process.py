"""Child processes that never outlive their parent, nor do theirs."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading

_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def die_with_parent() -> None:
    """A `preexec_fn`: if the parent dies, even by SIGKILL, the kernel kills this child too."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def clean_env(drop_prefixes: tuple[str, ...] = ("PIER_", "OTEL_")) -> dict[str, str]:
    """This process's environment without Pier's own settings (they may hold keys and tokens), nor its
    trace export's (a collector's credentials, Pier's service name: a profile gives its servers their own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


# The watchdog's whole program (stdlib only, started with -I -S: a few MiB, a few ms). It learns
# process groups on stdin ("+PGID" / "-PGID") and, when stdin ends, kills the groups it still knows.
_WATCHDOG = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupWatchdog:
    """Kills the process groups of this process's servers when this process dies, however it dies.

    `die_with_parent` takes a server down with its parent, but not what the server started itself
    (`helper & exec server`): those would live on after a SIGKILL. Stdin of a small watchdog
    process is a pipe only this process holds, so the kernel ends it when this process dies, even
    by SIGKILL; the watchdog then kills every group still registered.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # registrations come from the event loop; atexit from anywhere

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                # An empty environment: the watchdog needs none, and must not hold the keys in ours.
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _WATCHDOG], stdin=subprocess.PIPE, start_new_session=True, env={}
                )
            assert self._proc.stdin is not None
            # A few bytes into a pipe the watchdog keeps draining: never blocks.
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()

    def close(self) -> None:
        """Stop the watchdog (the groups still registered are killed) and reap it."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


WATCHDOG = GroupWatchdog()
atexit.register(WATCHDOG.close)
