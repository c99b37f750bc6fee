"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def die_with_parent() -> None:
    """A `preexec_fn`: if the parent dies, even by SIGKILL, the kernel kills this child too."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def clean_env(drop_prefixes: tuple[str, ...] = ("PIER_",)) -> dict[str, str]:
    """This process's environment without Pier's own settings (they may hold keys and tokens)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
