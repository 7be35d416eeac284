"""Distributed tracing with OpenTelemetry, off unless an OTLP endpoint is configured.

`setup(service)` switches it on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (OpenTelemetry's own convention), with
the SDK's batch span processor and OTLP/gRPC exporter; sampling (`OTEL_TRACES_SAMPLER`,
`OTEL_TRACES_SAMPLER_ARG`), `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are the
SDK's, read by it. Off, nothing of the SDK is imported or built: every helper here
returns a shared no-op at the cost of one global read.

The API and the worker meet through the envelope: each item carries the W3C
`traceparent` of the request that queued it (`traceparent()`), so the worker's spans
join the caller's trace. A batch serves many requests, so its span is linked to all
of them (and parented to the first, so a lone request reads as one tree).

Log lines carry the trace id of the request they concern (`current_trace_id()`, read
by inferpool.logs), tracing on or off: off, it is the caller's own trace id when it
sent a `traceparent`, so logs still correlate with the caller's traces.

The provider is this module's own, not OpenTelemetry's global one, so a process (a
test session) may set tracing up and shut it down more than once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger(__name__)

API_SERVICE = "inferpool-api"
WORKER_SERVICE = "inferpool-worker"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# version-traceid-parentid-flags; version ff is invalid, all-zero ids are invalid.
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")

# The trace id log lines of the current request carry ("" outside one).
_LOG_TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("inferpool_trace_id", default="")
# The caller's traceparent while tracing is off: handed on unchanged in the envelope.
_INCOMING: contextvars.ContextVar[str] = contextvars.ContextVar("inferpool_traceparent", default="")

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_lock = threading.Lock()


class _NoSpan:
    """What every helper hands out with tracing off: accepts and forgets."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()


def enabled() -> bool:
    return _tracer is not None


def endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The OTLP endpoint traces go to, "" when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def setup(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Switches tracing on for this process when the environment names an OTLP
    endpoint; `service` is the default service.name. Returns whether it is on.
    `environ` (tests) names the endpoint; the SDK reads the rest from os.environ."""
    global _tracer, _provider
    if not endpoint(environ):
        return False
    env = os.environ if environ is None else environ
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from inferpool.settings import SettingsError

        raise SettingsError(
            f"OTEL_EXPORTER_OTLP_*ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'inferpool[tracing]', or unset it"
        ) from exc

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol != "grpc":
        log.warning("OTLP protocol %r is not supported here; exporting over grpc", protocol[:32])
    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the default.
    resource = Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the SDK's default is parent-based
    # always-on, so a caller's "not sampled" is obeyed.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint(environ))))
    with _lock:
        old = _provider
        _provider = provider
        _tracer = provider.get_tracer("inferpool")
    if old is not None:
        old.shutdown()
    log.info(
        "tracing on: %s to %s",
        resource.attributes.get("service.name"),
        endpoint(environ)[:200],
    )
    return True


def shutdown() -> None:
    """Exports what is buffered and switches tracing off (idempotent)."""
    global _tracer, _provider
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.force_flush(5000)
        provider.shutdown()


def force_flush(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


# -- log correlation


def current_trace_id() -> str:
    """The trace id of the request this code runs for ("" if none is known)."""
    return _LOG_TRACE.get()


def exemplar() -> dict[str, str] | None:
    """A Prometheus exemplar naming the current request's trace (None outside one), so
    a latency bucket links to a trace; exposed in the OpenMetrics format."""
    trace_id = _LOG_TRACE.get()
    return {"trace_id": trace_id} if trace_id else None


def bind_trace_id(trace_id: str) -> contextvars.Token[str]:
    return _LOG_TRACE.set(trace_id)


def unbind_trace_id(token: contextvars.Token[str]) -> None:
    _LOG_TRACE.reset(token)


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, span id, flags) of a valid W3C traceparent, else None."""
    m = _TRACEPARENT_RE.match(value.strip().lower()) if len(value) <= 512 else None
    if m is None or m.group(1) == "ff" or m.group(2) == "0" * 32 or m.group(3) == "0" * 16:
        return None
    if m.group(1) == "00" and m.group(5):
        return None  # version 00 has exactly four fields
    return m.group(2), m.group(3), int(m.group(4), 16)


def trace_id_of(traceparent: str) -> str:
    parsed = parse_traceparent(traceparent) if traceparent else None
    return parsed[0] if parsed else ""


def _format(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


# -- the API side


def _metadata_value(metadata: Sequence[tuple[str, Any]] | None, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


def server_span(method: str, metadata: Sequence[tuple[str, Any]] | None) -> Any:
    """The span of one RPC (`/package.Service/Method`), as a context manager: the child
    of the caller's span when its metadata carries a traceparent (and its tracestate);
    binds the trace id for log lines. Off, and with no trace context from the caller:
    NO_SPAN."""
    incoming = _metadata_value(metadata, TRACEPARENT)
    if _tracer is None and not incoming:
        return NO_SPAN
    service, _, name = method.lstrip("/").rpartition("/")
    return _server_span(
        f"{service}/{name}",
        {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        incoming,
        _metadata_value(metadata, TRACESTATE) if incoming else "",
    )


def http_server_span(method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Any:
    """The span of one HTTP request (ASGI `headers`), as server_span() is of an RPC:
    the child of the caller's span when it sent W3C `traceparent` (and `tracestate`)
    headers. Named by its method until set_http_status() knows its route."""
    incoming = ""
    states: list[str] = []
    for key, value in headers:
        if key == b"traceparent":
            incoming = value.decode("latin-1")
        elif key == b"tracestate":
            states.append(value.decode("latin-1"))  # several headers make one list (W3C)
    if _tracer is None and not incoming:
        return NO_SPAN
    # The path is the client's text: bounded, as every attribute a client chooses.
    attributes = {"http.request.method": method, "url.path": path[:256]}
    return _server_span(method, attributes, incoming, ",".join(states))


@contextmanager
def _server_span(name: str, attributes: dict[str, str], incoming: str, tracestate: str) -> Iterator[Any]:
    tracer = _tracer
    if tracer is None:
        parsed = parse_traceparent(incoming)
        if parsed is None:
            yield NO_SPAN
            return
        t1 = _LOG_TRACE.set(parsed[0])
        t2 = _INCOMING.set(f"00-{parsed[0]}-{parsed[1]}-{parsed[2] & 0xFF:02x}")
        try:
            yield NO_SPAN
        finally:
            _reset(_INCOMING, t2)
            _reset(_LOG_TRACE, t1)
        return
    from opentelemetry.trace import SpanKind

    parent = _extract(incoming, tracestate) if incoming else None
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        # The interceptor records the status code; a domain error is not a crash.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        token = _LOG_TRACE.set(f"{span.get_span_context().trace_id:032x}")
        try:
            yield span
        finally:
            _reset(_LOG_TRACE, token)


def _reset(var: contextvars.ContextVar[str], token: contextvars.Token[str]) -> None:
    # A response stream closed from another task than the one it ran in (grpc
    # cleaning up after a vanished client) ends its span there: nothing to restore.
    with contextlib.suppress(ValueError):
        var.reset(token)


def set_rpc_code(span: Any, code: str) -> None:
    """The RPC's final status on its server span (an error status unless OK)."""
    if span is NO_SPAN or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))


def set_http_status(span: Any, method: str, route: str, status: int) -> None:
    """The HTTP request's route (its span's name from now on) and final status (a
    server error is an error status; a client's 4xx is not the server's fault)."""
    if span is NO_SPAN or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))


def span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the current one, as a context manager; a no-op when off."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


def annotate(key: str, value: Any) -> None:
    """Sets an attribute on the current span (no-op when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute(key, value)


def published(span: Any, envelope: Any) -> None:
    """The publish span's envelope: its items and size on the wire."""
    if span is NO_SPAN:
        return
    span.set_attribute("inferpool.envelope.items", int(getattr(envelope, "items", 0)))
    span.set_attribute("inferpool.envelope.bytes", int(getattr(envelope, "nbytes", 0)))


def traceparent() -> str:
    """The traceparent an envelope item carries: the current span's, or with tracing
    off the caller's own ("" when it sent none)."""
    if _tracer is None:
        return _INCOMING.get()
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return _format(ctx) if ctx.is_valid else ""


# -- the worker side: spans started from traceparents, in threads with no current span


def _extract(traceparent: str, tracestate: str = "") -> Context | None:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: traceparent, TRACESTATE: tracestate} if tracestate else {TRACEPARENT: traceparent}
    ctx = TraceContextTextMapPropagator().extract(carrier)
    from opentelemetry import trace

    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _span_context(traceparent: str) -> SpanContext | None:
    ctx = _extract(traceparent)
    if ctx is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span(ctx).get_span_context()


class BatchTrace:
    """The spans of one worker batch: the batch span (parented to the first item's
    request, linked to every item's), its children, and each item's queue wait."""

    def __init__(self, traceparents: Sequence[str], attributes: Mapping[str, Any], started_ns: int) -> None:
        tracer = _tracer
        assert tracer is not None
        from opentelemetry.trace import Link

        self._tracer = tracer
        self.contexts = [_span_context(tp) for tp in traceparents]
        links = [Link(c) for c in self.contexts if c is not None]
        parent = next((_extract(tp) for tp in traceparents if tp), None)
        self.span: Span = tracer.start_span(
            "worker.batch", context=parent, attributes=dict(attributes), links=links, start_time=started_ns
        )
        first = self.contexts[0] if self.contexts else None
        self.token = _LOG_TRACE.set(f"{first.trace_id:032x}" if first is not None else "")

    def queue_waits(self, traceparents: Sequence[str], enqueued_ns: Sequence[int], started_ns: int) -> None:
        """One queue-wait span per item, from its publish to this batch, linked to it."""
        from opentelemetry.trace import Link

        link = [Link(self.span.get_span_context())]
        for tp, t0 in zip(traceparents, enqueued_ns, strict=True):
            parent = _extract(tp)
            if parent is None:
                continue
            s = self._tracer.start_span(
                "worker.queue_wait", context=parent, links=link, start_time=min(t0, started_ns)
            )
            s.end(end_time=started_ns)

    @contextmanager
    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        from opentelemetry import trace

        ctx = trace.set_span_in_context(self.span)
        s = self._tracer.start_span(name, context=ctx, attributes=attributes)
        try:
            yield s
        finally:
            s.end()

    def end(self) -> None:
        _LOG_TRACE.reset(self.token)
        self.span.end()


# The batch the batcher (or results) thread is working on, for batch_child().
_BATCH: contextvars.ContextVar[BatchTrace | None] = contextvars.ContextVar("inferpool_batch", default=None)


@contextmanager
def _batch_scope(
    traceparents: Sequence[str], enqueued_ns: Sequence[int], attributes: Mapping[str, Any], started_ns: int
) -> Iterator[None]:
    trace = BatchTrace(traceparents, attributes, started_ns)
    trace.queue_waits(traceparents, enqueued_ns, started_ns)
    token = _BATCH.set(trace)
    try:
        yield
    finally:
        _BATCH.reset(token)
        trace.end()


@contextmanager
def _bound(trace_id: str) -> Iterator[None]:
    token = _LOG_TRACE.set(trace_id)
    try:
        yield
    finally:
        _LOG_TRACE.reset(token)


def batch_scope(live: Sequence[Any], attributes: Callable[[], Mapping[str, Any]], started_ns: int) -> Any:
    """The span of one interactive batch (`live`: the batcher's Pending items, each
    with `.item.traceparent` and `.ticket.enqueued_unix_ns`), current for
    batch_child() while it runs; the items' queue waits end at `started_ns`. A no-op
    when off or when no item carries a trace context."""
    if _tracer is None:
        # Off, log lines still name the first request's trace when its caller sent one.
        first = live[0].item.traceparent if live else ""
        return _bound(trace_id_of(first)) if first else NO_SPAN
    traceparents = [p.item.traceparent for p in live]
    if not any(traceparents):
        return NO_SPAN
    enqueued = [p.ticket.enqueued_unix_ns for p in live]
    return _batch_scope(traceparents, enqueued, attributes(), started_ns)


def batch_child(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the current batch (the model call, the cache and reply writes)."""
    if _tracer is None:
        return NO_SPAN
    trace = _BATCH.get()
    return NO_SPAN if trace is None else trace.child(name, attributes)


def dropped(traceparent: str, enqueued_ns: int, reason: str, now_ns: int) -> None:
    """An item the worker dropped unseen: its queue wait, ending in a `dropped` event."""
    tracer = _tracer
    if tracer is None or not traceparent:
        return
    parent = _extract(traceparent)
    if parent is None:
        return
    s = tracer.start_span("worker.queue_wait", context=parent, start_time=min(enqueued_ns, now_ns))
    s.add_event("dropped", {"reason": reason}, timestamp=now_ns)
    s.end(end_time=now_ns)


@contextmanager
def linked_span(
    name: str,
    traceparent: str,
    attributes: Mapping[str, Any] | None = None,
    start_ns: int | None = None,
) -> Iterator[Any]:
    """A span in the trace `traceparent` names, made current (a bulk chunk's); a no-op
    when off or without one."""
    tracer = _tracer
    parent = _extract(traceparent) if tracer is not None and traceparent else None
    if tracer is None or parent is None:
        yield NO_SPAN
        return
    s = tracer.start_span(name, context=parent, attributes=attributes, start_time=start_ns)
    token = _LOG_TRACE.set(f"{s.get_span_context().trace_id:032x}")
    try:
        yield s
    finally:
        _LOG_TRACE.reset(token)
        s.end()


def start_span(
    name: str, traceparent: str, attributes: Mapping[str, Any] | None = None, start_ns: int | None = None
) -> Any:
    """A span in the trace `traceparent` names, ended by the caller (`end_span`); NO_SPAN when off."""
    tracer = _tracer
    parent = _extract(traceparent) if tracer is not None and traceparent else None
    if tracer is None or parent is None:
        return NO_SPAN
    return tracer.start_span(name, context=parent, attributes=attributes, start_time=start_ns)


def child_traceparent(span: Any) -> str:
    """The traceparent of `span` ("" for NO_SPAN)."""
    if span is NO_SPAN:
        return ""
    return _format(span.get_span_context())


def end_span(span: Any, end_ns: int | None = None) -> None:
    if span is not NO_SPAN:
        span.end(end_time=end_ns)


# -- bulk chunks: a span per chunk in its job's trace


def start_chunk(envelope: Any, chunk_id: str, items: int, deliveries: Callable[[str], int]) -> Any:
    """The span of one bulk chunk taken by this worker (ended by end_chunk), from its
    publish: its queue wait is a child span, and a redelivery (`deliveries(chunk_id)`
    counts the takes) an event. NO_SPAN when off or the chunk carries no trace context."""
    tracer = _tracer
    traceparent = envelope.chunk.traceparent if envelope.HasField("chunk") else ""
    parent = _extract(traceparent) if tracer is not None and traceparent else None
    if tracer is None or parent is None:
        return NO_SPAN
    import time

    now_ns = time.time_ns()
    enqueued_ns = min(envelope.enqueued_unix_ns or now_ns, now_ns)
    s = tracer.start_span(
        "worker.chunk",
        context=parent,
        attributes={
            "inferpool.job_id": envelope.job_id,
            "inferpool.chunk": chunk_id,
            "inferpool.chunk.items": items,
            "inferpool.model": envelope.model,
            "inferpool.model.version": envelope.model_version,
        },
        start_time=enqueued_ns,
    )
    from opentelemetry import trace

    in_chunk = trace.set_span_in_context(s)
    wait = tracer.start_span("worker.queue_wait", context=in_chunk, start_time=enqueued_ns)
    wait.end(end_time=now_ns)
    try:
        attempt = deliveries(chunk_id)
    except Exception as exc:  # tracing never fails a chunk
        log.debug("could not count the deliveries of chunk %s: %r", chunk_id, exc)
        attempt = 1
    s.set_attribute("inferpool.chunk.delivery", attempt)
    if attempt > 1:
        s.add_event("redelivered", {"inferpool.chunk.delivery": attempt}, timestamp=now_ns)
    return s


def end_chunk(span: Any, unrecorded: int) -> None:
    if span is NO_SPAN:
        return
    if unrecorded:
        span.add_event("requeued", {"inferpool.chunk.unrecorded": unrecorded})
    span.end()


def record_spans(
    name: str, traceparents: Iterator[str], start_ns: int, attributes: Mapping[str, Any] | None = None
) -> None:
    """A span `name` from start_ns to now under each distinct traceparent (a bulk batch's
    compute or result write, once per chunk it served). `traceparents` is only read
    when tracing is on."""
    tracer = _tracer
    if tracer is None:
        return
    import time

    end_ns = time.time_ns()
    for tp in dict.fromkeys(traceparents):
        parent = _extract(tp) if tp else None
        if parent is not None:
            start = min(start_ns, end_ns)
            s = tracer.start_span(name, context=parent, attributes=attributes, start_time=start)
            s.end(end_time=end_ns)
