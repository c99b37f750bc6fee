"""Confining a local session's stdio server, so that no session can read another's secrets.

On Kubernetes every session is a pod of its own. Locally, every server would otherwise run as the
router's user, and any server could read every other process's environment (its users' secrets)
through /proc, signal it, and read what it wrote. A `Confinement` says how one session's server runs:

- ``sandbox``: bubblewrap (Debian's ``bwrap``). The server sees read-only system directories, the
  runtime Pier itself runs on (so ``python -m …`` servers work), the read-only paths a platform team
  names, its own writable home, a private ``/tmp`` and the ``/proc`` of its own pid namespace: no
  other process exists for it, and when the bridge goes the whole namespace goes. As root, the
  server also gets a uid of its own (``setpriv``, inside the sandbox): a root-owned server would
  still own every root-owned file it can see. As another user, bubblewrap makes a user namespace.
- ``uid``: Pier runs as root but bubblewrap cannot (e.g. a container without CAP_SYS_ADMIN): the
  server runs under a uid and gid of its own, with a private home. The kernel keeps every other
  uid's environment, signals and 0700 directories from it; its command must be readable by others.

Both keep the server's stdio, its process group and its exit status as the bridge knows them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["sandbox", "uid"]
MODES: tuple[str, ...] = ("none", "sandbox", "uid")

# What every server may read: the operating system. Not /home, /root, /srv, /var, /run, /tmp: where
# a machine's users and services keep their data.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
# Created mode 0755: bubblewrap would make a bound path's parents 0700 when run as root, and a
# server with a uid of its own could then not reach what is bound below them.
_DIR_MODE = "0755"
# Files a server creates in a shared place (/dev/shm, or /tmp in uid mode) are its own.
SERVER_UMASK = 0o077


def runtime_paths() -> list[str]:
    """Where the Python running Pier and Pier's own packages live: a ``python -m`` server needs them."""
    import pier  # a namespace package: one entry per installed (or editable) component

    found = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    found += [str(Path(entry).parent) for entry in getattr(pier, "__path__", [])]
    return found


def _binds(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(source, destination) pairs for the existing absolute paths given, outermost first.

    A path is bound where it is and, when a symlink leads to it, where it really is too. Paths inside
    another one, or inside a system path, need no bind of their own.
    """
    wanted: dict[str, str] = {}
    for path in paths:
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        wanted.setdefault(os.path.normpath(path), real)
        wanted.setdefault(real, real)
    kept: list[tuple[str, str]] = []
    for dest in sorted(wanted):
        tops = [*SYSTEM_PATHS, *(d for _, d in kept)]
        if not any(dest == top or dest.startswith(top.rstrip("/") + "/") for top in tops):
            kept.append((wanted[dest], dest))
    return kept


@dataclass(frozen=True)
class Confinement:
    """How one session's server runs: in which mode, as which uid, with which home and paths."""

    mode: Mode
    home: Path
    uid: int | None = None  # None: the bridge's own (sandbox mode as a user other than root)
    gid: int | None = None
    paths: tuple[str, ...] = ()  # read-only, besides the system's and Pier's runtime
    # (host directory, where the server sees it), read-only: e.g. the directory of a user's token file,
    # which the router rewrites in place (sandbox mode only)
    binds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("sandbox", "uid"):
            raise ValueError(f"unknown confinement mode {self.mode!r}")
        if self.mode == "uid" and (self.uid is None or self.gid is None):
            raise ValueError("uid mode needs a uid and a gid")
        if self.binds and self.mode != "sandbox":
            raise ValueError("only a sandbox can show a directory elsewhere than where it is")
        for source, dest in self.binds:
            if not (os.path.isabs(source) and os.path.isabs(dest)) or os.path.normpath(dest) in ("/", *SYSTEM_PATHS):
                raise ValueError(f"a bind is an absolute directory onto an absolute path, not {source}:{dest}")

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def command(self, command: list[str], cwd: Path | None = None) -> list[str]:
        """The argv that runs `command` confined (in uid mode the command itself: the spawn drops the uid)."""
        if self.mode == "uid":
            return list(command)
        return [*self._bwrap(cwd or self.home), "--", *self._as_own_user(), *command]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """The server's environment: its own home and temporary directory."""
        return {**env, "HOME": str(self.home), "TMPDIR": str(self.tmp)}

    def cwd(self, cwd: Path | None) -> Path:
        """Where the spawned process starts (a sandbox changes to the server's own directory itself)."""
        return self.home if self.mode == "sandbox" or cwd is None else cwd

    def spawn_options(self) -> dict[str, Any]:
        """Keyword arguments for `asyncio.create_subprocess_exec`."""
        if self.mode == "uid":
            return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": SERVER_UMASK}
        return {"umask": SERVER_UMASK}

    def exit_code(self, code: int) -> int:
        """The server's exit status as the bridge knows it: bubblewrap reports a death by signal N as 128 + N."""
        if self.mode == "sandbox" and code > 128:
            return -(code - 128)
        return code

    def _as_own_user(self) -> list[str]:
        # Inside a root-run sandbox: the server's own uid, no groups, no capabilities, no way back.
        if self.uid is None:
            return []
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip

    def _bwrap(self, cwd: Path) -> list[str]:
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if os.geteuid() == 0:
            # No user namespace (it would map the server to root outside). Keep only what setpriv needs,
            # and the search right to change into the home the server's uid owns; setpriv drops them all.
            argv += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH"):
                argv += ["--cap-add", cap]
        else:
            argv += ["--unshare-user"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        made = {"/", "/proc", "/dev", "/tmp"}
        for path in SYSTEM_PATHS:
            if os.path.islink(path):  # merged /usr: /bin → usr/bin
                argv += ["--symlink", os.readlink(path), path]
                made.add(path)
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
                made.add(path)
        extra = [*runtime_paths(), *self.paths]
        if cwd != self.home:
            extra.append(str(cwd))
        for source, dest in _binds(extra):
            argv += [*_parents(dest, made), "--ro-bind", source, dest]
        home = str(self.home)
        argv += [*_parents(home, made), "--bind", home, home]
        for source, dest in self.binds:
            argv += [*_parents(dest, made), "--ro-bind", source, dest]
        return [*argv, "--chdir", str(cwd)]


def _parents(path: str, made: set[str]) -> list[str]:
    """`--dir` steps for the parents of `path` not made yet (mode 0755, so a lesser uid gets through)."""
    steps: list[str] = []
    parent = os.path.dirname(path)
    chain: list[str] = []
    while parent not in made and parent != "/":
        chain.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(chain):
        steps += ["--perms", _DIR_MODE, "--dir", directory]
        made.add(directory)
    return steps


async def probe(confinement: Confinement) -> str | None:
    """None when `confinement` can run a server here (its home made), else why not (one line)."""
    if confinement.mode == "sandbox" and shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if confinement.mode == "sandbox" and confinement.uid is not None and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    # As the server would: in its home (reached as its own uid), able to write to its temporary directory.
    check = [
        "/bin/sh",
        "-c",
        'cd "$HOME" 2>/dev/null && test -w "$TMPDIR" || { echo "uid $(id -u) cannot use $HOME" >&2; exit 1; }',
    ]
    try:
        proc = await asyncio.create_subprocess_exec(
            *confinement.command(check), cwd=confinement.cwd(None), env=confinement.environment({}),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **confinement.spawn_options(),
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return last[0]
    return None


async def kill_all(uid: int, gid: int) -> None:
    """SIGKILL every process of `uid` (one that left its process group included): kill(-1) as that uid."""
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", "kill -KILL -1 2>/dev/null; exit 0", user=uid, group=gid, extra_groups=[], env={},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
    )  # fmt: skip
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
