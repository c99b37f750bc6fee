"""Jobs in Redis: records (JSON strings), the work stream, event channels, idempotency keys.

Their names are `pier.core.redis_keys`'s. A record lives a day while queued or running and
`result_ttl_s` once done (a call the router still owns holds only a short lease); an idempotency key
always expires with its job's record, so a key never points at a job that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pier.core import redis_keys as keys
from pier.core.errors import PierError
from pier.core.job import JobRecord
from pier.core.jsonrpc import dumps, loads

log = logging.getLogger("pier.core.jobstore")

STREAM_MAXLEN = 100_000
RECENT_KEEP = 200
RUNNING_TTL_S = 86_400
USER_KEEP = 1000  # job ids kept per user and profile for tasks/list


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def connect(url: str, max_connections: int = 256) -> aioredis.Redis:
    """A Redis client that reconnects by itself (with backoff) after Redis restarts.

    Its pool blocks (up to 10 s) when all connections are busy rather than failing the request. The
    client owns its pool: closing the client closes every connection (a client merely handed a pool
    would leave them open until they are garbage-collected).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_timeout=15,  # longer than any blocking read (XREADGROUP blocks 5 s)
        socket_connect_timeout=3,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis.from_pool(pool)


# KEYS: the idempotency key, the new job's record; ARGV: job id, record JSON, lease (s), the prefix of
# job records (`redis_keys.JOB_PREFIX`: the job a key was bound to is known only inside the script).
_CLAIM = """
local existing = redis.call('GET', KEYS[1])
if existing and redis.call('EXISTS', ARGV[4] .. existing) == 1 then
    return existing
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return false
"""
# KEYS: the idempotency key, the job's record; ARGV: job id. The key is unbound only if it is still this job's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
return 1
"""


class EventHub:
    """One Redis subscription (a pattern) for every job-event stream this process serves.

    A connection per SSE client would exhaust Redis connections under load; instead one reader
    fans events out to in-process queues, and resubscribes by itself when Redis comes back.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pier-job-events")

    async def close(self) -> None:
        # Cancelling alone is not enough: redis-py can swallow a cancellation that lands while it
        # connects or subscribes, and the loop would go on; the flag ends it at its next wake-up.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @contextlib.contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            listeners = self._listeners.get(job_id, set())
            listeners.discard(queue)
            if not listeners:
                self._listeners.pop(job_id, None)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(keys.JOB_EVENTS_PATTERN)
                backoff = 0.1
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        continue
                    job_id = keys.job_of_events(message["channel"].decode())
                    for queue in self._listeners.get(job_id, ()):
                        queue.put_nowait(loads(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("job events: Redis unavailable; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()


@dataclass(frozen=True)
class QueueStats:
    length: int  # entries in the stream: queued and being followed
    queued: int  # handed off, no worker has taken them yet (the consumer group's lag)
    following: int  # taken by a worker, not done
    oldest_queued_s: float  # age of the oldest queued job (0 when none)


class JobStore:
    def __init__(self, redis: aioredis.Redis, result_ttl_s: int, hub: EventHub | None = None) -> None:
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self.hub = hub or EventHub(redis)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.STREAM, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _ttl(self, record: JobRecord) -> int:
        return self.result_ttl_s if record.done else RUNNING_TTL_S

    @staticmethod
    def _put(pipe: Any, record: JobRecord, ttl: int) -> None:
        """Write `record` in `pipe`; its idempotency key, if any, gets the same lifetime."""
        pipe.set(keys.job(record.job_id), record.model_dump_json(), ex=ttl)
        if record.idempotency_key is not None:
            pipe.expire(keys.idempotency(record.user, record.server, record.idempotency_key), ttl)

    async def enqueue(self, record: JobRecord) -> None:
        """Save a new job and put it on the stream, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._put(pipe, record, RUNNING_TTL_S)
            pipe.xadd(keys.STREAM, {"job_id": record.job_id}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.zadd(keys.RECENT_JOBS, {record.job_id: record.created_at})
            pipe.zremrangebyrank(keys.RECENT_JOBS, 0, -RECENT_KEEP - 1)
            self._index(pipe, record)
            await pipe.execute()

    def _index(self, pipe: Any, record: JobRecord) -> None:
        key = keys.user_jobs(record.user, record.server)
        pipe.zadd(key, {record.job_id: record.created_at})
        pipe.zremrangebyrank(key, 0, -USER_KEEP - 1)
        pipe.expire(key, max(RUNNING_TTL_S, self.result_ttl_s))

    async def save(self, record: JobRecord, index: bool = False) -> None:
        """Write a record (`index`: list it among its user's jobs, as a hand-off does)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._put(pipe, record, self._ttl(record))
            if index:
                self._index(pipe, record)
            await pipe.execute()

    async def user_jobs(self, user: str, server: str, start: int, count: int) -> list[str]:
        """A user's job ids of one profile, newest first (expired ones included: `get_many` skips them)."""
        ids = cast(list[bytes], await self.redis.zrevrange(keys.user_jobs(user, server), start, start + count - 1))
        return [i.decode() for i in ids]

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []
        raws = await self.redis.mget([keys.job(i) for i in job_ids])
        return [JobRecord.model_validate_json(raw) if raw else None for raw in raws]

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(keys.job(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    async def update(self, job_id: str, change: Callable[[JobRecord], bool]) -> tuple[JobRecord | None, bool]:
        """Apply `change` (a `JobRecord` transition) to the stored record atomically (optimistic lock).

        Returns the record as stored afterwards (None when it is gone) and whether `change` applied.
        Two parties may race (a worker finishing, a caller cancelling): whoever writes second sees
        the first one's state and decides again, so a finished job is never overwritten.
        """
        key = keys.job(job_id)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if not raw:
                        return None, False
                    record = JobRecord.model_validate_json(raw)
                    if not change(record):
                        return record, False
                    pipe.multi()
                    self._put(pipe, record, self._ttl(record))
                    await pipe.execute()
                    return record, True
                except WatchError:
                    continue

    async def finish(
        self,
        job_id: str,
        status: Literal["completed", "failed", "cancelled"],
        result: dict[str, Any] | None = None,
        error: PierError | None = None,
    ) -> JobRecord | None:
        """End a job (unless it has ended already) and publish its completion.

        Returns the record if this call ended it, None if it was gone or had ended before.
        """
        record, ended = await self.update(job_id, lambda r: r.finish(status, result, error))
        if record is None or not ended:
            return None
        await self.publish(job_id, {"type": "completed", **record.completion_event()})
        return record

    async def publish(self, job_id: str, event: dict[str, Any]) -> None:
        await self.redis.publish(keys.job_events(job_id), dumps(event))

    async def events(self, job_id: str, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """Progress events, then the completion event; ends after completion or `timeout_s`.

        Listens before reading the record, so a completion in between is never missed; a quiet
        spell re-reads the record, so an event lost while Redis restarted is never waited for.
        """
        with self.hub.listen(job_id) as queue:
            record = await self.get(job_id)
            if record is None:
                return
            if record.done:
                yield {"type": "completed", **record.completion_event()}
                return
            deadline = time.monotonic() + timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), min(remaining, 5.0))
                except TimeoutError:
                    record = await self.get(job_id)
                    if record is None or record.done:
                        if record is not None:
                            yield {"type": "completed", **record.completion_event()}
                        return
                    yield {"type": "keepalive"}
                    continue
                yield event
                if event.get("type") == "completed":
                    return

    async def claim_idempotency(self, record: JobRecord, lease_s: int) -> str | None:
        """Bind the record's idempotency key to it and save it, for `lease_s`, unless the key is bound.

        Returns the job the key was bound to before. Atomic: a key is never bound to a record that
        was not saved, and a key whose record has gone is taken over.
        """
        assert record.idempotency_key is not None
        name = keys.idempotency(record.user, record.server, record.idempotency_key)
        existing = await self.redis.eval(
            _CLAIM, 2, name, keys.job(record.job_id), record.job_id, record.model_dump_json(), lease_s, keys.JOB_PREFIX
        )
        return existing.decode() if existing else None

    async def release(self, record: JobRecord) -> None:
        """Forget a job that never ran, and unbind its idempotency key (a resend may run it)."""
        assert record.idempotency_key is not None
        name = keys.idempotency(record.user, record.server, record.idempotency_key)
        await self.redis.eval(_RELEASE, 2, name, keys.job(record.job_id), record.job_id)

    async def queue_depth(self) -> int:
        return int(await self.redis.xlen(keys.STREAM))

    async def queue_stats(self) -> QueueStats:
        """The stream's backlog: jobs no worker has taken yet (the group's lag) and the oldest one's age.

        Entries are deleted once done, so the stream holds the jobs queued and the jobs being followed; the
        queued ones come after the group's last delivered entry.
        """
        length = int(await self.redis.xlen(keys.STREAM))
        group: dict[str, Any] = {}
        with contextlib.suppress(ResponseError):  # no group yet: no worker ever started
            for info in await self.redis.xinfo_groups(keys.STREAM):
                if _text(info.get("name")) == keys.GROUP:
                    group = info
        pending = int(group.get("pending") or 0)
        lag = group.get("lag")  # Redis 7+; older: what is neither done nor taken
        queued = int(lag) if lag is not None else max(length - pending, 0)
        start = f"({_text(group['last-delivered-id'])}" if group else "-"
        oldest = cast(list[tuple[bytes, Any]], await self.redis.xrange(keys.STREAM, start, "+", count=1))
        age = max(time.time() - int(_text(oldest[0][0]).split("-")[0]) / 1000, 0.0) if oldest and queued else 0.0
        return QueueStats(length, queued, pending, age)

    async def want_session(self, record: JobRecord, lost: str) -> None:
        """Ask the routers to find `record`'s session again (its bridge at `lost` is gone)."""
        fields: dict[Any, Any] = {"job_id": record.job_id, "user": record.user, "server": record.server, "lost": lost}
        await self.redis.xadd(keys.SESSIONS_WANTED, fields, maxlen=STREAM_MAXLEN, approximate=True)

    async def recent_jobs(self, count: int) -> list[JobRecord]:
        ids = cast(list[bytes], await self.redis.zrevrange(keys.RECENT_JOBS, 0, count - 1))
        if not ids:
            return []
        raws = await self.redis.mget([keys.job(i.decode()) for i in ids])
        return [JobRecord.model_validate_json(raw) for raw in raws if raw]

    async def dead_letter_count(self) -> int:
        return int(await self.redis.llen(keys.DEAD_LETTERS))
