"""Prototypes of proposed changes, applied at interpreter start for `bench.experiments` only.

Loaded when this folder is on PYTHONPATH (Python imports `sitecustomize` by itself), so the
router and every bridge it starts get them. `BENCH_PATCHES` (comma-separated) says which:

- ``uvloop``    run asyncio on uvloop.

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


if "uvloop" in _PATCHES:
    _uvloop()
