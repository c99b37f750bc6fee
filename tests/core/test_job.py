"""`JobRecord`'s state machine, transition by transition: every one it allows and every one it refuses.

The table below is written out by hand from the job's documented life (core/…/job.py), not derived
from the code under test: a refused transition must leave the record exactly as it was, an allowed one
must make exactly its change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import pytest

from pier.core.errors import PierError
from pier.core.job import TERMINAL, JobRecord

pytestmark = pytest.mark.unit

# Every kind of record a job can be, by what its transitions look at: its status, whether its call
# was started, and whether its session's endpoint is known.
STATES: dict[str, dict[str, Any]] = {
    "queued": {"status": "queued", "started": True, "endpoint": "http://bridge"},
    "queued, session starting": {"status": "queued", "started": False, "endpoint": ""},
    "queued, session ready": {"status": "queued", "started": False, "endpoint": "http://bridge"},
    "running": {"status": "running", "started": True, "endpoint": "http://bridge"},
    "running, session starting": {"status": "running", "started": False, "endpoint": ""},
    "running, session ready": {"status": "running", "started": False, "endpoint": "http://bridge"},
    "completed": {"status": "completed", "started": True, "endpoint": "http://bridge", "result": {"content": []}},
    "failed": {"status": "failed", "started": True, "endpoint": "http://bridge"},
    "cancelled": {"status": "cancelled", "started": True, "endpoint": "http://bridge"},
}
ENDED = ("completed", "failed", "cancelled")
LIVE = tuple(name for name in STATES if name not in ENDED)

Transition = Callable[[JobRecord], bool]
TRANSITIONS: dict[str, Transition] = {
    "take": JobRecord.take,
    "session_ready": lambda r: r.session_ready("http://new-bridge", "token-2", True),
    "call_started": JobRecord.call_started,
    "note_progress": lambda r: r.note_progress({"progress": 3, "total": 10}, 3),
    "rerun": lambda r: r.rerun("job-1.1"),
    "finish completed": lambda r: r.finish("completed", result={"content": [{"type": "text", "text": "ok"}]}),
    "finish failed": lambda r: r.finish("failed", error=PierError("SESSION_LOST", "gone")),
    "finish cancelled": lambda r: r.finish("cancelled", error=PierError("CANCELLED", "by the caller")),
    "webhook delivered": lambda r: r.webhook_sent(True),
    "webhook dead": lambda r: r.webhook_sent(False),
}

# Where each transition applies; everywhere else it is refused.
ALLOWED: dict[str, tuple[str, ...]] = {
    "take": ("queued", "queued, session starting", "queued, session ready"),
    "session_ready": ("queued, session starting", "running, session starting"),
    "call_started": (
        "queued, session starting", "queued, session ready", "running, session starting", "running, session ready",
    ),
    "note_progress": LIVE,
    "rerun": LIVE,
    "finish completed": LIVE,
    "finish failed": LIVE,
    "finish cancelled": LIVE,
    "webhook delivered": tuple(STATES),  # an ended job's webhook is delivered after it ended
    "webhook dead": tuple(STATES),
}  # fmt: skip


# What each transition may change (and nothing else).
EFFECTS: dict[str, set[str]] = {
    "take": {"status"},
    "session_ready": {"endpoint", "endpoint_token", "retry_safe"},
    "call_started": {"started"},
    "note_progress": {"progress", "progress_count"},
    "rerun": {"call_id", "attempts"},
    "finish completed": {"status", "result", "error", "finished_at"},
    "finish failed": {"status", "result", "error", "finished_at"},
    "finish cancelled": {"status", "result", "error", "finished_at"},
    "webhook delivered": {"webhook_state"},
    "webhook dead": {"webhook_state"},
}


def record(state: str) -> JobRecord:
    return JobRecord(
        job_id="job-1", user="alice", server="demo", tool="slow", arguments={"seconds": 1}, call_id="job-1",
        created_at=time.time() - 5, **STATES[state],
    )  # fmt: skip


def test_the_table_covers_every_status():
    assert {s["status"] for s in STATES.values()} == {"queued", "running", *TERMINAL}
    assert set(ALLOWED) == set(TRANSITIONS)
    assert all(set(states) <= set(STATES) for states in ALLOWED.values())


CASES = [(transition, state) for transition in TRANSITIONS for state in STATES]


@pytest.mark.parametrize(("transition", "state"), CASES, ids=[f"{t} from {s}" for t, s in CASES])
def test_a_transition_applies_where_allowed_and_changes_nothing_where_refused(transition: str, state: str) -> None:
    job = record(state)
    before = job.model_dump()
    applied = TRANSITIONS[transition](job)
    assert applied is (state in ALLOWED[transition])
    if not applied:
        assert job.model_dump() == before
    else:
        changed = {k for k, v in job.model_dump().items() if before[k] != v}
        assert changed <= EFFECTS[transition], changed - EFFECTS[transition]


def test_take_makes_a_queued_job_running() -> None:
    job = record("queued")
    assert job.take()
    assert job.status == "running"
    assert not job.take()  # a second worker cannot take it again


def test_session_ready_says_where_the_call_will_run() -> None:
    job = record("queued, session starting")
    assert job.session_ready("http://b:8080", "secret", True)
    assert (job.endpoint, job.endpoint_token, job.retry_safe) == ("http://b:8080", "secret", True)
    assert not job.session_ready("http://other", None, False)  # the first report stands
    assert job.endpoint == "http://b:8080"


def test_a_call_starts_once() -> None:
    job = record("running, session ready")
    assert job.call_started()
    assert job.started
    assert not job.call_started()


def test_progress_is_kept_while_the_job_runs() -> None:
    job = record("running")
    assert job.note_progress({"progress": 1}, 1)
    assert job.note_progress({"progress": 2}, 2)
    assert (job.progress, job.progress_count) == ({"progress": 2}, 2)


def test_a_rerun_follows_a_new_call_and_counts_the_attempt() -> None:
    job = record("running")
    assert job.rerun("job-1.1")
    assert (job.call_id, job.attempts) == ("job-1.1", 2)
    assert job.rerun("job-1.2")
    assert (job.call_id, job.attempts) == ("job-1.2", 3)


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_a_job_ends_once_and_stays_as_it_ended(status: str) -> None:
    job = record("running")
    error = None if status == "completed" else PierError("CANCELLED" if status == "cancelled" else "X", "why")
    result: dict[str, Any] | None = {"content": []} if status == "completed" else None
    assert job.finish(status, result=result, error=error)  # type: ignore[arg-type]
    assert job.done
    assert job.status == status
    assert job.finished_at is not None
    assert job.result == result
    assert (job.error.code if job.error else None) == (error.code if error else None)
    ended = job.model_dump()
    others: tuple[Literal["completed", "failed", "cancelled"], ...] = ("completed", "failed", "cancelled")
    for other in others:
        assert not job.finish(other, result={"late": True})
    assert not job.take()
    assert not job.rerun("x")
    assert not job.note_progress({}, 9)
    assert not job.call_started()
    assert job.model_dump() == ended


def test_the_webhook_state_changes_after_the_end() -> None:
    job = record("completed")
    assert job.webhook_state == "pending"
    assert job.webhook_sent(False)
    assert job.model_dump()["webhook_state"] == "dead"  # read afresh: mypy narrowed the attribute to "pending"
    assert job.webhook_sent(True)
    assert job.model_dump()["webhook_state"] == "delivered"


@pytest.mark.parametrize(
    ("state", "retry_safe", "suspect", "attempts", "max_reruns", "expected"),
    [
        ("running", True, False, 1, 2, True),
        ("running", True, False, 2, 2, True),  # attempts counts the first run: two re-runs allowed
        ("running", True, False, 3, 2, False),  # out of re-runs
        ("running", False, False, 1, 2, False),  # not retry-safe
        ("running", True, True, 1, 2, False),  # the suspect of its server's exit
        ("queued", True, False, 1, 2, True),
        ("completed", True, False, 1, 2, False),
        ("failed", True, False, 1, 2, False),
        ("cancelled", True, False, 1, 2, False),
        ("running", True, False, 1, 0, False),  # re-runs switched off
    ],
)
def test_may_rerun_only_a_safe_live_unsuspected_job_within_its_budget(
    state: str, retry_safe: bool, suspect: bool, attempts: int, max_reruns: int, expected: bool
) -> None:
    job = record(state)
    job.retry_safe, job.attempts = retry_safe, attempts
    before = job.model_dump()
    assert job.may_rerun(max_reruns, suspect) is expected
    assert job.model_dump() == before  # a question, not a transition


def test_views_never_show_the_endpoint_token() -> None:
    job = record("running")
    job.endpoint_token = "bridge-secret"
    assert "bridge-secret" not in str(job.view())
    assert "bridge-secret" not in str(job.completion_event())
