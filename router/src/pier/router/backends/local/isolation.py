"""How local sessions are kept apart from each other and from Pier (`PIER_LOCAL_ISOLATION`).

Decided once, when the backend starts: ``sandbox`` (bubblewrap; as root, a uid per session too),
``uid`` (root without a usable bubblewrap), or ``none``; ``auto`` takes the strongest this machine
can run. Without isolation the router refuses a catalog whose sessions carry users' credentials,
unless the machine is declared single-user (`PIER_LOCAL_SINGLE_USER`).

Every confined session leases a *slot* ``n``: a number locked with flock(2) in the sessions
directory, so that every router on the machine agrees, naming the session's home (``<dir>/<n>/``,
with ``tmp/``) and, as root, its uid and gid (the range's first + ``n``). When the session has
stopped, its lease kills whatever still runs under its uid and removes its home. A slot a dead
router left behind is cleaned before its next use, and by every router that starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pier.core.catalog import Profile
from pier.core.errors import ConfigError, PierError
from pier.core.sandbox import Confinement, Mode, kill_all, probe
from pier.router.config import RouterSettings

log = logging.getLogger("pier.router.local")


def default_sessions_dir() -> Path:
    """Where sessions' homes live unless `PIER_LOCAL_SESSIONS_DIR` says otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/pier/sessions")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pier" / "sessions"


def run_dir(home: Path) -> Path:
    """Where the router keeps files for a slot's server (its token file): beside its home, owned by the
    router (the server cannot swap it for a link), shown to the server read-only (`sandbox_binds`)."""
    return home.with_name(f"{home.name}.run")


@dataclass(eq=False)
class Lease:
    """One session's slot: its confinement, held until `release`."""

    slot: int
    confinement: Confinement
    _lock_fd: int
    _owner: Isolation
    _released: bool = field(default=False)
    _binds: dict[str, str] = field(default_factory=dict)  # where the server sees it → host directory

    def sidecar_settings(self) -> dict[str, object]:
        """What the session's bridge needs to confine its server (`SidecarSettings` fields)."""
        jail = self.confinement
        run_as = f"{jail.uid}:{jail.gid}" if jail.uid is not None else ""
        binds = [f"{source}:{dest}" for dest, source in self._binds.items()]
        return {"isolation": jail.mode, "home": jail.home, "run_as": run_as, "sandbox_paths": list(jail.paths),
                "sandbox_binds": binds}  # fmt: skip

    async def write_file(self, path: str, content: str) -> None:
        """Put `content` where the server reads `path` (its directory is shown from the slot's own), readable
        by the server alone, replaced whole (a reader sees the old file or the new, never half of one)."""
        if self.confinement.mode != "sandbox":
            raise PierError("SESSION_START_FAILED", "a token file needs a sandboxed session (PIER_LOCAL_ISOLATION)")
        host = run_dir(self.confinement.home)
        dest = os.path.dirname(path)
        if self._binds.setdefault(dest, str(host)) != str(host):
            raise PierError("SESSION_START_FAILED", f"{dest} is already shown from elsewhere")
        jail = self.confinement
        await asyncio.to_thread(_write_private, host, os.path.basename(path), content, jail.uid, jail.gid)

    async def release(self) -> None:
        """Kill what is left under the slot's uid, remove its home, free the slot (once; never raises)."""
        if self._released:
            return
        self._released = True
        try:
            await self._owner.wipe(self.confinement)
        except Exception:  # the slot stays locked by nobody: the next lease of it cleans it again
            log.exception("could not clean a session's slot", extra={"slot": self.slot})
        finally:
            self._owner.free(self.slot, self._lock_fd)


class Isolation:
    """Decides the isolation mode at start and leases each local session its slot."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.mode: str = "none"
        self.dir = settings.local_sessions_dir or default_sessions_dir()
        self.first_uid, last_uid = settings.local_uid_range()
        self.slots = last_uid - self.first_uid + 1
        self._held: set[int] = set()
        self._root = os.geteuid() == 0

    async def start(self, profiles: list[Profile]) -> None:
        """Choose the mode; refuse (ConfigError) what would be unsafe; clean slots dead routers left."""
        self.mode = await self._choose()
        filed = [p.name for p in profiles if p.token_delivery is not None and p.token_delivery.file is not None]
        if filed and self.mode != "sandbox":
            raise ConfigError(
                f"refusing to start: profile(s) {', '.join(filed)} give users' tokens as files, which local sessions "
                f"get only in a sandbox (this router's isolation: {self.mode}; install bubblewrap)"
            )
        carrying = [p.name for p in profiles if p.carries_user_credentials]
        if self.mode == "none" and carrying and not self.settings.local_single_user:
            raise ConfigError(
                f"refusing to start: profile(s) {', '.join(carrying)} give users' secrets to local sessions, "
                "which cannot be isolated from each other here (install bubblewrap, or run as root); "
                "set PIER_LOCAL_SINGLE_USER=true if only one person uses this machine"
            )
        if self.mode == "none":
            if self.settings.local_isolation != "none":
                log.warning("local sessions run unisolated: bubblewrap cannot run here and Pier is not root")
            return
        log.info("local sessions are isolated", extra={"mode": self.mode, "dir": str(self.dir)})
        await self._sweep()

    async def lease(self) -> Lease | None:
        """A slot for a new session (None without isolation); SESSION_CAPACITY when every slot is taken."""
        if self.mode == "none":
            return None
        start = random.randrange(self.slots)  # routers sharing the directory seldom try the same slots
        for step in range(self.slots):
            slot = (start + step) % self.slots
            if slot in self._held:
                continue
            fd = self._try_lock(slot)
            if fd is None:
                continue
            self._held.add(slot)
            confinement = self._confinement(slot)
            try:
                await self.wipe(confinement)  # whatever a dead router's session left in it
                await asyncio.to_thread(self._make_home, confinement)
            except BaseException:
                self.free(slot, fd)
                raise
            return Lease(slot, confinement, fd, self)
        raise PierError("SESSION_CAPACITY", "no free slot for an isolated session", {"slots": self.slots})

    def _confinement(self, slot: int) -> Confinement:
        mode: Mode = "uid" if self.mode == "uid" else "sandbox"
        uid = self.first_uid + slot if self._root else None
        paths = tuple(self.settings.local_sandbox_paths)
        return Confinement(mode, self.dir / str(slot), uid, uid, paths)

    # -- choosing the mode -----------------------------------------------------------------

    async def _choose(self) -> str:
        wanted = self.settings.local_isolation
        if wanted == "none":
            return "none"
        await asyncio.to_thread(self._make_dir)
        if wanted in ("auto", "sandbox"):
            why = await self._trial("sandbox")
            if why is None:
                return "sandbox"
            if wanted == "sandbox":
                raise ConfigError(f"PIER_LOCAL_ISOLATION=sandbox, but bubblewrap cannot run here: {why}")
            log.info("bubblewrap cannot run here", extra={"why": why})
        if not self._root:
            if wanted == "uid":
                raise ConfigError("PIER_LOCAL_ISOLATION=uid needs Pier to run as root")
            return "none"
        why = await self._trial("uid")
        if why is not None:
            raise ConfigError(f"local sessions cannot run under their own uid here: {why}")
        return "uid"

    async def _trial(self, mode: Mode) -> str | None:
        """Run `true` as a session of `mode` would run its server; None when it works."""
        uid = self.first_uid if self._root else None
        jail = Confinement(mode, self.dir / f"trial-{os.getpid()}", uid, uid)
        try:
            await asyncio.to_thread(self._make_home, jail)
            return await probe(jail)
        finally:
            await asyncio.to_thread(_remove, jail.home)

    # -- the sessions directory --------------------------------------------------------------

    def _make_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # As root, sessions' uids must reach their own homes in it, and list nothing.
        os.chmod(self.dir, 0o711 if self._root else 0o700)

    def _make_home(self, jail: Confinement) -> None:
        for path in (jail.home, jail.tmp):
            path.mkdir(mode=0o700)
            if jail.uid is not None:
                os.chown(path, jail.uid, jail.gid if jail.gid is not None else jail.uid)

    def _try_lock(self, slot: int) -> int | None:
        fd = os.open(self.dir / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never blocks
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def free(self, slot: int, fd: int) -> None:
        self._held.discard(slot)
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the only descriptor releases the flock

    async def wipe(self, jail: Confinement) -> None:
        """Kill every process left under the slot's uid, then remove its home and its files."""
        if jail.uid is not None:
            await kill_all(jail.uid, jail.gid if jail.gid is not None else jail.uid)
        await asyncio.to_thread(_remove, jail.home)
        await asyncio.to_thread(_remove, run_dir(jail.home))

    async def _sweep(self) -> None:
        """Clean the slots no live router holds (their router died). Only a slot whose home (or run directory)
        is still there can have left anything: a home is made before its server starts and removed after
        everything under its uid is killed. Lock files alone stay behind, one per slot ever used."""
        names = await asyncio.to_thread(lambda: [p.name for p in self.dir.iterdir()])
        slots = sorted({int(n.removesuffix(".run")) for n in names if n.removesuffix(".run").isdigit()})
        for slot in slots:
            if slot >= self.slots or slot in self._held:
                continue
            fd = self._try_lock(slot)
            if fd is not None:
                try:
                    await self.wipe(self._confinement(slot))
                finally:
                    self.free(slot, fd)


def _write_private(directory: Path, name: str, content: str, uid: int | None, gid: int | None) -> None:
    """Write `directory/name` whole (a new file renamed over the old), mode 0400, owned by `uid`."""
    directory.mkdir(mode=0o755, exist_ok=True)  # the router's; the server may enter it, not write to it
    temporary = directory / f".{name}.{os.getpid()}.{random.randrange(1 << 32):08x}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content)
        if uid is not None:
            os.chown(temporary, uid, gid if gid is not None else uid)
        os.replace(temporary, directory / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _remove(path: Path) -> None:
    """Remove a home, whatever modes its server gave what it left there."""

    def unlock_and_remove(func: Callable[..., object], name: str, _: object) -> None:
        # A directory its server made unreadable or unwritable (the owner may): open it up, go on.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            if not os.path.islink(name):
                os.chmod(name, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name, onerror=unlock_and_remove)
            else:
                os.unlink(name)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=unlock_and_remove)
