"""The audit log: one structured record per tool call, on the `pier.core.audit` logger (JSON on stderr).

Fields: `who` (key class, key id — a digest, never the key —, bound user, certificate subject),
`user`, `profile`, `tool`, `arguments_sha256`, `decision` (allow / deny), `decided_by`, `outcome`
(completed, queued, a tool error, or an error code), `duration_ms`, `via` (rest, mcp, ws, chat, job).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson

log = logging.getLogger("pier.core.audit")


def digest(arguments: Any) -> str:
    """A stable digest of a call's arguments: proves what was asked without storing it."""
    return hashlib.sha256(orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)).hexdigest()


def record(  # noqa: PLR0913 — keyword-only: one argument per field of the record
    *,
    who: dict[str, Any],
    user: str,
    profile: str,
    tool: str,
    arguments: Any,
    decision: str,
    outcome: str,
    duration_ms: float,
    via: str,
    decided_by: str | None = None,
) -> None:
    log.info(
        "tool call",
        extra={
            "audit": {
                "who": who,
                "user": user,
                "profile": profile,
                "tool": tool,
                "arguments_sha256": digest(arguments),
                "decision": decision,
                "decided_by": decided_by,
                "outcome": outcome,
                "duration_ms": round(duration_ms, 1),
                "via": via,
            }
        },
    )
