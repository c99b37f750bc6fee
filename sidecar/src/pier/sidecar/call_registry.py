"""Tool calls started through the internal call API, which outlive the HTTP request.

A call keeps running when the router stops waiting for it; the job pool attaches to it later
by id (long-poll), so a call that overruns the router's timeout is never executed twice.

A call started with its caller's capabilities (an MCP task's) can be asked for input: the server's
requests during it (sampling, elicitation, roots) wait as its `input_requests`, each under a key of
its own, until the caller's answers come (`answer`, from `tasks/update`) — the call goes on meanwhile,
on the same session, run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pier.core import tracing
from pier.core.callapi import CallAnswer
from pier.core.errors import PierError
from pier.core.jsonrpc import INVALID_PARAMS, REQUEST_CANCELLED, Message, is_request
from pier.core.protocol import CAPABILITY_FOR
from pier.sidecar.multiplexer import Pending
from pier.sidecar.schema import Validator, argument_errors, compile_schema, constrains
from pier.sidecar.upstream import Upstream

log = logging.getLogger("pier.sidecar.call_registry")

_MAX_PROGRESS = 100  # kept per call; older entries are dropped (the count says how many came)


class Call:
    """One tool call: its progress as it runs, then its result or error."""

    # Up to `max_retained_calls` of these stay in memory: no per-instance dict.
    __slots__ = (
        "_changed", "answers", "arguments", "asked", "capabilities", "created_at", "error", "finished_at", "id",
        "input_version", "on_finish", "pending", "progress", "progress_count", "result", "resumed", "span", "status",
        "task", "tool",
    )  # fmt: skip

    def __init__(
        self, call_id: str, tool: str, arguments: dict[str, Any], capabilities: dict[str, Any] | None = None
    ) -> None:
        self.id = call_id
        self.tool = tool
        self.arguments = arguments
        self.status = "running"
        self.result: dict[str, Any] | None = None
        self.error: PierError | None = None
        self.progress: list[dict[str, Any]] = []
        self.progress_count = 0
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.pending: Pending | None = None
        self.task: asyncio.Task[None] | None = None
        self.on_finish: Callable[[Call], None] | None = None
        self.capabilities = capabilities  # None: the server may ask this call's caller nothing
        self.asked: dict[str, Message] = {}  # key → the server's request still waiting for an answer
        self.input_version = 0
        # A 2026-07-28 server asks by answering InputRequiredResult: its answers gather here until
        # every key has one, then the call is sent again with them (`resumed` then resolves).
        self.answers: dict[str, Any] = {}
        self.resumed: asyncio.Future[dict[str, Any]] | None = None
        self.span: tracing.Span = tracing.NULL  # the call on the bridge, from its start to its end
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.status != "running"

    # Sink: messages tied to this call while it runs.
    def deliver(self, message: Message) -> None:
        if is_request(message):
            # The server asks the caller: the request waits for its answer under a key of its own.
            self.input_version += 1
            self.asked[f"input-{self.input_version}"] = message
            self._notify()
            return
        if message.get("method") == "notifications/cancelled":
            # The server withdrew a request of its own.
            withdrawn = (message.get("params") or {}).get("requestId")
            for key in [k for k, asked in self.asked.items() if asked.get("id") == withdrawn]:
                del self.asked[key]
                self.input_version += 1
            self._notify()
            return
        if message.get("method") == "notifications/progress":
            params = message.get("params") or {}
            self.progress.append(
                {
                    "progress": params.get("progress", 0),
                    "total": params.get("total"),
                    "message": params.get("message"),
                    "at": time.time(),
                }
            )
            del self.progress[:-_MAX_PROGRESS]
            self.progress_count += 1
            self._notify()

    def finish(self, status: str, result: dict[str, Any] | None = None, error: PierError | None = None) -> None:
        if self.done:
            return
        self.status, self.result, self.error = status, result, error
        self.finished_at = time.time()
        self._end_span()
        # A retained call only answers reads: drop what it no longer needs (the request, the
        # multiplexer's record of it), so thousands of retained calls stay small.
        self.arguments = {}
        self.pending = None
        self.asked = {}
        self._notify()
        if self.on_finish is not None:
            self.on_finish(self)

    def _end_span(self) -> None:
        if self.span.recording:
            self.span.set("pier.call.status", self.status)
            if self.error is not None:
                tracing.record_error(self.span, self.error)
            elif self.result is not None and self.result.get("isError") is True:
                self.span.fail("tool_error")
            self.span.end()
            self.span = tracing.NULL

    def _notify(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, wait_s: float, progress_after: int = -1, input_after: int = -1) -> None:
        """Return when the call is done, has progress beyond `progress_after`, input requests changed
        since `input_after`, or after `wait_s`."""
        if self.done or wait_s <= 0:
            return
        # asyncio.timeout rather than wait_for: no extra task per wait (one per REST call).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while not self.done and (progress_after < 0 or self.progress_count <= progress_after):
                    if 0 <= input_after < self.input_version:
                        return
                    await self._changed.wait()

    def park(self, result: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """The server answered InputRequiredResult (2026-07-28): its requests wait for the caller;
        the future resolves with every answer, for the call's next round."""
        requests = result.get("inputRequests")
        self.answers = {}
        self.asked = dict(requests) if isinstance(requests, dict) else {}
        self.resumed = asyncio.get_running_loop().create_future()
        self.input_version += 1
        self._notify()
        return self.resumed

    def answer_input(self, mux: Any, responses: dict[str, Any]) -> None:
        """The caller's answers (key → result) to the server requests this call waits on; keys not
        outstanding are ignored (SEP-2663), and an answer the caller could not have given (it did
        not declare the capability) is refused to the server."""
        answered = False
        for key in [k for k in self.asked if k in responses]:
            asked = self.asked.pop(key)
            answer = responses[key]
            answered = True
            if "id" not in asked:  # asked by an InputRequiredResult: answered all at once, next round
                self.answers[key] = answer
                continue
            capability = CAPABILITY_FOR.get(str(asked.get("method")))
            if not isinstance(answer, dict):
                mux.answer_server_request(
                    asked["id"], error={"code": INVALID_PARAMS, "message": "invalid input response"}
                )
            elif capability is not None and capability not in (self.capabilities or {}):
                mux.answer_server_request(asked["id"], error={"code": -32601, "message": "not supported by the client"})
            else:
                mux.answer_server_request(asked["id"], answer)
        if answered:
            self.input_version += 1
            if not self.asked and self.resumed is not None and not self.resumed.done():
                self.resumed.set_result(self.answers)
            self._notify()

    def answer(self, progress_after: int = 0) -> CallAnswer:
        """The call as the call API reports it, with the progress after the first `progress_after`."""
        skip = max(0, progress_after - (self.progress_count - len(self.progress)))
        return CallAnswer(
            call_id=self.id,
            tool=self.tool,
            status=self.status,  # type: ignore[arg-type]  # one of CallStatus, set by this class only
            result=self.result,
            error=self.error.to_dict() if self.error else None,
            progress=self.progress[skip:],
            progress_count=self.progress_count,
            created_at=self.created_at,
            finished_at=self.finished_at,
            input_requests={
                key: {"method": asked["method"], "params": asked.get("params") or {}}
                for key, asked in self.asked.items()
            },
            input_version=self.input_version,
        )


def error_from_response(error: dict[str, Any]) -> PierError:
    """Turn a JSON-RPC error from the server (or from the bridge) into a Pier error."""
    data = error.get("data")
    message = str(error.get("message", "error"))
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        details = {k: v for k, v in data.items() if k != "code"}
        return PierError(data["code"], message, details)
    if error.get("code") == INVALID_PARAMS:
        return PierError("INVALID_ARGUMENTS", message, {"jsonrpc_error": error})
    return PierError("SERVER_ERROR", message, {"jsonrpc_error": error})


def _input_required(result: Any) -> bool:
    return isinstance(result, dict) and result.get("resultType") == "input_required"


class CallRegistry:
    """The calls of this bridge, kept readable for `call_retention_s` after they finish.

    At most `max_retained` calls are kept: starting a call first forgets the oldest finished
    ones beyond the cap, so the registry never outgrows it between sweeps (under load, a
    periodic sweep alone let a bridge retain several times the cap). Running calls are never
    forgotten; their number is bounded by the bridge's concurrency and queue limits.
    """

    def __init__(self, upstream: Upstream, retention_s: float, max_retained: int) -> None:
        self.upstream = upstream
        self.retention_s = retention_s
        self.max_retained = max_retained
        self.calls: dict[str, Call] = {}
        self._finished: dict[str, Call] = {}  # in the order they finished (oldest first)
        self._validators: dict[str, Validator] = {}
        upstream.on_tools_changed = self._tools_changed

    def _tools_changed(self) -> None:
        self._validators.clear()
        if self.upstream.settings.warm_up:  # a pooled bridge: compile now, not at its first user's call
            for tool in self.upstream.tools_by_name:
                self._validator(tool)

    @property
    def running(self) -> int:
        return len(self.calls) - len(self._finished)

    async def start(
        self, tool: str, arguments: dict[str, Any], call_id: str | None, capabilities: dict[str, Any] | None = None
    ) -> Call:
        """Start a call, or return the existing one with this id: an id never runs twice."""
        if call_id is not None and call_id in self.calls:
            return self.calls[call_id]
        await self.upstream.wait_ready()
        self._check(tool, arguments)
        self.upstream.check_capacity()
        if call_id is not None and call_id in self.calls:  # another request won the race while we waited
            return self.calls[call_id]
        call = Call(call_id or uuid.uuid4().hex, tool, arguments, capabilities)
        self._make_room()
        call.on_finish = self._finished_call
        self.calls[call.id] = call
        if tracing.enabled():
            attributes = {"pier.call.id": call.id, "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool}
            call.span = tracing.begin(tracing.span_name("bridge call", tool), attributes=attributes)
        # The call's work runs under its span: the request to the server is its child.
        call.task = asyncio.create_task(
            self._run(call), name=f"pier-call-{call.id}", context=tracing.task_context(call.span)
        )
        return call

    def _finished_call(self, call: Call) -> None:
        if self.calls.get(call.id) is call:
            self._finished[call.id] = call

    def _make_room(self) -> None:
        """Forget the oldest finished calls until one more fits under the cap."""
        while len(self.calls) >= self.max_retained and self._finished:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        call_id = next(iter(self._finished))
        del self._finished[call_id]
        del self.calls[call_id]

    def get(self, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None:
            raise PierError("CALL_NOT_FOUND", f"no call {call_id!r} on this bridge (finished calls expire)")
        return call

    def cancel(self, call: Call, reason: str) -> None:
        if call.done:
            return
        if call.pending is not None and not call.pending.future.done():
            self.upstream.mux.withdraw_server_requests(call.pending, reason)
            self.upstream.mux.cancel(call.pending, reason)
        elif call.task is not None:
            call.task.cancel()  # waiting for a slot (never reached the server), or for its caller's input
        call.finish("cancelled")

    async def close(self) -> None:
        tasks = [call.task for call in self.calls.values() if call.task is not None and not call.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _validator(self, tool: str) -> Validator:
        schema = self.upstream.tools_by_name[tool].get("inputSchema") or {"type": "object"}
        if not constrains(schema):
            validator: Validator = False
        elif not (validator := compile_schema(json.dumps(schema, sort_keys=True))):
            log.warning("tool has an invalid inputSchema; not validating its arguments", extra={"tool": tool})
        self._validators[tool] = validator
        return validator

    def _check(self, tool: str, arguments: dict[str, Any]) -> None:
        """Refuse unknown tools, and arguments that break the tool's input schema, before the server."""
        if not self.upstream.tools_by_name:
            return  # a server without a tool list: let it judge
        if tool not in self.upstream.tools_by_name:
            known = sorted(self.upstream.tools_by_name)
            raise PierError("UNKNOWN_TOOL", f"the server has no tool {tool!r}", {"tools": known[:100]})
        validator = self._validators.get(tool)
        if validator is None:
            validator = self._validator(tool)
        errors = argument_errors(validator, arguments)
        if errors:
            raise PierError(
                "INVALID_ARGUMENTS",
                f"arguments do not match the input schema of {tool!r}: {errors[0]['message']}",
                {"errors": errors[:20]},
            )

    async def _run(self, call: Call) -> None:
        params: dict[str, Any] = {"name": call.tool, "arguments": call.arguments}
        try:
            while True:
                message = {"jsonrpc": "2.0", "id": call.id, "method": "tools/call", "params": params}
                call.pending = await self.upstream.begin(
                    message, None, call, track_progress=True, capabilities=call.capabilities
                )
                response = await call.pending.future
                result = response.get("result")
                if call.capabilities is None or not _input_required(result):
                    break
                # A 2026-07-28 server needs the caller's input: the call waits for it, then goes on.
                assert isinstance(result, dict)
                answers = await call.park(result)
                params = {**params, "inputResponses": answers}
                if "requestState" in result:
                    params["requestState"] = result["requestState"]
        except PierError as err:
            call.finish("failed", error=err)
            return
        except asyncio.CancelledError:
            call.finish("cancelled")
            raise
        except Exception as exc:
            # Whatever goes wrong, the call ends: a call left `running` would keep its session
            # busy forever (never reaped nor evicted) and its caller waiting.
            log.exception("call failed unexpectedly", extra={"call_id": call.id, "tool": call.tool})
            call.finish("failed", error=PierError("INTERNAL", f"the bridge failed the call: {type(exc).__name__}"))
            return
        finally:
            call.task = None  # this task is ending: a retained call need not keep it
        if "result" in response:
            call.finish("completed", result=response["result"])
        elif response["error"].get("code") == REQUEST_CANCELLED:
            call.finish("cancelled")
        else:
            call.finish("failed", error=error_from_response(response["error"]))

    def sweep(self) -> None:
        """Forget finished calls past their retention (oldest first, so it stops at the first kept)."""
        cutoff = time.time() - self.retention_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            assert oldest.finished_at is not None
            if oldest.finished_at >= cutoff:
                return
            self._forget_oldest()
