"""Traces, the same way in every component: W3C trace context in and out, OpenTelemetry spans, OTLP export.

**Context.** Every entry point reads the caller's W3C trace context (`traceparent`, `tracestate`: HTTP
headers, MCP's `params._meta`, a job record, an MCPSession's annotation) with `from_headers` /
`from_meta` / `parse`; a malformed one is ignored (a new trace starts), never an error. What Pier sends
on carries the current context: HTTP headers (`headers()`), the stdio server's `params._meta`
(`into_meta`: the caller's other `_meta` keys kept), job records (`current()`).

**Spans.** `span(...)` (a context manager) and `begin(...)` (ended by hand: a call that outlives its
request) record OpenTelemetry spans named and attributed by the semantic conventions where they exist
(HTTP server and client, MCP, messaging); a `PierError` escaping a span is recorded on it with its code
(`error.type`). `mcp_span_name` and friends build the MCP ones.

**Off unless configured.** `start(service)` reads the standard `OTEL_*` variables: without an OTLP
endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), or with
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`, tracing stays off: the OpenTelemetry packages
are not even imported, a span is one shared do-nothing object, and only the caller's context passes
through (into logs and to the server) unchanged. On, the SDK's `TracerProvider` (its sampler from
`OTEL_TRACES_SAMPLER`, its resource from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`) hands ended
spans to `_Export`: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) drained by one thread through the
SDK's OTLP/HTTP exporter, so a slow or absent collector never delays a call: spans it cannot take are
dropped and counted (`pier_tracing_spans_total{outcome}`, `span_metrics`).

The provider is Pier's own, never the process-wide global one, so libraries in the same process (the
`mcp` SDK) record nothing through it.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

from pier.core.errors import ConfigError, PierError

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer
    from prometheus_client.registry import Collector

log = logging.getLogger("pier.core.tracing")

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
Kind = Literal["internal", "server", "client", "producer", "consumer"]

# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; a later version may append fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z0-9][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_MAX_TRACESTATE = 512  # W3C: vendors may drop a longer one
_MAX_DESCRIPTION = 200  # a status description is a hint, not a payload
_NAME_SAFE = re.compile(r"[A-Za-z0-9_.:/@+-]{1,64}")


# -- the context -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One position in a trace, as W3C Trace Context carries it."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: int = 1
    state: str = ""  # the `tracestate` header's value ("" for none)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def carrier(self) -> dict[str, str]:
        """`traceparent` (and `tracestate`) as headers or `_meta` keys."""
        return (
            {TRACEPARENT: self.traceparent, TRACESTATE: self.state} if self.state else {TRACEPARENT: self.traceparent}
        )


def parse(traceparent: object, tracestate: object = None) -> TraceContext | None:
    """The context a `traceparent` (and `tracestate`) names, or None when it is missing or malformed.

    As W3C Trace Context says: version `ff` and all-zero ids are invalid, version 00 has exactly four
    fields, a later version may have more; a `tracestate` is kept only beside a valid `traceparent`,
    and dropped whole when any member is malformed.
    """
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16), _tracestate(tracestate))


def _tracestate(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TRACESTATE:
        return ""
    members = [m.strip(" \t") for m in value.split(",") if m.strip(" \t")]
    if len(members) > 32 or not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return ""
    return ",".join(members)


def from_headers(headers: Mapping[str, str]) -> TraceContext | None:
    """The caller's context from HTTP headers (None: none, or malformed)."""
    traceparent = headers.get(TRACEPARENT)
    return parse(traceparent, headers.get(TRACESTATE)) if traceparent is not None else None


def from_meta(message: Any) -> TraceContext | None:
    """The context an MCP message carries in `params._meta` (None: none, or malformed)."""
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or TRACEPARENT not in meta:
        return None
    return parse(meta.get(TRACEPARENT), meta.get(TRACESTATE))


# -- process state -----------------------------------------------------------------------------------

# The caller's context while tracing is off: it passes through to logs and to the server.
_remote: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("pier_trace_remote", default=None)


class _State:
    def __init__(self) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        self.export: _Export | None = None
        self.users = 0
        self.lock = threading.Lock()
        # Totals over the life of the process (several starts and stops in tests): what the metric shows.
        self.totals: collections.Counter[str] = collections.Counter({"exported": 0, "dropped": 0, "failed": 0})


_state = _State()


class _Api:
    """The OpenTelemetry API, imported once, when tracing starts (never while it is off)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace

        self.trace = trace
        self.attach = context.attach
        self.detach = context.detach
        self.get_current = context.get_current
        self.Context = context.Context
        kinds = trace.SpanKind
        self.kinds = {"internal": kinds.INTERNAL, "server": kinds.SERVER, "client": kinds.CLIENT,
                      "producer": kinds.PRODUCER, "consumer": kinds.CONSUMER}  # fmt: skip


_api: _Api  # set by `_configure`


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return _state.tracer is not None


def endpoint_configured() -> bool:
    """Whether the `OTEL_*` variables ask for traces to be exported."""
    return _endpoint(os.environ) is not None


def _endpoint(env: Mapping[str, str]) -> str | None:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
    if "otlp" not in exporters:
        return None  # `none`, or exporters Pier does not ship (console, zipkin…)
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: a number is required") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: must not be negative")
    return value


def start(service_name: str) -> bool:
    """Start recording spans as `service_name` (unless `OTEL_SERVICE_NAME` names it) if the `OTEL_*`
    variables name an endpoint; whether tracing is on. Several components of one process (`pier up`)
    share one provider: each `start` is matched by a `stop`.

    ConfigError for a setting Pier cannot honour (an OTLP protocol other than HTTP/protobuf, a bad number).
    """
    env = os.environ  # the SDK's exporter reads its own variables there too
    with _state.lock:
        _state.users += 1
        if _state.tracer is not None or _endpoint(env) is None:
            return _state.tracer is not None
        try:
            _configure(service_name, env)
        except BaseException:
            _state.users -= 1
            raise
    log.info("tracing on: spans exported over OTLP/HTTP", extra={"service": service_name})
    return True


def _configure(service_name: str, env: Mapping[str, str]) -> None:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    if protocol not in ("", "http/protobuf"):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: Pier exports traces over OTLP/HTTP (http/protobuf) only; "
            "point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318 by default)"
        )
    queue = int(_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)) or 2048
    batch = min(int(_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)) or 512, queue)
    delay_s = _number(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider

    from pier.core import __version__

    # The component's name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES says otherwise.
    defaults = Resource.create({"service.name": service_name, "service.version": __version__})
    resource = defaults.merge(OTELResourceDetector().detect())
    # The exporter's own per-batch errors are summed up by `_Export` (counted, logged now and then).
    logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
    export = _Export(OTLPSpanExporter(), queue, batch, delay_s)
    global _api  # noqa: PLW0603 - the API's names, looked up once rather than imported per span
    _api = _Api()
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(_processor(export))
    _state.provider, _state.export = provider, export
    _state.tracer = provider.get_tracer("pier", __version__)


def stop(timeout_s: float = 5.0) -> None:
    """The matching end of a `start`: the last one exports what is queued (within `timeout_s`, so an
    absent collector cannot hold a shutdown) and turns tracing off. Blocking: call it off the event loop."""
    with _state.lock:
        _state.users = max(_state.users - 1, 0)
        if _state.users or _state.provider is None:
            return
        provider, export = _state.provider, _state.export
        _state.provider = _state.tracer = _state.export = None
    if export is not None:
        export.force_flush(int(timeout_s * 1000))
    provider.shutdown()


def flush(timeout_s: float = 5.0) -> bool:
    """Export every ended span now (tests, shutdown); False if the collector did not take them in time.
    Blocking: call it off the event loop."""
    export = _state.export
    return export.force_flush(int(timeout_s * 1000)) if export is not None else True


def span_counts() -> dict[str, int]:
    """Spans exported, dropped (the queue was full, or tracing stopped) and failed (the collector refused
    them or could not be reached), since the process started."""
    return dict(_state.totals)


def span_metrics() -> Collector:
    """`pier_tracing_spans_total{outcome}` for a component's `/metrics` registry (zeros while tracing is off).

    Made here, on demand: the bridge, which never registers it, does without prometheus_client.
    """
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector

    class SpanMetrics(Collector):
        def collect(self) -> Iterator[CounterMetricFamily]:
            family = CounterMetricFamily(
                "pier_tracing_spans",
                "spans exported, dropped (queue full) or failed (collector unreachable)",
                labels=["outcome"],
            )
            for outcome, value in sorted(span_counts().items()):
                family.add_metric([outcome], value)
            yield family

    return SpanMetrics()


# -- the exporter thread -----------------------------------------------------------------------------


def _processor(export: _Export) -> SpanProcessor:
    """`export` as the SDK's span processor (a class made here: the SDK is not imported at load)."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Processor(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            export.on_end(span)

        def shutdown(self) -> None:
            export.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return export.force_flush(timeout_millis)

    return Processor()


class _Export:
    """A span processor: ended spans into a bounded queue, exported in batches by one thread.

    The event loop only appends to a deque under a lock (never blocked by the network); the thread
    waits up to the schedule delay or for a full batch, then hands batches to the SDK's exporter, whose
    own timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`) bounds each attempt. A full queue drops the new span.
    """

    _LOG_EVERY_S = 60.0

    def __init__(self, exporter: SpanExporter, max_queue: int, max_batch: int, delay_s: float) -> None:
        self.exporter = exporter
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.delay_s = delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._cond = threading.Condition(threading.Lock())  # not reentrant: cheaper for every span
        self._exporting = 0  # spans taken from the queue, not yet exported
        self._stopping = False
        self._flushing = False
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._run, name="pier-otlp-export", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        with self._cond:
            if self._stopping or len(self._queue) >= self.max_queue:
                _state.totals["dropped"] += 1
                return
            self._queue.append(span)
            if len(self._queue) >= self.max_batch:
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.delay_s
                while not (self._stopping or self._flushing or len(self._queue) >= self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue:
                    if self._flushing:
                        self._flushing = False
                        self._cond.notify_all()
                    if self._stopping:
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._exporting = len(batch)
            ok = self._export(batch)
            with self._cond:
                _state.totals["exported" if ok else "failed"] += len(batch)
                self._exporting = 0
                self._cond.notify_all()

    def _export(self, batch: list[ReadableSpan]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
        except Exception:  # an exporter's bug must not end the thread
            ok = False
        if not ok and time.monotonic() - self._last_log >= self._LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.warning("spans could not be exported (collector unreachable or refusing)", extra=span_counts())
        return ok

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            while self._queue or self._exporting:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            _state.totals["dropped"] += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self.exporter.shutdown()  # interrupts an export still retrying
        self._thread.join(1.0)


# -- spans -------------------------------------------------------------------------------------------


class Span:
    """A span being recorded; `NULL` (this class itself) when tracing is off or nothing is recorded."""

    __slots__ = ("otel",)
    recording = False

    def __init__(self, otel: OtelSpan | None = None) -> None:
        self.otel = otel

    def set(self, key: str, value: str | int | float | bool) -> None:
        """An attribute (never a secret: tokens, keys and users' secrets stay out of spans)."""

    def update(self, attributes: Mapping[str, str | int | float | bool]) -> None:
        """Several attributes."""

    def event(self, name: str, attributes: Mapping[str, str | int | float | bool] | None = None) -> None:
        """Something that happened during the span (a retry, a claim)."""

    def fail(self, code: str, message: str = "") -> None:
        """The span's operation failed: `error.type` (Pier's error code, or a protocol's), status ERROR."""

    def end(self) -> None:
        """End it (spans from `begin`; `span(...)` ends its own)."""

    def context(self) -> TraceContext | None:
        """Where it stands in its trace (to hand on), or None."""
        return None


NULL: Final = Span()


class _Recorded(Span):
    __slots__ = ("_ended",)
    recording = True
    otel: OtelSpan

    def __init__(self, otel: OtelSpan) -> None:
        super().__init__(otel)
        self._ended = False

    def set(self, key: str, value: str | int | float | bool) -> None:
        self.otel.set_attribute(key, value)

    def update(self, attributes: Mapping[str, str | int | float | bool]) -> None:
        self.otel.set_attributes(attributes)

    def event(self, name: str, attributes: Mapping[str, str | int | float | bool] | None = None) -> None:
        self.otel.add_event(name, attributes or {})

    def fail(self, code: str, message: str = "") -> None:
        self.otel.set_attribute("error.type", code)
        self.otel.set_status(_api.trace.StatusCode.ERROR, message[:_MAX_DESCRIPTION] or None)

    def end(self) -> None:
        if not self._ended:  # once, whichever path ends it
            self._ended = True
            self.otel.end()

    def context(self) -> TraceContext | None:
        return _of(self.otel)


def _of(otel: OtelSpan) -> TraceContext | None:
    context = otel.get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else ""
    return TraceContext(f"{context.trace_id:032x}", f"{context.span_id:016x}", int(context.trace_flags), state)


class _Root:
    """`parent=ROOT`: a new trace, whatever is current (a background task's own work)."""


ROOT: Final = _Root()
Parent = TraceContext | _Root | None  # None: the current span (or the caller's context)
Attributes = Mapping[str, str | int | float | bool]


def _otel_parent(parent: Parent) -> OtelContext | None:
    """The OpenTelemetry context to start a span in (None: the current one)."""
    if parent is None:
        return None
    trace = _api.trace
    if isinstance(parent, _Root):
        return _api.Context()
    remote = trace.SpanContext(
        int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(parent.flags),
        trace_state=trace.TraceState.from_header([parent.state]) if parent.state else None,
    )  # fmt: skip
    context: OtelContext = trace.set_span_in_context(trace.NonRecordingSpan(remote), _api.Context())
    return context


def _kind(kind: Kind) -> Any:
    return _api.kinds[kind]


def _links(links: Iterable[TraceContext | None]) -> list[Any]:
    trace = _api.trace
    return [
        trace.Link(
            trace.SpanContext(
                int(c.trace_id, 16), int(c.span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(c.flags)
            )
        )
        for c in links
        if c is not None
    ]


def begin(
    name: str, kind: Kind = "internal", attributes: Attributes | None = None, parent: Parent = None,
    links: Iterable[TraceContext | None] = (),
) -> Span:  # fmt: skip
    """A span that is not made current and ends when `end` is called (work that outlives its caller)."""
    tracer = _state.tracer
    if tracer is None:
        return NULL
    otel = tracer.start_span(
        name, context=_otel_parent(parent), kind=_kind(kind), attributes=attributes, links=_links(links),
        record_exception=False, set_status_on_exception=False,
    )  # fmt: skip
    return _Recorded(otel)


class _Scope:
    """`with span(...) as s:` — the span current inside, its failure recorded, ended on the way out."""

    __slots__ = ("_owned", "_span", "_token")

    def __init__(self, span: Span, owned: bool = True) -> None:
        self._span = span
        self._owned = owned
        self._token: object = None

    def __enter__(self) -> Span:
        assert self._span.otel is not None
        self._token = _api.attach(_api.trace.set_span_in_context(self._span.otel))
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is not None and self._owned:
            record_error(self._span, exc)
        _api.detach(self._token)  # type: ignore[arg-type]  # the token `attach` returned
        if self._owned:
            self._span.end()


class _NullScope:
    """Tracing off: nothing recorded; a caller's context (`parent`) is current inside."""

    __slots__ = ("_parent", "_token")

    def __init__(self, parent: TraceContext | None) -> None:
        self._parent = parent
        self._token: contextvars.Token[TraceContext | None] | None = None

    def __enter__(self) -> Span:
        if self._parent is not None:
            self._token = _remote.set(self._parent)
        return NULL

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _remote.reset(self._token)
            self._token = None


_NOTHING: Final = _NullScope(None)
Scope = _Scope | _NullScope


def nothing() -> Scope:
    """A scope that records nothing (a route not worth a span)."""
    return _NOTHING


def span(
    name: str, kind: Kind = "internal", attributes: Attributes | None = None, parent: Parent = None,
    links: Iterable[TraceContext | None] = (),
) -> Scope:  # fmt: skip
    """A span around a block, current inside it (its children's parent, what `headers()` hands on).

    `parent`: the caller's context at an entry point (None: the current span; `ROOT`: a new trace).
    An exception leaving the block is recorded (a `PierError` by its code) and re-raised.
    """
    if _state.tracer is None:
        return _NullScope(parent) if isinstance(parent, TraceContext) else _NOTHING
    return _Scope(begin(name, kind, attributes, parent, links))


def use(current: Span) -> Scope:
    """Make a `begin` span current for a block (it is not ended there)."""
    if current.otel is None:
        return _NOTHING
    return _Scope(current, owned=False)


def record_error(target: Span, exc: BaseException) -> None:
    """An exception that ended the span's work: a PierError by its code, another by its type."""
    if isinstance(exc, PierError):
        target.fail(exc.code, exc.message)
        target.set("pier.error.code", exc.code)
    elif not isinstance(exc, GeneratorExit) and type(exc).__name__ != "CancelledError":
        target.fail(type(exc).__qualname__, str(exc))


def detached() -> contextvars.Context:
    """A fresh context carrying nothing but the current trace position (for tasks that must not inherit
    the rest, such as a request's log context)."""
    fresh = contextvars.Context()
    if _state.tracer is not None:
        fresh.run(_api.attach, _api.get_current())
    else:
        fresh.run(_remote.set, _remote.get())
    return fresh


def untraced() -> contextvars.Context:
    """A copy of the current context without its trace (a long-lived task whose later work belongs to no
    request: a server's supervisor)."""
    copied = contextvars.copy_context()
    copied.run(_remote.set, None)
    if _state.tracer is not None:
        copied.run(_api.attach, _api.Context())
    return copied


def task_context(current: Span) -> contextvars.Context | None:
    """A copy of the current context in which `current` (a `begin` span) is the current span: for a task
    that works under it (None: nothing to carry, the task copies the current context as usual)."""
    if current.otel is None:
        return None
    copied = contextvars.copy_context()
    copied.run(_api.attach, _api.trace.set_span_in_context(current.otel))
    return copied


# -- what goes out -----------------------------------------------------------------------------------


def current() -> TraceContext | None:
    """The current position: the current span's (tracing on), else the caller's context (off)."""
    if _state.tracer is None:
        return _remote.get()
    return _of(_api.trace.get_current_span())


def headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) for an outgoing HTTP request, or nothing."""
    context = current()
    return context.carrier() if context is not None else {}


def into_meta(message: dict[str, Any], context: TraceContext | None) -> dict[str, Any]:
    """`message` (a JSON-RPC request) with `context` in its `params._meta` (a copy; the caller's other
    `_meta` keys kept), or `message` itself when there is no context to carry."""
    if context is None:
        return message
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = {k: v for k, v in meta.items() if k not in (TRACEPARENT, TRACESTATE)} if isinstance(meta, dict) else {}
    return {**message, "params": {**params, "_meta": {**meta, **context.carrier()}}}


def log_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) for a log line written now, or None outside any trace."""
    context = current()
    return (context.trace_id, context.span_id) if context is not None else None


# -- semantic conventions ----------------------------------------------------------------------------


def mcp_target(message: Mapping[str, Any]) -> str | None:
    """The low-cardinality target of an MCP request (a tool's or prompt's name), if it has one."""
    params = message.get("params")
    if message.get("method") not in ("tools/call", "prompts/get") or not isinstance(params, dict):
        return None
    name = params.get("name")
    return name if isinstance(name, str) and _NAME_SAFE.fullmatch(name) else None


def mcp_span_name(message: Mapping[str, Any]) -> str:
    """`{mcp.method.name} {target}` (the MCP conventions' span name)."""
    return span_name(str(message.get("method"))[:64], mcp_target(message))


def span_name(operation: str, target: object) -> str:
    """`{operation} {target}`, the target left out unless it is a short name (span names stay few)."""
    return f"{operation} {target}" if isinstance(target, str) and _NAME_SAFE.fullmatch(target) else operation


def current_span() -> Span:
    """The current span, to note what its work found out (never to end it); NULL when none is recorded."""
    if _state.tracer is None:
        return NULL
    otel = _api.trace.get_current_span()
    return _Recorded(otel) if otel.is_recording() else NULL


def add_event(name: str, attributes: Attributes | None = None) -> None:
    """An event on the current span (a retry, a claim), if one is being recorded."""
    if _state.tracer is not None:
        _api.trace.get_current_span().add_event(name, attributes or {})


def mcp_attributes(message: Mapping[str, Any], transport: Literal["pipe", "tcp"] = "tcp") -> dict[str, Any]:
    """The MCP conventions' attributes of a request (never its arguments: they may hold anything)."""
    method = str(message.get("method"))[:64]
    attributes: dict[str, Any] = {"mcp.method.name": method, "network.transport": transport}
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, bool):
        attributes["jsonrpc.request.id"] = str(request_id)[:64]
    target = mcp_target(message)
    if method == "tools/call":
        attributes["gen_ai.operation.name"] = "execute_tool"
        if target:
            attributes["gen_ai.tool.name"] = target
    elif method == "prompts/get" and target:
        attributes["gen_ai.prompt.name"] = target
    return attributes


def mcp_server_span(message: Mapping[str, Any], attributes: Attributes | None = None) -> Scope:
    """The MCP server span of a request a caller sent: its parent the caller's `params._meta.traceparent`
    when it sends one (the current span, its transport's, linked), else the current span (MCP conventions)."""
    parent = from_meta(message)
    if _state.tracer is None:
        return _NullScope(parent) if parent is not None else _NOTHING
    links = [current()] if parent is not None else []
    every = {**mcp_attributes(message), **(attributes or {})}
    return span(mcp_span_name(message), "server", every, parent=parent, links=links)


def record_answer(target: Span, answer: Mapping[str, Any]) -> None:
    """A JSON-RPC answer's outcome on an MCP span: its error (Pier's code from `data.code` when the
    gateway made it, else the JSON-RPC code) or a tool's own error result (`tool_error`)."""
    if not target.recording:
        return
    error = answer.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        data = error.get("data")
        pier_code = data.get("code") if isinstance(data, dict) and isinstance(data.get("code"), str) else None
        target.set("rpc.response.status_code", str(code))
        target.fail(pier_code or str(code), str(error.get("message") or ""))
        return
    result = answer.get("result")
    if isinstance(result, dict) and result.get("isError") is True:
        target.fail("tool_error")


def http_client_attributes(method: str, url: str, template: str | None = None) -> dict[str, Any]:
    """HTTP client span attributes; the URL without credentials or query (they may hold secrets)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    attributes: dict[str, Any] = {"http.request.method": method, "url.scheme": parts.scheme}
    if parts.hostname:
        attributes["server.address"] = parts.hostname
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    if port:
        attributes["server.port"] = port
    if template is not None:
        attributes["url.template"] = template
        attributes["url.full"] = (
            f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        )
    return attributes


def http_client_name(method: str, template: str | None = None) -> str:
    """`{method} {url.template}`, or the method alone (the HTTP conventions' client span name)."""
    return f"{method} {template}" if template else method
