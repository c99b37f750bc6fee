"""Prototypes of proposed changes, applied at interpreter start for `bench.experiments` only.

Loaded when this folder is on PYTHONPATH (Python imports `sitecustomize` by itself), so the
router and every bridge it starts get them. `BENCH_PATCHES` (comma-separated) says which:

- ``uvloop``    run asyncio on uvloop.
- ``gcpython``  Python's own collector settings: Pier's settling after start
                (`pier.core.web.settle_collector`) switched off.
- ``gcyoung=N`` Pier's settling, with its young generation collected after N new objects instead.
- ``gcstats``   no change; each process writes its collections from 3 s after its start (count, total
                and longest pause per generation) to `$BENCH_GC_STATS/<pid>.json` (default
                /tmp/bench-gc-stats): what the collector costs the tail.

(JSON answers on /mcp and in-process local bridges, measured here before, are now in Pier itself:
`sidecar/streamable.py`, `router/backends/local/` with `PIER_LOCAL_BRIDGES`.)

Nothing here is Pier's code path unless an experiment asks for it; the product is untouched.
"""

from __future__ import annotations

import os

_PATCHES = {p.strip() for p in os.environ.get("BENCH_PATCHES", "").split(",") if p.strip()}


def _uvloop() -> None:
    import uvloop

    uvloop.install()


def _gcpython() -> None:
    import pier.core.web

    pier.core.web.settle_collector = lambda: None


def _gcyoung(threshold: int) -> None:
    import pier.core.web

    pier.core.web.YOUNG_COLLECTION_THRESHOLD = threshold


def _gcstats() -> None:
    import gc
    import json
    import sys
    import time
    from pathlib import Path

    folder = Path(os.environ.get("BENCH_GC_STATS", "/tmp/bench-gc-stats"))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{os.getpid()}.json"
    started: list[float] = []
    stats: dict[int, dict[str, float]] = {g: {"collections": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)}
    survivors: list[int] = []  # objects the collector tracks after each full collection: growth would be a leak

    after_start = time.monotonic() + 3.0  # start-up's collections (imports) are not what a call meets

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if time.monotonic() < after_start:
            return
        if phase == "start":
            started[:] = [time.perf_counter()]
            return
        if not started:
            return
        ms = (time.perf_counter() - started[0]) * 1000
        s = stats[info["generation"]]
        s["collections"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        if info["generation"] == 2:
            survivors.append(len(gc.get_objects()))
        if info["generation"] == 2 or s["collections"] % 500 == 0:
            out.write_text(json.dumps({"argv": " ".join(sys.argv[:3]), "gc": stats, "survivors": survivors}))

    gc.callbacks.append(on_gc)


if "uvloop" in _PATCHES:
    _uvloop()
if "gcpython" in _PATCHES:
    _gcpython()
for _patch in _PATCHES:
    if _patch.startswith("gcyoung="):
        _gcyoung(int(_patch.removeprefix("gcyoung=")))
if "gcstats" in _PATCHES:
    _gcstats()
