"""Sessions the job pool wants found again.

A retry-safe job whose session's bridge went away mid-call (its pod replaced, its node lost) is re-run where
the session runs next. The worker cannot find that place (it has no access to the backend), so it asks on a
stream (`pier:sessions:wanted`); one router replica (consumer group `pier-routers`) finds the session through
its backend — the operator has usually started a new pod already; a reaped or deleted session is started
again — and reports its endpoint to the job, as it does for a job handed off while its session was starting.
A router that dies while finding leaves its entry to another (XAUTOCLAIM). Several router processes on the
local backend each read every entry (a group each): the one holding the user's sessions finds it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError, ResponseError

from pier.core import redis_keys as keys
from pier.core.errors import PierError

if TYPE_CHECKING:
    from pier.core.callapi import BridgeHandle, Endpoint
    from pier.core.job import JobRecord
    from pier.router.state import Router

log = logging.getLogger("pier.router.wanted")

_CLAIM_IDLE_MS = 60_000  # an entry its router has held this long without acknowledging: that router is gone
_CONCURRENCY = 16


class SessionFinder:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        peers = router.peers
        self.group = keys.ROUTERS if peers is None else keys.routers_group(peers.index)
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="pier-sessions-wanted")

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._task] if self._task else [])]
        # Cancelled again until done: redis-py can swallow a cancellation that lands in a command's
        # retry handling and go back to its blocking read (seen with XREADGROUP BLOCK).
        while pending := [task for task in tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_forever(self) -> None:
        redis, backoff, last_claim = self.router.redis, 0.5, 0.0
        while True:
            try:
                await self._ensure_group()
                entries: list[tuple[bytes, dict[bytes, bytes]]] = []
                if time.monotonic() - last_claim > _CLAIM_IDLE_MS / 2000:
                    last_claim = time.monotonic()
                    _, entries, *_ = await redis.xautoclaim(
                        keys.SESSIONS_WANTED, self.group, self.name, min_idle_time=_CLAIM_IDLE_MS, count=50
                    )
                reply = await redis.xreadgroup(self.group, self.name, {keys.SESSIONS_WANTED: ">"}, count=50,
                                               block=5000)  # fmt: skip
                for _stream, messages in cast(list[tuple[bytes, list[Any]]], reply or []):
                    entries += messages
                backoff = 0.5
            except (RedisError, OSError) as exc:
                log.warning("Redis unavailable; sessions wanted by jobs wait", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            for entry_id, fields in entries:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(entry_id, fields), name="pier-session-wanted")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _ensure_group(self) -> None:
        try:
            await self.router.redis.xgroup_create(keys.SESSIONS_WANTED, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _handle(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        peers, mine = self.router.peers, True
        try:
            wanted = {k.decode(): v.decode() for k, v in fields.items()}
            mine = peers is None or peers.owner(wanted["user"]) == peers.index
            if mine:
                await self.find(wanted["job_id"], wanted["user"], wanted["server"], wanted.get("lost", ""))
        except (PierError, RedisError, OSError, KeyError) as exc:
            log.warning("a job's session was not found again", extra={"error": str(exc)})
        finally:
            self._slots.release()
        try:
            async with self.router.redis.pipeline(transaction=True) as pipe:
                pipe.xack(keys.SESSIONS_WANTED, self.group, entry_id)
                if mine:  # (another process's entry stays for that process's group)
                    pipe.xdel(keys.SESSIONS_WANTED, entry_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # another router reclaims it later, and finds the job served
            log.warning("could not acknowledge a wanted session", extra={"error": str(exc)})

    async def find(self, job_id: str, user: str, server: str, lost: str) -> None:
        """Find (or start) `user`'s session of `server` for job `job_id`, elsewhere than the bridge at `lost`,
        and report its endpoint to the job; the job's own deadline bounds the search."""
        router = self.router
        record = await router.store.get(job_id)
        if record is None or record.done or record.endpoint:
            return  # ended meanwhile, or found by another router
        profile = router.catalog.get(server)
        while (remaining := (record.session_deadline or 0) - time.time()) > 0:
            try:
                session = await asyncio.wait_for(router.backend.acquire(user, profile), remaining)
            except TimeoutError:
                return
            except (
                PierError
            ) as exc:  # not startable yet (its pod gone, the new one not Ready): again, until the deadline
                log.info("a job's session is not back yet", extra={"job_id": job_id, "error": exc.message})
                await asyncio.sleep(1.0)
                continue
            endpoint = session.endpoint
            if endpoint.url != lost or await self._answers(session.bridge):
                await router.store.update(job_id, functools.partial(_report, endpoint=endpoint))
                log.info("a job's session found again", extra={"job_id": job_id})
                return
            # The backend still names the bridge that is gone (the operator has not replaced its pod yet).
            await router.backend.forget(session, "its bridge is gone")
            await asyncio.sleep(1.0)

    @staticmethod
    async def _answers(bridge: BridgeHandle) -> bool:
        try:
            await bridge.status(timeout=3)
        except PierError:
            return False
        return True


def _report(record: JobRecord, endpoint: Endpoint) -> bool:
    return record.session_ready(endpoint.url, endpoint.token, record.retry_safe)
