"""The API's spans: one server span per call (gRPC or HTTP), its children (cache lookup,
single flight, admission, publish, reply wait), and the traceparent each envelope item
carries to the worker.

A caller's W3C trace context is honoured: the call's span is the child of the caller's
span (gRPC metadata or HTTP headers `traceparent` and `tracestate`). With tracing off
and a caller's context, the span is NO_SPAN but the caller's trace id still names the
call's log lines and its traceparent is handed on unchanged in the envelope.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from inferpool.tracing import context, export
from inferpool.tracing.context import INCOMING, LOG_TRACE, TRACEPARENT, TRACESTATE
from inferpool.tracing.export import NO_SPAN


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
    if export.tracer is None and not incoming:
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
    if export.tracer is None and not incoming:
        return NO_SPAN
    # The path is the client's text: bounded, as every attribute a client chooses.
    attributes = {"http.request.method": method, "url.path": path[:256]}
    return _server_span(method, attributes, incoming, ",".join(states))


@contextmanager
def _server_span(name: str, attributes: dict[str, str], incoming: str, tracestate: str) -> Iterator[Any]:
    tracer = export.tracer
    if tracer is None:
        handed_on = context.normalized(incoming)
        if not handed_on:
            yield NO_SPAN
            return
        t1 = LOG_TRACE.set(handed_on[3:35])  # 00-<trace id>-...
        t2 = INCOMING.set(handed_on)
        try:
            yield NO_SPAN
        finally:
            context.reset(INCOMING, t2)
            context.reset(LOG_TRACE, t1)
        return
    from opentelemetry.trace import SpanKind

    parent = context.extract(incoming, tracestate) if incoming else None
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        # The interceptor records the status code; a domain error is not a crash.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        token = LOG_TRACE.set(f"{span.get_span_context().trace_id:032x}")
        try:
            yield span
        finally:
            context.reset(LOG_TRACE, token)


def set_rpc_code(span: Any, code: str) -> None:
    """The RPC's final status on its server span (an error status unless OK)."""
    if span is NO_SPAN or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))


def set_http_status(span: Any, method: str, route: str, status: int) -> None:
    """The HTTP request's route (its span's name from now on; "" when no route serves
    the path, which then stays named by its method alone) and final status (a server
    error is an error status; a client's 4xx is not the server's fault)."""
    if span is NO_SPAN or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    if route:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))


def span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the current one, as a context manager; a no-op when off."""
    tracer = export.tracer
    if tracer is None:
        return NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


def annotate(key: str, value: Any) -> None:
    """Sets an attribute on the current span (no-op when off)."""
    if export.tracer is None:
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
    if export.tracer is None:
        return INCOMING.get()
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return context.format_context(ctx) if ctx.is_valid else ""
