"""The work queue of session names to reconcile, as client-go's workqueue: a name is queued once however
often it is added, never handed to two workers at once (added while in work, it is queued again after),
and a name whose reconcile failed comes back after a growing delay."""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class WorkQueue:
    def __init__(self, retry_base_s: float = 0.5, retry_max_s: float = 60.0) -> None:
        self._queued: OrderedDict[str, None] = OrderedDict()
        self._working: set[str] = set()
        self._again: set[str] = set()  # added while in work
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ready = asyncio.Event()
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, name: object) -> bool:
        return name in self._queued or name in self._working

    @property
    def working(self) -> int:
        return len(self._working)

    def add(self, name: str) -> None:
        if name in self._working:
            self._again.add(name)
        elif name not in self._queued:
            self._queued[name] = None
            self._ready.set()

    def add_after(self, name: str, delay_s: float) -> None:
        """Queue `name` in `delay_s` (an earlier pending add wins over a later one)."""
        if delay_s <= 0:
            self.add(name)
            return
        loop = asyncio.get_running_loop()
        timer = self._timers.get(name)
        if timer is not None:
            if timer.when() <= loop.time() + delay_s:
                return
            timer.cancel()
        self._timers[name] = loop.call_later(delay_s, self._fire, name)

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        self.add(name)

    async def get(self) -> str:
        """The next name to work on (wait for one); hand it back with `done`."""
        while not self._queued:
            self._ready.clear()
            await self._ready.wait()
        name, _ = self._queued.popitem(last=False)
        self._working.add(name)
        return name

    def done(self, name: str) -> None:
        self._working.discard(name)
        if name in self._again:
            self._again.discard(name)
            self.add(name)

    def retry(self, name: str) -> float:
        """`name` failed: queue it again after a delay that doubles with each failure in a row; the delay."""
        failures = self._failures.get(name, 0)
        self._failures[name] = failures + 1
        delay: float = min(self.retry_base_s * 2.0**failures, self.retry_max_s)
        self.add_after(name, delay)
        return delay

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
