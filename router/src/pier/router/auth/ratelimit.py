"""Per-user rate limits in Redis (fixed one-minute windows), with a limit per key class."""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pier.core import redis_keys as keys
from pier.core.errors import PierError
from pier.router.auth.keys import KeyClass, Principal
from pier.router.metrics import RouterMetrics

log = logging.getLogger("pier.router.auth.ratelimit")


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, limits: dict[KeyClass, int], metrics: RouterMetrics) -> None:
        self.redis = redis
        self.limits = limits
        self.metrics = metrics

    async def check(self, principal: Principal, user: str) -> None:
        """Count one request for `user`; raise RATE_LIMITED (with retry_after_s) past the limit."""
        limit = self.limits.get(principal.key_class, 0)
        if not limit:
            return
        now = time.time()
        key = keys.rate_limit(user, int(now // 60))
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 61)
                count, _ = await pipe.execute()
        except RedisError as exc:
            # Availability over strictness: a Redis outage must not take every call down with it.
            self.metrics.redis_errors.labels("ratelimit").inc()
            log.warning("rate limit not checked: Redis unavailable", extra={"error": str(exc)})
            return
        if count > limit:
            self.metrics.rate_limited.labels(principal.key_class).inc()
            retry_after = max(1, 60 - int(now) % 60)
            raise PierError(
                "RATE_LIMITED",
                f"more than {limit} requests a minute for this user",
                {"limit_per_min": limit, "retry_after_s": retry_after},
            )
