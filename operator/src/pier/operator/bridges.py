"""What the operator knows of each Ready session's bridge (`GET /v1/status`: server, tools, restarts,
activity, calls in flight), asked when it matters rather than every pass.

A bridge is asked when its session becomes Ready (or moves to a new pod), when its session could have
become idle for its TTL (the last activity known, plus the TTL: a reap is decided only on an answer newer
than that), and otherwise every `refresh_s` (restarts and tool counts in the status stay that fresh). At
most `concurrency` requests are in flight, each with a short timeout, so 10,000 sessions cost a steady
trickle of small requests, never a sweep of 10,000 one after another. A bridge that does not answer is
asked again after a growing pause (at most `refresh_s`), and never reaped on a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from pier.core.callapi import BridgeStatus, Endpoint, HttpBridge
from pier.core.errors import PierError

log = logging.getLogger("pier.operator.bridges")

UNREACHABLE_AFTER = 3  # failed asks in a row before the status says the bridge does not answer
_TIMEOUT_S = 3.0


@dataclass
class Known:
    """One session's bridge as last seen: where, what it said (None: not yet, or no answer), and when."""

    endpoint: str
    ttl_s: float
    ready_since: float
    since: float = field(default_factory=time.time)  # POSIX time this endpoint was first tracked
    status: BridgeStatus | None = None
    asked_at: float = 0.0  # POSIX time of the last answer
    failures: int = 0
    due: float = 0.0  # monotonic time of the next ask
    asking: bool = field(default=False, repr=False)

    @property
    def unreachable(self) -> bool:
        return self.failures >= UNREACHABLE_AFTER

    def idle_since(self) -> float:
        """The POSIX time its idle time counts from: the later of its last activity and becoming Ready."""
        return max(self.status.last_activity if self.status else 0.0, self.ready_since)

    def reapable(self, now: float) -> bool:
        """Idle for its TTL, on an answer given after the TTL ran out (never on a guess, never while busy)."""
        if not self.ttl_s or self.status is None or self.status.busy:
            return False
        deadline = self.idle_since() + self.ttl_s
        return now >= deadline and self.asked_at >= deadline


class BridgeMonitor:
    """`run()` as a task; `track` what should be watched, read `known`; `on_news(name)` after every answer."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        token: str | None,
        concurrency: int,
        refresh_s: float,
        on_news: Callable[[str], None],
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.http, self.token = http, token
        self.refresh_s = refresh_s
        self.on_news = on_news
        self.observe = observe or (lambda outcome: None)
        self.known: dict[str, Known] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    def track(self, name: str, endpoint: str, ttl_s: float, ready_since: float) -> Known:
        """Watch session `name`'s bridge at `endpoint` (a new endpoint forgets what the old one said)."""
        known = self.known.get(name)
        if known is None or known.endpoint != endpoint:
            known = self.known[name] = Known(endpoint, ttl_s, ready_since)
            self._schedule(name, known, time.monotonic())
        elif (known.ttl_s, known.ready_since) != (ttl_s, ready_since):
            known.ttl_s, known.ready_since = ttl_s, ready_since
            if known.status is not None:  # answered: its next ask may come sooner now (not yet: it is due anyway)
                self._reschedule(name, known)
        return known

    def forget(self, name: str) -> None:
        self.known.pop(name, None)

    def ask_now(self, name: str) -> None:
        known = self.known.get(name)
        if known is not None and not known.asking:
            self._schedule(name, known, time.monotonic())

    def _schedule(self, name: str, known: Known, due: float) -> None:
        known.due = due
        heapq.heappush(self._heap, (due, name))
        if self._heap[0][1] == name:
            self._wake.set()

    def _reschedule(self, name: str, known: Known) -> None:
        """After an answer (or a change of TTL): the next ask, at the refresh or when the TTL could run out."""
        now_mono, now = time.monotonic(), time.time()
        if known.failures:
            delay = min(2.0**known.failures, self.refresh_s)
        else:
            delay = self.refresh_s
            if known.ttl_s and known.status is not None:
                if known.status.busy:  # activity goes on: look again within a TTL
                    delay = min(delay, max(known.ttl_s, 1.0))
                else:
                    until_idle = known.idle_since() + known.ttl_s - now
                    if until_idle > 0:  # (otherwise it is reapable now: the reconcile that follows reaps it)
                        delay = min(delay, until_idle + 0.05)
        self._schedule(name, known, now_mono + delay)

    async def run(self) -> None:
        try:
            while True:
                await self._next_due()
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due, name = heapq.heappop(self._heap)
                    known = self.known.get(name)
                    if known is None or known.due != due or known.asking:
                        continue  # forgotten, or rescheduled since
                    known.asking = True
                    await self._slots.acquire()
                    task = asyncio.create_task(self._ask(name, known), name=f"pier-bridge-status-{name}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _next_due(self) -> None:
        self._wake.clear()
        if self._heap:
            pause = self._heap[0][0] - time.monotonic()
            if pause <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
        else:
            await self._wake.wait()

    async def _ask(self, name: str, known: Known) -> None:
        try:
            bridge = HttpBridge(self.http, Endpoint(known.endpoint, self.token))
            try:
                status = await bridge.status(timeout=_TIMEOUT_S)
            except PierError:
                known.failures += 1
                self.observe("unreachable")
                if known.failures == UNREACHABLE_AFTER:
                    log.warning("a session's bridge does not answer", extra={"session": name})
            else:
                known.status, known.asked_at, known.failures = status, time.time(), 0
                self.observe("answered")
        finally:
            self._slots.release()
            known.asking = False
        if self.known.get(name) is known:
            self._reschedule(name, known)
            self.on_news(name)
