"""Structured (JSON) logging with per-request context.

Context values (request id, user, profile, session, call id, job id) live in contextvars,
so every log line written while serving a request carries them without passing them around; so does
the trace it belongs to (`trace_id`, `span_id`: `pier.core.tracing`), when the request is traced.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

from pier.core import tracing

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("pier_log_context", default={})  # noqa: B039


def bind(**values: str | None) -> contextvars.Token[dict[str, str]]:
    """Add values to the log context of the current task; returns a token for `unbind`."""
    merged = {**_context.get(), **{k: v for k, v in values.items() if v is not None}}
    return _context.set(merged)


def unbind(token: contextvars.Token[dict[str, str]]) -> None:
    _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context and `extra` fields."""

    # Record attributes that are not ours to print (kopf attaches its whole settings object to each record).
    _reserved = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
        "message",
        "asctime",
        "settings",
        "k8s_skip",
    }

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context.get())
        ids = tracing.log_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in self._reserved and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO", json_format: bool = True) -> None:
    """Send all logs to stderr, as JSON lines unless `json_format` is False."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own request logging; kopf logs every handler run at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if root.level > logging.DEBUG:
        logging.getLogger("kopf").setLevel(logging.WARNING)
