"""W3C trace context and the trace id log lines carry.

A request's trace context crosses two boundaries: from its caller (gRPC metadata or
HTTP headers: `traceparent`, `tracestate`) into the API, and from the API to the
worker inside the envelope (each item's `traceparent`). This module parses and builds
those strings and turns them into OpenTelemetry contexts (only when tracing is on).

Log lines carry the trace id of the request they concern (`current_trace_id()`, read
by inferpool.logs), tracing on or off: off, it is the caller's own trace id when it
sent a `traceparent`, so logs still correlate with the caller's traces.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanContext

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# version-traceid-parentid-flags; version ff is invalid, all-zero ids are invalid.
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")

# The trace id log lines of the current request carry ("" outside one).
LOG_TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("inferpool_trace_id", default="")
# The caller's traceparent while tracing is off: handed on unchanged in the envelope.
INCOMING: contextvars.ContextVar[str] = contextvars.ContextVar("inferpool_traceparent", default="")


def current_trace_id() -> str:
    """The trace id of the request this code runs for ("" if none is known)."""
    return LOG_TRACE.get()


def exemplar() -> dict[str, str] | None:
    """A Prometheus exemplar naming the current request's trace (None outside one), so
    a latency bucket links to a trace; exposed in the OpenMetrics format."""
    trace_id = LOG_TRACE.get()
    return {"trace_id": trace_id} if trace_id else None


def bind_trace_id(trace_id: str) -> contextvars.Token[str]:
    return LOG_TRACE.set(trace_id)


def unbind_trace_id(token: contextvars.Token[str]) -> None:
    LOG_TRACE.reset(token)


@contextmanager
def bound(trace_id: str) -> Iterator[None]:
    """Log lines within name `trace_id`."""
    token = LOG_TRACE.set(trace_id)
    try:
        yield
    finally:
        LOG_TRACE.reset(token)


def reset(var: contextvars.ContextVar[str], token: contextvars.Token[str]) -> None:
    """Restores `var`, unless the context that set it is gone: a response stream closed
    from another task than the one it ran in (grpc cleaning up after a vanished
    client) ends its span there, with nothing to restore."""
    with contextlib.suppress(ValueError):
        var.reset(token)


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


def normalized(traceparent: str) -> str:
    """The version-00 form of a valid traceparent, "" for an invalid one."""
    parsed = parse_traceparent(traceparent)
    return f"00-{parsed[0]}-{parsed[1]}-{parsed[2] & 0xFF:02x}" if parsed else ""


def format_context(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def extract(traceparent: str, tracestate: str = "") -> Context | None:
    """The OpenTelemetry context a traceparent (and tracestate) names; None if invalid.
    Tracing on only: it imports the SDK's propagator."""
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: traceparent, TRACESTATE: tracestate} if tracestate else {TRACEPARENT: traceparent}
    ctx = TraceContextTextMapPropagator().extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def span_context(traceparent: str) -> SpanContext | None:
    ctx = extract(traceparent)
    if ctx is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span(ctx).get_span_context()
