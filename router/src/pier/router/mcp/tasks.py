"""MCP tasks backed by the job pool: a job seen through MCP.

A caller that asks for tasks — 2025-11-25 experimental tasks (a `task` field on `tools/call`), or
the 2026-07-28 tasks extension (`io.modelcontextprotocol/tasks` in the request's capabilities) —
has its `tools/call` run as a REST call is (`CallService.call`: rules, policy, audit, retries, the
hand-off). A call becomes a task whose id is its job id at once — any call a 2025-11-25 caller asked
to run as a task, and at 2026-07-28 a call of a tool the profile runs as a task (`task_support`:
optional or required) — or when it overruns the profile's timeout. `tasks/get`, `tasks/result`
(2025-11-25), `tasks/list` (the caller's own, 2025-11-25), `tasks/cancel` and `tasks/update`
(2026-07-28) are answered from the job record in Redis, by whichever router replica the caller
reaches: a task survives the caller's disconnects, router restarts and worker deaths exactly as a
job does. What the server asks during a task's call waits in the record (`input_required`, its
`inputRequests`) until `tasks/update` hands the answers to the call on its session's bridge.
The record changes state only through `pier.core.job.JobRecord` (its transitions, via `JobStore`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from pier.core import __version__, audit
from pier.core.callapi import Endpoint
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.job import JobRecord, iso
from pier.core.jobstore import JobStore
from pier.core.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, Message, error_response, gateway_error_response
from pier.core.policy import Caller
from pier.core.protocol import (
    CLIENT_CAPABILITIES_KEY,
    MISSING_CAPABILITY,
    RELATED_TASK_KEY,
    SERVER_INFO_KEY,
    TASKS_EXTENSION,
    meta_of,
)
from pier.router.calls import TaskCall
from pier.router.shared import cancel_job
from pier.router.state import Router

POLL_INTERVAL_MS = 1000
# A 2025-11-25 caller that asked for a task gets one at once: the call is handed off as soon as it
# has started, rather than after the profile's timeout.
_AT_ONCE_S = 0.001
_LIST_PAGE = 50

_MODERN_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
_HANDSHAKE_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})
_STATUS = {"queued": "working", "running": "working", "completed": "completed", "failed": "failed",
           "cancelled": "cancelled"}  # fmt: skip
# What a CreateTaskResult carries (the Task itself: no result, error or input requests, SEP-2663).
_CREATE_FIELDS = ("taskId", "status", "statusMessage", "createdAt", "lastUpdatedAt", "ttlMs", "pollIntervalMs")
_PIER_INFO = {"name": "pier", "version": __version__}  # who answers what Pier answers itself (2026-07-28 _meta)


def wants_tasks(message: Message, modern: bool) -> bool:
    """Whether this `tools/call` comes from a caller that takes tasks."""
    if message.get("method") != "tools/call":
        return False
    params = message.get("params") or {}
    if modern:
        capabilities = meta_of(message).get(CLIENT_CAPABILITIES_KEY)
        extensions = capabilities.get("extensions") if isinstance(capabilities, dict) else None
        return isinstance(extensions, dict) and TASKS_EXTENSION in extensions
    return isinstance(params.get("task"), dict)


def declares_tasks(message: Message) -> bool:
    capabilities = meta_of(message).get(CLIENT_CAPABILITIES_KEY)
    extensions = capabilities.get("extensions") if isinstance(capabilities, dict) else None
    return isinstance(extensions, dict) and TASKS_EXTENSION in extensions


def missing_extension(request_id: Any) -> Message:
    """-32021: the request needs the tasks extension its caller did not declare (SEP-2663)."""
    return {"jsonrpc": "2.0", "id": request_id, "error": {
        "code": MISSING_CAPABILITY, "message": "Missing required client capability",
        "data": {"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}}}}  # fmt: skip


def stamped(result: dict[str, Any]) -> dict[str, Any]:
    """A 2026-07-28 result Pier answers itself, with who answered in its `_meta` (#3002)."""
    found = result.get("_meta")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    return {**result, "_meta": {**meta, SERVER_INFO_KEY: _PIER_INFO}}


def task_view(record: JobRecord, ttl_s: int, modern: bool) -> dict[str, Any]:
    """A job as an MCP Task (2026-07-28 names its fields ttlMs/pollIntervalMs, 2025-11-25 ttl/pollInterval)."""
    status = _STATUS[record.status]
    updated = record.finished_at or record.started_at or record.created_at
    view: dict[str, Any] = {
        "taskId": record.job_id,
        "status": status,
        "createdAt": iso(record.created_at),
        "lastUpdatedAt": iso(updated),
        ("ttlMs" if modern else "ttl"): ttl_s * 1000,
        ("pollIntervalMs" if modern else "pollInterval"): POLL_INTERVAL_MS,
    }
    progress = record.progress or {}
    if modern and status == "working" and record.input_requests:
        view["status"] = "input_required"
        view["inputRequests"] = record.input_requests
    elif status == "working" and progress.get("message"):
        view["statusMessage"] = str(progress["message"])
    elif record.error is not None:
        view["statusMessage"] = record.error.message
    if modern:
        if status == "completed":
            view["result"] = record.result or {}
        elif status == "failed" and record.error is not None:
            view["error"] = _rpc_error(record)["error"]
    return view


def _rpc_error(record: JobRecord, request_id: Any = None) -> Message:
    assert record.error is not None
    error = PierError(record.error.code, record.error.message, record.error.details)
    return gateway_error_response(request_id, error)


class Tasks:
    """The tasks methods and task-creating calls of one user's session of one profile."""

    def __init__(self, router: Router, caller: Caller, profile: Profile, modern: bool) -> None:
        self.router = router
        self.caller = caller
        self.profile = profile
        self.modern = modern

    @property
    def store(self) -> JobStore:
        return self.router.store

    @property
    def ttl_s(self) -> int:
        return self.router.settings.result_ttl_s

    # -- a call that may become a task ---------------------------------------------------------

    async def call(self, message: Message, job_id: str, received_at: float, at_once: bool = True) -> Message:
        """Run a `tools/call` as a REST call is; its answer, or a CreateTaskResult when it became a task.

        `received_at` (time.monotonic()): when the request arrived, where its deadline starts.
        `at_once`: a task now (a 2025-11-25 caller asked for one; a 2026-07-28 caller of a tool the
        profile runs as a task), not only when the call overruns.
        """
        params = message.get("params") or {}
        tool, arguments = str(params.get("name")), params.get("arguments") or {}
        at_once = at_once or not self.modern
        capabilities = meta_of(message).get(CLIENT_CAPABILITIES_KEY) if self.modern else None
        try:
            result = await self.router.calls.call(
                self.caller, self.profile, tool, arguments, _AT_ONCE_S if at_once else None,
                received_at=received_at,
                task=TaskCall(job_id, capabilities if isinstance(capabilities, dict) else None),
            )  # fmt: skip
        except PierError as err:
            return gateway_error_response(message["id"], err)
        if result.status == 202:
            record = await self.store.get(job_id)
            assert record is not None  # the hand-off saved it before answering
            return self._created(message, record)
        answer = result.body["result"]
        if not at_once:
            # A 2026-07-28 result names its kind (a handshake-era server's does not).
            return {"jsonrpc": "2.0", "id": message["id"], "result": stamped({"resultType": "complete", **answer})}
        # Asked for a task but done already: still a task (a finished job), as the caller expects.
        record = self._finished_record(job_id, tool, arguments, answer)
        await self.store.save(record, index=True)
        return self._created(message, record)

    def _created(self, message: Message, record: JobRecord) -> Message:
        view = task_view(record, self.ttl_s, self.modern)
        if self.modern:
            task = {key: view[key] for key in _CREATE_FIELDS if key in view}
            result = stamped({"resultType": "task", **task})
        else:
            result = {"task": view}
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def _finished_record(self, job_id: str, tool: str, arguments: Any, result: dict[str, Any]) -> JobRecord:
        now = time.time()
        record = JobRecord(
            job_id=job_id, user=self.caller.user, server=self.profile.name, tool=tool, arguments=arguments,
            call_id=job_id, endpoint="", request_digest=audit.digest({"tool": tool, "arguments": arguments}),
            identity=self.caller.identity, created_at=now, started_at=now,
        )  # fmt: skip
        record.take()
        record.finish("completed", result=result)
        return record

    # -- tasks/* ---------------------------------------------------------------------------------

    async def answer(self, message: Message, server_tasks: Callable[[], Awaitable[bool]]) -> Message | None:
        """The answer to a tasks/* request about one of Pier's jobs; None when the id is no job of
        Pier's and the server has tasks of its own (`server_tasks()`: it answers then)."""
        method = message["method"]
        request_id = message["id"]
        if method not in (_MODERN_METHODS if self.modern else _HANDSHAKE_METHODS):
            # tasks/result and tasks/list are 2025-11-25's; tasks/update is 2026-07-28's.
            return error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
        if self.modern and not declares_tasks(message):
            return missing_extension(request_id)
        params = message.get("params") or {}
        if method == "tasks/list":
            return await self._list(request_id, params.get("cursor"))
        task_id = params.get("taskId")
        record = await self.store.get(task_id) if isinstance(task_id, str) and task_id else None
        if record is None and (not self.modern or await server_tasks()):
            if method == "tasks/get" and not self.modern:
                return None
            if self.modern:
                return None  # the server's own task, if it is one: the server answers
        if record is None or record.user != self.caller.user or record.server != self.profile.name:
            # Another user's task is no task of this caller's: never passed on to any server.
            return error_response(request_id, INVALID_PARAMS, f"Failed to retrieve task: no task {task_id!r}")
        if method == "tasks/get":
            return self._ok(request_id, task_view(record, self.ttl_s, self.modern))
        if method == "tasks/result":
            return await self._result(request_id, record)
        if method == "tasks/cancel":
            return await self._cancel(request_id, record)
        return await self._update(request_id, record, params.get("inputResponses"))

    async def _update(self, request_id: Any, record: JobRecord, responses: Any) -> Message:
        """tasks/update: the caller's answers go to the call on its session, which waits for them."""
        if not isinstance(responses, dict):
            return error_response(request_id, INVALID_PARAMS, "Invalid params: inputResponses must be an object")
        if record.done or not record.input_requests:
            return error_response(
                request_id, INVALID_PARAMS, f"Invalid params: task {record.job_id!r} is not waiting for input"
            )
        bridge = self.router.http_bridge(Endpoint(record.endpoint, record.endpoint_token))
        try:
            answer = await bridge.answer_call(record.call_id, responses)
        except PierError as err:
            return gateway_error_response(request_id, err)
        # The record says at once what is still awaited: the next tasks/get, on any replica, sees it.
        await self.store.update(record.job_id, lambda r: r.note_input(answer.input_requests, answer.input_version))
        return self._ok(request_id, {})

    def _ok(self, request_id: Any, result: dict[str, Any]) -> Message:
        if self.modern:
            result = stamped({"resultType": "complete", **result})
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def _result(self, request_id: Any, record: JobRecord) -> Message:
        """2025-11-25: wait for the end, then exactly what the call would have answered."""
        if not record.done:
            async for event in self.store.events(record.job_id, self.router.settings.max_call_timeout_s * 30):
                if event.get("type") == "completed":
                    break
            record = await self.store.get(record.job_id) or record
        if not record.done:
            return error_response(request_id, INVALID_PARAMS, "the task is still running; ask again")
        related = {RELATED_TASK_KEY: {"taskId": record.job_id}}
        if record.status == "completed":
            result = dict(record.result or {})
            result["_meta"] = {**(result.get("_meta") or {}), **related}
            return {"jsonrpc": "2.0", "id": request_id, "result": result}
        if record.error is None:
            return error_response(request_id, -32800, "the task was cancelled")
        return _rpc_error(record, request_id)

    async def _cancel(self, request_id: Any, record: JobRecord) -> Message:
        if record.done and not self.modern:
            return error_response(
                request_id, INVALID_PARAMS, f"Cannot cancel task: already in terminal status {_STATUS[record.status]!r}"
            )
        record = await cancel_job(self.router, record)
        return self._ok(request_id, {} if self.modern else task_view(record, self.ttl_s, self.modern))

    async def _list(self, request_id: Any, cursor: Any) -> Message:
        start = int(cursor) if isinstance(cursor, str) and cursor.isdigit() else 0
        ids = await self.store.user_jobs(self.caller.user, self.profile.name, start, _LIST_PAGE)
        records = [r for r in await self.store.get_many(ids) if r is not None]
        result: dict[str, Any] = {"tasks": [task_view(r, self.ttl_s, False) for r in records]}
        if len(ids) == _LIST_PAGE:
            result["nextCursor"] = str(start + _LIST_PAGE)
        return self._ok(request_id, result)
