"""Every name Pier gives to something in Redis — keys, the job stream and its consumer group, the
event channels — in one place, so one module says what Pier keeps in Redis (as arq keeps its key
prefixes in one module). Code builds names only through the functions below; Lua scripts get them as
KEYS and ARGV, never by writing a name themselves. `tests/core/test_redis_keys.py` runs a full flow
against a real Redis and finds every key it wrote among `NAMES`.

All names start `pier:`, so one Redis may serve other applications too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pier.core.names import PROFILE_NAME, USER_ID

PREFIX = "pier:"

# -- jobs (core/…/jobstore.py; read by the router and the job pool) -----------------------------

JOB_PREFIX = "pier:job:"
STREAM = "pier:jobs"  # the work stream the job pool reads
GROUP = "pier-workers"  # the stream's consumer group (a name inside the stream, not a key)
RECENT_JOBS = "pier:jobs:recent"
DEAD_LETTERS = "pier:webhooks:dead"


SESSIONS_WANTED = "pier:sessions:wanted"  # jobs whose session moved, for a router to find it again
ROUTERS = "pier-routers"  # that stream's consumer group


def routers_group(process: int) -> str:
    """That stream's consumer group of one of several router processes on the local backend (each reads every
    entry; the one holding the user's sessions finds it)."""
    return f"{ROUTERS}-{process}"


def job(job_id: str) -> str:
    """A job's record (JSON)."""
    return JOB_PREFIX + job_id


def job_events(job_id: str) -> str:
    """The pub/sub channel of a job's progress and completion events."""
    return f"{JOB_PREFIX}{job_id}:events"


JOB_EVENTS_PATTERN = job_events("*")  # what one subscription per process listens to (EventHub)


def job_of_events(channel: str) -> str:
    """The job a `job_events` channel is about."""
    return channel.removeprefix(JOB_PREFIX).removesuffix(":events")


def user_jobs(user: str, server: str) -> str:
    """A user's latest job ids of one profile (MCP `tasks/list`)."""
    return f"pier:jobs:user:{user}:{server}"


def idempotency(user: str, server: str, key: str) -> str:
    """The job an Idempotency-Key started."""
    return f"pier:idem:{user}:{server}:{key}"


# -- the router (rate limits, users' secrets) ----------------------------------------------------


def rate_limit(user: str, minute: int) -> str:
    """A user's request count in one fixed minute (`minute`: seconds since the epoch // 60)."""
    return f"pier:rl:{user}:{minute}"


def user_secrets(user: str, profile: str) -> str:
    """A user's sealed secrets for one profile (local backend)."""
    return f"pier:secrets:{user}:{profile}"


def mcp_session(session_id: str) -> str:
    """What a relayed MCP client session needs to outlive its server session (router/…/mcp/sessions.py)."""
    return f"pier:mcp:{session_id}"


# -- connected accounts and the portal (router/…/accounts, router/…/auth/signin) -------------------


def oauth_flow(state: str) -> str:
    """One authorization in progress (upstream OAuth or the portal's sign-in): single use, short-lived."""
    return f"pier:oauth:flow:{state}"


def connection(user: str, profile: str) -> str:
    """A user's connected account for a profile: its tokens, sealed (local backend)."""
    return f"pier:oauth:conn:{user}:{profile}"


def connection_lock(user: str, profile: str) -> str:
    """Held by the one router replica refreshing (or exchanging) a user's token for a profile."""
    return f"pier:oauth:lock:{user}:{profile}"


def exchanged(user: str, profile: str) -> str:
    """A token obtained by token exchange (RFC 8693) for a user and profile, sealed, until it expires."""
    return f"pier:oauth:exchanged:{user}:{profile}"


def portal_session(digest: str) -> str:
    """A signed-in portal user's session (its id is the cookie's value, hashed)."""
    return f"pier:portal:{digest}"


# -- what the names look like ---------------------------------------------------------------------

# What each placeholder of a name stands for, as a pattern (user ids and profile names never hold ":").
_FIELDS = {
    "job_id": r"[A-Za-z0-9._-]{1,200}",
    "user": USER_ID,
    "server": PROFILE_NAME,
    "profile": PROFILE_NAME,
    "key": r".{1,200}",
    "minute": r"[0-9]+",
    "session_id": r"[A-Za-z0-9_-]{1,128}",
    "state": r"[A-Za-z0-9_-]{16,128}",
    "digest": r"[0-9a-f]{64}",
}


@dataclass(frozen=True)
class Name:
    """One kind of name in Redis: how it is written, what Redis holds there, and what it is for."""

    template: str  # e.g. "pier:job:{job_id}"
    kind: str  # string, stream, sorted set, list, hash, channel
    what: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = re.split(r"\{(\w+)\}", self.template)
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?:{_FIELDS[p]})" for i, p in enumerate(parts))
        object.__setattr__(self, "pattern", re.compile(regex, re.DOTALL))

    def matches(self, name: str) -> bool:
        return self.pattern.fullmatch(name) is not None


NAMES: tuple[Name, ...] = (
    Name("pier:job:{job_id}", "string", "a job's record (JSON): a day while it runs, the result TTL once done"),
    Name("pier:jobs", "stream", "the work the job pool reads (consumer group pier-workers), bounded"),
    Name("pier:jobs:recent", "sorted set", "the latest job ids, by creation time (the dashboard)"),
    Name("pier:jobs:user:{user}:{server}", "sorted set", "a user's latest job ids of one profile (tasks/list)"),
    Name("pier:idem:{user}:{server}:{key}", "string", "the job an Idempotency-Key started; expires with its record"),
    Name("pier:sessions:wanted", "stream", "jobs waiting for their session's new endpoint (group pier-routers)"),
    Name("pier:webhooks:dead", "list", "webhook deliveries that failed every attempt (the latest 1000)"),
    Name("pier:rl:{user}:{minute}", "string", "a user's requests in one minute (expires after it)"),
    Name("pier:secrets:{user}:{profile}", "hash", "a user's secrets for a profile, each sealed (AES-GCM)"),
    Name("pier:mcp:{session_id}", "hash", "an MCP client session: user, profile, initialize, log level, subscriptions"),
    Name("pier:job:{job_id}:events", "channel", "pub/sub: a job's progress events, then its completion"),
    Name("pier:oauth:flow:{state}", "string", "an authorization in progress (sealed; single use, minutes)"),
    Name("pier:oauth:conn:{user}:{profile}", "string", "a user's connected account for a profile (sealed tokens)"),
    Name("pier:oauth:lock:{user}:{profile}", "string", "held while one replica refreshes that token (seconds)"),
    Name("pier:oauth:exchanged:{user}:{profile}", "string", "an exchanged token (RFC 8693), sealed, until it expires"),
    Name("pier:portal:{digest}", "string", "a signed-in portal session (sealed), by the digest of its cookie"),
)


def name_of(key: str) -> Name | None:
    """The kind of name `key` is, or None when it is no name of Pier's."""
    return next((name for name in NAMES if name.matches(key)), None)
