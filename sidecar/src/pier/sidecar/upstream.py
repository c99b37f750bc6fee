"""The one stdio server behind the bridge: its runs, its handshake, its caches, its limits.

A supervisor task starts the server, initializes it once, caches the InitializeResult and the
tool list, and restarts it with backoff when it exits. Requests wait (bounded) for a slot and
for readiness, then go through the multiplexer.

The server's era is settled at each start (`server_era`). By default (`auto`) the bridge asks
`server/discover` first: a server that speaks 2026-07-28 answers it, and is spoken to in 2026-07-28
(every request carrying its own `_meta` envelope; modern callers' requests pass through as they
are). A server that does not know it (an error answer, no answer, or an exit at the probe) is
initialized with the handshake, which every server up to 2025-11-25 speaks; 2026-07-28 callers are
then translated onto that session. `handshake` skips the probe; `modern` insists on 2026-07-28.

A server whose stdio connection takes one era for its whole life (the `mcp` SDK 2.x decides at the
first request) cannot serve both eras on one pipe: `Eras` gives handshake-era callers of such a
server a second run of it, initialized with the handshake, started when the first of them arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pier.core import __version__, tracing
from pier.core.errors import PierError
from pier.core.jsonrpc import MAX_DEPTH, Message, dumps, gateway_error_response, loads, too_deep, validate_message
from pier.core.protocol import (
    CLIENT_CAPABILITIES_KEY,
    CLIENT_INFO_KEY,
    ENVELOPE_KEYS,
    HANDSHAKE_VERSIONS,
    LOG_LEVEL_KEY,
    MODERN,
    PROTOCOL_VERSION_KEY,
    SERVER_INFO_KEY,
    TASKS_EXTENSION,
    meta_of,
    strip_envelope,
)
from pier.sidecar.clients import ClientSession
from pier.sidecar.config import SidecarSettings
from pier.sidecar.metrics import BridgeMetrics
from pier.sidecar.multiplexer import NO_SINK, Multiplexer, Pending, Sink
from pier.sidecar.transport import ServerExit, Transport, oversize_id

log = logging.getLogger("pier.sidecar.upstream")

HANDSHAKE_VERSION = "2025-11-25"
# What the bridge offers the server: it can relay these to whichever client is calling.
BRIDGE_CAPABILITIES = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {}}
BRIDGE_INFO = {"name": "pier-bridge", "version": __version__}
WARM_UP_TOOL = "pier.warm-up.no-such-tool"  # what a warming bridge calls (settings.warm_up)


def _stdio_span(message: Message) -> tracing.Span:
    """The MCP client span of a request to the server, over its pipe (ended when its answer comes)."""
    if not tracing.enabled():
        return tracing.NULL
    return tracing.begin(tracing.mcp_span_name(message), "client", tracing.mcp_attributes(message, "pipe"))


def _answered(span: tracing.Span, future: asyncio.Future[Message]) -> None:
    if not future.cancelled():
        tracing.record_answer(span, future.result())
    span.end()


class Upstream:
    """Owns the server's lifecycle and is the only way to send it a request."""

    def __init__(
        self,
        settings: SidecarSettings,
        make_transport: Callable[[], Transport],
        metrics: BridgeMetrics,
        broadcast: Callable[[Message], None],
        era: str | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.settings = settings
        self.era = era or settings.server_era  # auto | handshake | modern
        self.metrics = metrics
        self._make_transport = make_transport
        self.mux = Multiplexer(self._post, broadcast, self._schedule_tools_refresh)
        self.transport: Transport | None = None

        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.modern = False  # this run of the server speaks 2026-07-28 (no handshake)
        self.refused = False  # the server refused what `era` insists on (a handshake-only run of a modern-only server)
        self._probe_failed = False  # server/discover went unanswered or killed the server: handshake from now on
        self._probing = False
        self.init_result: dict[str, Any] | None = None
        self.discover_result: dict[str, Any] | None = None
        self.tools: list[dict[str, Any]] = []
        self.tools_by_name: dict[str, dict[str, Any]] = {}
        self.restarts = 0
        self.last_exit: ServerExit | None = None
        self.started_at = time.time()
        self.last_activity = time.time()

        self._answered_error = False  # the last request of the bridge's own was answered with an error
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # set (then replaced) when the server becomes ready or a run ends
        self._ever_ready = False
        self._gave_up = asyncio.Event()
        # A second run of the server (`Eras`) shares the first one's slots: the limit is the session's.
        self._slots = slots if slots is not None else asyncio.Semaphore(settings.max_concurrent_calls)
        self._waiting = 0
        self._active = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tools_task: asyncio.Task[None] | None = None
        self.on_tools_changed: Callable[[], None] = lambda: None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        # The first run's start belongs to whatever starts the bridge (a session's start, in the router's
        # process); the supervisor, and all the server's runs do later, to no request's trace.
        first = tracing.current()
        self._supervisor = asyncio.create_task(self._supervise(first), name="pier-upstream", context=tracing.untraced())

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def slots(self) -> asyncio.Semaphore:
        return self._slots

    @property
    def gave_up(self) -> asyncio.Event:
        return self._gave_up

    @property
    def in_flight(self) -> int:
        """Callers' requests the server is working on (the bridge's own handshake not counted)."""
        return self._active

    @property
    def queued(self) -> int:
        """Requests waiting for a concurrency slot."""
        return self._waiting

    async def stop(self) -> None:
        """Stop the server (stdin EOF → SIGTERM → SIGKILL) and the supervisor."""
        self._stopping = True
        self._ready.clear()
        if self.transport is not None:
            await self.transport.close()
        for task in (self._supervisor, self._tools_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.state = "stopped"

    async def _supervise(self, first: tracing.TraceContext | None) -> None:
        backoff = self.settings.restart_backoff_initial_s
        consecutive_failures = 0
        parent: tracing.Parent = first
        while not self._stopping:
            ready_since = await self._run_once(parent)
            parent = tracing.ROOT  # a restart is a trace of its own
            if self._stopping:
                return
            if self.refused:
                # Not a failure to retry: this server does not speak what this run insists on.
                self.state = "failed"
                self._gave_up.set()
                self._notify()
                return
            self.restarts += 1
            self.metrics.restarts.inc()
            if ready_since is not None and time.monotonic() - ready_since >= self.settings.stable_after_s:
                consecutive_failures, backoff = 0, self.settings.restart_backoff_initial_s
            consecutive_failures += 1
            if self.settings.max_restarts and consecutive_failures > self.settings.max_restarts:
                self.state = "failed"
                self._gave_up.set()
                self._notify()
                log.error("server keeps failing; giving up", extra={"failures": consecutive_failures})
                return
            self.state = "restarting"
            log.warning("restarting server", extra={"in_s": backoff, "restarts": self.restarts})
            await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.05), self.settings.restart_backoff_max_s)

    async def _run_once(self, parent: tracing.Parent) -> float | None:
        """One run of the server, from spawn to exit. Returns when it became ready (or None).

        Its start (spawn to ready) is a span: the first run's under `parent`, a restart's a trace of its own.
        """
        self.state = "starting"
        transport = self._make_transport()
        transport.on_line = self._on_line
        transport.on_oversize = self._on_oversize
        ready_since = None
        died_probing = False
        name = "server restart" if self.restarts else "server start"
        span = tracing.begin(name, parent=parent, attributes={"pier.restarts": self.restarts})
        try:
            await transport.open()
            self.transport = transport
            closed = asyncio.ensure_future(transport.wait_closed())
            ready_since, died_probing = await self._until_ready(transport, closed, span)
            exit_info = await closed
            if died_probing:
                # It ended at (or rather than answering) server/discover: next time, the handshake alone.
                log.warning("the server exited at server/discover; initializing it with the handshake from now on")
                self._probe_failed = True
        except OSError as exc:
            exit_info = ServerExit(reason=f"could not start the server: {exc}")
            span.fail("SERVER_EXITED", exit_info.reason)
        except asyncio.CancelledError:
            await transport.close()
            raise
        finally:
            span.end()
        self._ready.clear()
        self.metrics.server_up.set(0)
        if not died_probing:  # an exit at the probe is no failure to report: the handshake comes next
            self.last_exit = exit_info
        self._notify()  # a server that never got ready is reported to its waiters at once
        self.mux.fail_all(PierError("SERVER_EXITED", exit_info.reason, exit_info.details()), exit_info.self_inflicted)
        await transport.close()
        self.transport = None
        if not self._stopping:
            log.warning("server exited", extra=exit_info.details())
        return ready_since

    async def _until_ready(
        self, transport: Transport, closed: asyncio.Future[ServerExit], span: tracing.Span
    ) -> tuple[float | None, bool]:
        """The handshake, until the server is ready (returns when) or exits first (None; stopped if it hangs);
        and whether it exited while probed with server/discover."""
        with tracing.use(span):
            handshake = asyncio.ensure_future(self._handshake())
        waits: set[asyncio.Future[Any]] = {closed, handshake}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        died_probing = self._probing and closed.done()
        if handshake.done() and handshake.exception() is None:
            self.state = "ready"
            self._ready.set()
            self._ever_ready = True
            self._notify()
            self.metrics.server_up.set(1)
            log.info("server ready", extra={"server": (self.init_result or {}).get("serverInfo")})
            span.end()
            return time.monotonic(), False
        handshake.cancel()
        with contextlib.suppress(BaseException):
            await handshake
        error = handshake.exception() if not handshake.cancelled() else None
        if not closed.done():
            log.error("server failed to initialize", extra={"error": str(error)})
            await transport.close()
        if error is not None:
            tracing.record_error(span, error)
        else:
            span.fail("SERVER_EXITED", "the server exited before it was ready")
        span.end()
        return None, died_probing

    async def _handshake(self) -> None:
        timeout = self.settings.start_timeout_s
        self.modern = False
        if self.era == "modern" or (self.era == "auto" and not self._probe_failed):
            self.modern = await self._discover(timeout)
        if not self.modern:
            try:
                response = await self._internal_request(
                    "initialize",
                    {
                        "protocolVersion": HANDSHAKE_VERSION,
                        "capabilities": BRIDGE_CAPABILITIES,
                        "clientInfo": BRIDGE_INFO,
                    },
                    timeout,
                )
            except PierError:
                self.refused = self.era == "handshake" and self._answered_error
                raise
            self.init_result = response
            self.discover_result = None
            self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if "tools" in (self.init_result or {}).get("capabilities", {}):
            await self._refresh_tools(timeout)
            if self.settings.warm_up:
                await self._warm_up(timeout)

    async def _discover(self, timeout: float) -> bool:
        """Ask `server/discover`: True when the server speaks 2026-07-28 (this run then does), False
        when it does not (`auto`: the handshake follows). `modern` raises instead."""
        self._probing = True
        self.modern = True  # the probe carries the 2026-07-28 envelope (`for_server`)
        try:
            discovered = await self._internal_request("server/discover", {}, timeout)
        except (PierError, TimeoutError) as exc:
            self.modern = False
            if self.era == "modern":
                raise
            if isinstance(exc, TimeoutError):
                self._probe_failed = True  # a server that ignores unknown requests: no probe next time
            log.info("the server does not answer server/discover; using the handshake", extra={"error": str(exc)})
            return False
        finally:
            self._probing = False
        if MODERN not in discovered.get("supportedVersions", []):
            self.modern = False
            if self.era == "modern":
                raise PierError("SERVER_ERROR", "the server does not speak 2026-07-28", {"discover": discovered})
            return False
        self.discover_result = discovered
        # What handshake-era callers are told at their initialize (until a run of the server that
        # speaks the handshake tells them itself: `Eras`).
        self.init_result = {
            "protocolVersion": HANDSHAKE_VERSIONS[-1],
            "capabilities": _without_extensions(discovered.get("capabilities") or {}),
            "serverInfo": (discovered.get("_meta") or {}).get(SERVER_INFO_KEY)
            or discovered.get("serverInfo")  # before the revision moved it into _meta (#3002)
            or {"name": "unknown", "version": ""},
            **({"instructions": discovered["instructions"]} if "instructions" in discovered else {}),
        }
        return True

    @property
    def server_tasks(self) -> bool:
        """The server runs tasks of its own (the 2026-07-28 tasks extension, in its server/discover)."""
        capabilities = (self.discover_result or {}).get("capabilities") if self.modern else None
        extensions = capabilities.get("extensions") if isinstance(capabilities, dict) else None
        return isinstance(extensions, dict) and TASKS_EXTENSION in extensions

    async def _warm_up(self, timeout: float) -> None:
        """Call a tool that cannot exist, once: every server refuses it (so nothing happens), and
        answering runs the server's whole call path before a user's first call needs it."""
        with contextlib.suppress(PierError, TimeoutError):
            await self._internal_request("tools/call", {"name": WARM_UP_TOOL, "arguments": {}}, timeout)

    def for_server(
        self, message: Message, client: ClientSession | None = None, log_level: str | None = None
    ) -> Message:
        """A request as this run of the server expects it: with the 2026-07-28 envelope (the
        caller's own when it sent one, else made from what the bridge knows of the caller), or
        without it for a handshake-era server."""
        meta = meta_of(message)
        if not self.modern:
            return strip_envelope(message) if any(key in meta for key in ENVELOPE_KEYS) else message
        if PROTOCOL_VERSION_KEY in meta:
            return message
        envelope: dict[str, Any] = {
            PROTOCOL_VERSION_KEY: MODERN,
            CLIENT_CAPABILITIES_KEY: client.capabilities if client is not None else {},
            CLIENT_INFO_KEY: client.client_info if client is not None and client.client_info else BRIDGE_INFO,
        }
        if log_level is not None and client is not None:
            envelope[LOG_LEVEL_KEY] = log_level
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        return {**message, "params": {**params, "_meta": {**meta, **envelope}}}

    async def _refresh_tools(self, timeout: float) -> None:
        tools: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            page = await self._internal_request("tools/list", params, timeout)
            tools.extend(page.get("tools", []))
            cursor = page.get("nextCursor")
            if not cursor:
                break
        self.tools = tools
        self.tools_by_name = {tool["name"]: tool for tool in tools}
        self.on_tools_changed()

    def _schedule_tools_refresh(self) -> None:
        if self._tools_task is not None and not self._tools_task.done():
            return
        self._tools_task = asyncio.create_task(self._refresh_tools_logged())

    async def _refresh_tools_logged(self) -> None:
        try:
            await self._refresh_tools(self.settings.start_timeout_s)
        except (PierError, TimeoutError) as exc:
            log.warning("could not refresh the tool list", extra={"error": str(exc)})

    async def _internal_request(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        request: Message = {"jsonrpc": "2.0", "id": 0, "method": method, "params": params}
        span = _stdio_span(request)
        pending, outgoing = self.mux.register(
            self.for_server(tracing.into_meta(request, span.context())), None, NO_SINK
        )
        try:
            await self._send(outgoing)
            response = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except BaseException as exc:
            self.mux.discard(pending)
            tracing.record_error(span, exc)
            span.end()
            raise
        self._answered_error = "error" in response
        tracing.record_answer(span, response)
        span.end()
        if "error" in response:
            error = response["error"]
            raise PierError("SERVER_ERROR", f"{method} failed: {error.get('message')}", {"error": error})
        result: dict[str, Any] = response["result"]
        return result

    # -- requests --------------------------------------------------------------------------

    async def begin(
        self,
        message: Message,
        client: ClientSession | None,
        sink: Sink,
        track_progress: bool = False,
        capabilities: dict[str, Any] | None = None,
        log_level: str | None = None,
    ) -> Pending:
        """Send a request to the server once a slot is free and the server is ready.

        The slot is held until the request's future resolves (answer, failure or cancel).
        `capabilities` and `log_level` say what the caller may be asked and which logs it wants. The
        request carries the trace context of the span that sends it (`params._meta.traceparent`), so a
        server that traces joins the caller's trace; its other `_meta` keys are the caller's.
        """
        if self._stopping:
            raise PierError("SHUTTING_DOWN", "the bridge is shutting down")
        span = _stdio_span(message)
        message = tracing.into_meta(message, span.context() or tracing.current())
        try:
            pending = await self._begin(message, client, sink, track_progress, capabilities, log_level)
        except BaseException as exc:
            tracing.record_error(span, exc)
            span.end()
            raise
        if span.recording:
            pending.future.add_done_callback(lambda future: _answered(span, future))
        return pending

    async def _begin(
        self, message: Message, client: ClientSession | None, sink: Sink, track_progress: bool,
        capabilities: dict[str, Any] | None, log_level: str | None,
    ) -> Pending:  # fmt: skip
        await self._acquire_slot()
        try:
            await self.wait_ready()
            pending, outgoing = self.mux.register(
                self.for_server(message, client, log_level), client, sink, track_progress, capabilities, log_level
            )
            try:
                await self._send(outgoing)
            except BaseException:
                self.mux.discard(pending)
                raise
        except BaseException:
            self._slots.release()
            raise
        self._active += 1
        self.metrics.in_flight.inc()
        pending.on_finish = self._release_slot
        # Also when its waiter is cancelled without an answer (the future then never finishes).
        pending.future.add_done_callback(lambda _: self._release_slot(pending))
        self.last_activity = time.time()
        return pending

    def notify_server(self, method: str, params: dict[str, Any]) -> None:
        """Send the server a request of the bridge's own without waiting for its answer (which is dropped)."""
        if not self.ready:
            return
        request = {"jsonrpc": "2.0", "id": 0, "method": method, "params": params}
        _pending, outgoing = self.mux.register(self.for_server(request), None, NO_SINK)
        self._post(outgoing)

    def _release_slot(self, pending: Pending) -> None:
        if pending.on_finish is None:
            return  # released already
        pending.on_finish = None
        self._slots.release()
        self._active -= 1
        self.metrics.in_flight.dec()
        self.last_activity = time.time()

    def check_capacity(self) -> None:
        """Refuse a new request when every slot is taken and the wait queue is full."""
        if self._slots.locked() and self._waiting >= self.settings.max_queued_calls:
            raise PierError(
                "CALL_QUEUE_FULL",
                "too many calls in flight for this session; retry later",
                {"max_concurrent_calls": self.settings.max_concurrent_calls, "queued": self._waiting},
            )

    async def _acquire_slot(self) -> None:
        self.check_capacity()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def wait_ready(self) -> None:
        """Wait (at most the start timeout) until the server is initialized.

        Raises at once, with the exit code and stderr tail, when the server has exited without
        ever becoming ready (even while this waits): a server that cannot start says so now,
        not after the start timeout.
        """
        if self._ready.is_set():
            return
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                while not self._ready.is_set():
                    self._raise_if_failed()
                    await self._changed.wait()
        except TimeoutError:
            raise PierError(
                "SERVER_UNAVAILABLE", "the server did not become ready in time", self._exit_details()
            ) from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _raise_if_failed(self) -> None:
        if self._gave_up.is_set():
            raise PierError("SERVER_UNAVAILABLE", "the server keeps failing to start", self._exit_details())
        if self.last_exit is not None and not self._ever_ready:
            raise PierError(
                "SERVER_UNAVAILABLE", f"the server failed to start: {self.last_exit.reason}", self._exit_details()
            )

    def _exit_details(self) -> dict[str, Any]:
        return self.last_exit.details() if self.last_exit else {}

    # -- the pipe --------------------------------------------------------------------------

    async def _send(self, message: Message) -> None:
        transport = self.transport
        if transport is None:
            raise PierError("SERVER_UNAVAILABLE", "the server is not running")
        try:
            await transport.send(dumps(message) + b"\n", self.settings.write_timeout_s)
        except TimeoutError:
            raise PierError(
                "UPSTREAM_TIMEOUT",
                "the server stopped reading its input",
                {"timeout_s": self.settings.write_timeout_s},
            ) from None
        except (ConnectionError, RuntimeError) as exc:
            raise PierError("SERVER_EXITED", f"could not write to the server: {exc}", self._exit_details()) from None

    def _post(self, message: Message) -> None:
        """Write a small control message without waiting (responses, cancellations)."""
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            transport.send_nowait(dumps(message) + b"\n")

    def _on_line(self, line: bytes) -> None:
        try:
            message = loads(line)
        except ValueError:
            self._skip(line, "not JSON")
            return
        problem = validate_message(message)
        if problem:
            self._skip(line, problem)
            return
        if too_deep(message):
            # It could never be written on to its caller: the caller hears why instead.
            self.metrics.invalid_lines.inc()
            log.error("server sent a message nested too deeply", extra={"max_depth": MAX_DEPTH})
            why = f"the server's response is nested more than {MAX_DEPTH} levels deep"
            self._refuse_response(message.get("id"), why, {"max_depth": MAX_DEPTH})
            return
        self.mux.server_message(message)

    def _skip(self, line: bytes, why: str) -> None:
        # Servers that print logs to stdout are common; they must not take the session down.
        self.metrics.invalid_lines.inc()
        log.warning(
            "skipped a line from the server",
            extra={"why": why, "line": line[:200].decode("utf-8", "replace")},
        )

    def _on_oversize(self, head: bytes, size: int) -> None:
        self.metrics.oversized.inc()
        limit = self.settings.max_message_bytes
        log.error("server sent a message over the size limit", extra={"bytes": size, "limit": limit})
        self._refuse_response(
            oversize_id(head), "the server's response exceeds the message size limit", {"bytes": size, "limit": limit}
        )

    def _refuse_response(self, request_id: object, why: str, details: dict[str, Any]) -> None:
        """A message from the server that cannot be passed on: fail the request it answers, if any."""
        pending = self.mux.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if pending is not None:
            pending.finish(gateway_error_response(pending.original_id, PierError("SERVER_ERROR", why, details)))


def _without_extensions(capabilities: dict[str, Any]) -> dict[str, Any]:
    """A 2026-07-28 server's capabilities as a handshake-era caller may see them (extensions are 2026's)."""
    return {k: v for k, v in capabilities.items() if k != "extensions"}


class Eras:
    """The server's runs by caller era: the one the bridge started (`primary`: the call API, 2026-07-28
    callers, and handshake-era callers of a server that speaks only one era), and, for a server that
    speaks 2026-07-28 on stdio but takes one era per connection, a second run initialized with the
    handshake for handshake-era callers, started when the first of them arrives."""

    def __init__(self, primary: Upstream, make_secondary: Callable[[], Upstream]) -> None:
        self.primary = primary
        self.secondary: Upstream | None = None
        self._make_secondary = make_secondary

    @property
    def all(self) -> list[Upstream]:
        return [self.primary] if self.secondary is None else [self.primary, self.secondary]

    def wants_secondary(self) -> bool:
        """Whether handshake-era callers need a run of their own: the first run speaks 2026-07-28, the
        server may speak the handshake too (not `modern`), and it has not refused it."""
        primary = self.primary
        if not primary.modern or primary.era == "modern":
            return False
        return self.secondary is None or not self.secondary.refused

    def start_secondary(self) -> None:
        """Start the handshake-era run now (a handshake-era caller just initialized), if it is wanted."""
        if self.wants_secondary() and self.secondary is None:
            self.secondary = self._make_secondary()
            self.secondary.start()
            log.info("starting a run of the server for handshake-era callers")

    async def for_handshake(self) -> Upstream:
        """The run that serves handshake-era callers: the second one once it is ready, or the first
        (translating) for a server that does not speak the handshake."""
        if not self.wants_secondary():
            return self.primary
        self.start_secondary()
        secondary = self.secondary
        assert secondary is not None
        try:
            await secondary.wait_ready()
        except PierError:
            if secondary.refused:
                log.info("the server refused the handshake: translating handshake-era callers onto 2026-07-28")
                return self.primary
            raise
        return secondary

    def handshake_now(self) -> Upstream:
        """Without waiting: the run handshake-era callers are on (for their notifications and answers)."""
        secondary = self.secondary
        return secondary if secondary is not None and not secondary.refused and self.wants_secondary() else self.primary

    async def stop(self) -> None:
        for upstream in reversed(self.all):
            await upstream.stop()
